"""Throughput of kit's TransformersRuntime.generate against a bare ``model.generate`` loop.

Both sides decode the same chat prompts greedily on builtin SmolLM2-135M-Instruct (fp32),
in the same length-sorted, left-padded batches, with the same tokenizer and model object.
The bare loop asks for nothing but token ids; kit also records token logprobs, time to
first token, per-item latency and finish reasons. Generated tokens are counted the same
way on both sides (up to and including EOS), and the counts are checked to be equal.

Run::

    .venv/bin/python benchmarks/runner_throughput.py --prompts 32 --batch-size 8 --max-new-tokens 32

The runs alternate (kit, bare, kit, bare ...) so background load hits both sides alike;
the figure per side is the median over ``--repeats`` timed runs after one warm-up each.
The goal is kit/bare >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kit.runtimes.base import GenerationRequest, Prompt
from kit.runtimes.hf import TransformersRuntime
from kit.study import ModelSpec, SamplingConfig

_TOPICS = [
    "the water cycle",
    "how a bicycle works",
    "why the sky is blue",
    "the history of tea",
    "how to brew coffee",
    "what a prime number is",
    "the planets of the solar system",
    "how bees make honey",
    "why leaves change colour",
    "what a volcano is",
    "how a refund request is handled",
    "the rules of chess",
    "how bread rises",
    "what photosynthesis does",
    "how to write a polite email",
    "why we need sleep",
]
_FILLER = (
    "Please keep the answer short and simple, suitable for a curious student who has "
    "never studied the subject before. "
)


def make_prompts(n: int) -> list[Prompt]:
    """``n`` chat prompts whose lengths vary from one line to a short paragraph."""
    prompts = []
    for i in range(n):
        question = f"Explain {_TOPICS[i % len(_TOPICS)]}."
        prompts.append(
            Prompt(messages=({"role": "user", "content": question + " " + _FILLER * (i % 5)},))
        )
    return prompts


@dataclass
class Timing:
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_kit(
    runtime: TransformersRuntime, prompts: list[Prompt], sampling: SamplingConfig
) -> Timing:
    requests = [GenerationRequest(f"p{i}", p, seed=i) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    generations = runtime.generate(requests, sampling=sampling)
    seconds = time.perf_counter() - start
    return Timing(seconds, sum(g.output_tokens or 0 for g in generations))


def run_bare(
    model, tokenizer, prompts: list[Prompt], *, batch_size: int, max_new_tokens: int
) -> Timing:
    """The same work as kit, written the plain way: no scores, no hooks."""
    start = time.perf_counter()
    texts = [
        tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens = 0
    for b in range(0, len(order), batch_size):
        batch = [{"input_ids": encoded[i]} for i in order[b : b + batch_size]]
        inputs = tokenizer.pad(batch, padding=True, padding_side="left", return_tensors="pt").to(
            model.device
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )
        tokens += _count_generated(out[:, inputs["input_ids"].shape[1] :].tolist(), eos)
    return Timing(time.perf_counter() - start, tokens)


def _count_generated(rows: list[list[int]], eos: int | list[int]) -> int:
    stops = set(eos if isinstance(eos, list) else [eos])
    total = 0
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in stops]
        total += ends[0] + 1 if ends else len(row)
    return total


def _alternate(sides: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    for name, fn in sides.items():
        warm = fn()
        print(f"  warm-up {name}: {warm.tokens_per_s:.1f} tokens/s", file=sys.stderr, flush=True)
    timings: dict[str, list[Timing]] = {name: [] for name in sides}
    for i in range(repeats):
        for name, fn in sides.items():
            timings[name].append(fn())
            print(
                f"  run {i + 1} {name}: {timings[name][-1].tokens_per_s:.1f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="number of chat prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per side (median reported)"
    )
    parser.add_argument(
        "--model",
        default="builtin:smollm2-135m-instruct",
        help="model folder or builtin:<name> (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = ModelSpec(
        name="bench",
        runtime="transformers",
        model=args.model,
        batch_size=args.batch_size,
        device=args.device,
    )
    runtime = TransformersRuntime(spec)
    prompts = make_prompts(args.prompts)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    timings = _alternate(
        {
            "kit": lambda: run_kit(runtime, prompts, sampling),
            "bare": lambda: run_bare(
                runtime.model,
                runtime.tokenizer,
                prompts,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
            ),
        },
        args.repeats,
    )

    print(
        f"{args.model} ({runtime.model.dtype}) on {runtime.device} ({torch.get_num_threads()} threads), "
        f"{args.prompts} chat prompts, batch {args.batch_size}, max_new_tokens "
        f"{args.max_new_tokens}, greedy; median of {args.repeats}"
    )
    medians = {}
    for name, runs in timings.items():
        medians[name] = statistics.median(t.tokens_per_s for t in runs)
        per_run = ", ".join(f"{t.tokens_per_s:.1f}" for t in runs)
        print(
            f"  {name:4s}: {medians[name]:8.1f} tokens/s  ({runs[0].tokens} tokens/run; runs: {per_run})"
        )
    counts = {t.tokens for runs in timings.values() for t in runs}
    print(f"  ratio kit/bare: {medians['kit'] / medians['bare']:.3f}")
    if len(counts) != 1:
        print(
            f"  WARNING: generated token counts differ between runs/sides: {sorted(counts)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
