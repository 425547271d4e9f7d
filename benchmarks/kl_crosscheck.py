"""Cross-check compkit's token KL against llama.cpp's ``llama-perplexity --kl-divergence``.

Both tools score the same token positions of the same text with two GGUF models (the
builtin SmolLM2-135M-Instruct Q4_1 as the base, its Q2_K requantization as the candidate):
the text is the demo eval set's documents and messages, tokenized with BOS and cut into
``--ctx`` token chunks; the second half of each chunk is scored (llama-perplexity's
positions: logits after token ``j`` for ``j >= ctx/2``, predicting token ``j + 1``).

compkit's side goes through the runtime capability the pipeline uses
(``LlamaCppRuntime.score_tokens``: the base's top-k log-probabilities and tail, the
candidate's log-probabilities at those tokens) and :mod:`kit.analysis.distributions`, once on
llama-perplexity's kernel path (``teacher_forcing: batch``: every position in one batch) and
once on generation's (``decode``: one token per decode). Expected differences: llama.cpp
stores the base's log-probabilities as uint16 in a 16-nat window and drops tokens below it;
compkit keeps the top-k exactly and bounds the rest (``kl`` a lower bound, ``kl_upper`` an
upper bound).

``llama-perplexity`` is not part of llama-cpp-python (it ships the library only). Point
``--binary`` or ``LLAMA_PERPLEXITY`` at a build (``cmake --build build --target
llama-perplexity`` in llama.cpp's source, e.g. the vendored copy in the llama-cpp-python
sdist); without one this script says so and exits 0.

    python benchmarks/kl_crosscheck.py --chunks 4 --ctx 512 --top-k 256

The last line is the relative difference of the mean KL (compkit batch vs llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LLAMA_STATS = {
    "mean_kl": r"Mean\s+KLD:\s+([-\d.]+)",
    "max_kl": r"Maximum KLD:\s+([-\d.]+)",
    "kl_p99": r"99\.0%\s+KLD:\s+([-\d.]+)",
    "kl_p90": r"90\.0%\s+KLD:\s+([-\d.]+)",
    "kl_p50": r"Median\s+KLD:\s+([-\d.]+)",
    "kl_p10": r"10\.0%\s+KLD:\s+([-\d.]+)",
    "mean_delta_p": r"Mean\s+Δp:\s+([-\d.]+)",
    "rms_delta_p": r"RMS Δp\s+:\s+([-\d.]+)",
    "same_top": r"Same top p:\s+([-\d.]+)",
}
PERCENT = {"mean_delta_p", "rms_delta_p", "same_top"}


def corpus() -> str:
    rows = [json.loads(line) for line in (ROOT / "data/support/support_eval.jsonl").open()]
    seen, parts = set(), []
    for r in rows:
        for text in (r.get("context"), r.get("input")):
            if text and text not in seen:
                seen.add(text)
                parts.append(text)
    return "\n\n".join(parts)


def models(cache: Path, qtype: str) -> tuple[Path, Path]:
    from kit.models import builtin_gguf_path
    from kit.recipes import gguf_requantize

    base = builtin_gguf_path("smollm2-135m-instruct")
    cand = cache / f"{base.stem}.{qtype}.gguf"
    if not cand.is_file():
        gguf_requantize(base, cand, type=qtype)
    return base, cand


def llama_perplexity(binary: str, base: Path, cand: Path, text: Path, args) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        kld = Path(tmp) / "base.kld"
        common = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
        subprocess.run(
            [binary, "-m", str(base), "-f", str(text), "--kl-divergence-base", str(kld), *common],
            check=True,
            capture_output=True,
        )
        out = subprocess.run(
            [binary, "-m", str(cand), "--kl-divergence-base", str(kld), "--kl-divergence", *common],
            check=True,
            capture_output=True,
            text=True,
        )
    log = out.stdout + out.stderr
    stats = {}
    for name, pattern in LLAMA_STATS.items():
        m = re.search(pattern, log)
        if m:
            stats[name] = float(m.group(1)) / (100 if name in PERCENT else 1)
    return stats


def compkit_stats(base: Path, cand: Path, text: str, args, mode: str) -> dict[str, float]:
    import pandas as pd

    from kit.analysis.distributions import kl_statistics, position_divergence
    from kit.runtimes.base import TokenScoreRequest
    from kit.runtimes.llamacpp import LlamaCppRuntime
    from kit.study import ModelSpec

    def runtime(path: Path, name: str) -> LlamaCppRuntime:
        options = {"n_ctx": args.ctx, "n_threads": args.threads, "teacher_forcing": mode}
        return LlamaCppRuntime(
            ModelSpec(name=name, runtime="llamacpp", model=str(path), options=options)
        )

    with runtime(base, "base") as rt:
        tokens = rt.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        bos = rt.llm.token_bos()
        requests = []
        for i in range(args.chunks):
            chunk = list(tokens[i * args.ctx : (i + 1) * args.ctx])
            chunk[0] = bos
            requests.append(
                TokenScoreRequest(f"chunk{i}", tuple(chunk), args.ctx // 2 + 1, None, args.top_k)
            )
        base_scores = rt.score_tokens(requests)
    support = [
        TokenScoreRequest(r.item_id, r.token_ids, r.start, tuple(tuple(s) for s in b.support_ids))
        for r, b in zip(requests, base_scores, strict=True)
    ]
    with runtime(cand, "cand") as rt:
        cand_scores = rt.score_tokens(support)
    frames = []
    for b, c in zip(base_scores, cand_scores, strict=True):
        values = position_divergence(b.__dict__, c.__dict__)
        frames.append(pd.DataFrame({"model": "cand", "item_id": b.item_id, **values}))
    positions = pd.concat(frames, ignore_index=True)
    stats = kl_statistics(positions).set_index("statistic")["value"].to_dict()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--binary", default=os.environ.get("LLAMA_PERPLEXITY") or shutil.which("llama-perplexity")
    )
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--type", default="Q2_K", help="the candidate's GGUF type")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.binary or not Path(args.binary).is_file():
        print("llama-perplexity not found (set LLAMA_PERPLEXITY or --binary); nothing compared")
        print("kl cross-check: not run")
        return
    cache = Path(os.environ.get("COMPKIT_CACHE", Path.home() / ".cache" / "compkit")) / "kl-check"
    cache.mkdir(parents=True, exist_ok=True)
    base, cand = models(cache, args.type)
    text = corpus()
    text_file = cache / "corpus.txt"
    text_file.write_text(text, encoding="utf-8")
    started = time.perf_counter()
    ref = llama_perplexity(args.binary, base, cand, text_file, args)
    t_llama = time.perf_counter() - started
    ours = {}
    for mode in ("batch", "decode"):
        started = time.perf_counter()
        ours[mode] = compkit_stats(base, cand, text, args, mode)
        ours[mode]["seconds"] = time.perf_counter() - started
    print(
        f"{args.chunks} chunks x {args.ctx // 2 - 1} scored tokens; base {base.name}, "
        f"candidate {cand.name}; compkit top_k={args.top_k}; llama-perplexity {t_llama:.1f} s"
    )
    print(f"{'statistic':<14}{'llama.cpp':>12}{'compkit batch':>15}{'compkit decode':>16}")
    for name in LLAMA_STATS:
        row = [
            ref.get(name, np.nan),
            ours["batch"].get(name, np.nan),
            ours["decode"].get(name, np.nan),
        ]
        print(f"{name:<14}" + "".join(f"{v:>14.6f} " for v in row))
    print(
        f"{'mean_kl_upper':<14}{'':>12}{ours['batch']['mean_kl_upper']:>14.6f} "
        f"{ours['decode']['mean_kl_upper']:>14.6f}"
    )
    print(
        f"{'mean_p_tail':<14}{'':>12}{ours['batch']['mean_p_tail']:>14.3g} "
        f"{ours['decode']['mean_p_tail']:>14.3g}"
    )
    rel = ours["batch"]["mean_kl"] / ref["mean_kl"] - 1
    print(f"mean KL, compkit (batch) vs llama.cpp: {rel * 100:+.2f}% relative")


if __name__ == "__main__":
    main()
