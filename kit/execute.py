"""Run one model over an eval set: requests in, one stored row per (item, repeat) out.

This is where eval items meet a runtime. Items are length-sorted and cut into chunks; each
chunk is generated (and, for classification / multiple choice, its options scored by
logprob), turned into rows, and appended to the :class:`~kit.store.OutputStore` before the
next chunk starts, so an interrupted run resumes at the next unfinished chunk.

Seeds are derived from the study seed and the repeat index only, so the baseline and every
candidate see the same seed for the same repeat.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kit.evalset import EvalItem
from kit.progress import task_progress
from kit.prompts import PromptBuilder
from kit.runtimes.base import (
    ChoiceRequest,
    ChoiceScores,
    Generation,
    GenerationRequest,
    Prompt,
    Runtime,
    repeat_seed,
)
from kit.store import OutputStore, now_iso, pending
from kit.study import SamplingConfig

#: Columns of a stored output row, in order.
OUTPUT_COLUMNS = [
    "model",
    "item_id",
    "repeat",
    "seed",
    "output",
    "prompt_tokens",
    "output_tokens",
    "ttft_s",
    "latency_s",
    "tokens_per_s",
    "finish_reason",
    "batch_size",
    "token_logprobs",
    "mean_token_prob",
    "min_token_prob",
    "choice_logprobs",
    "choice_n_tokens",
    "choice_probs",
    "choice_pred",
    "choice_confidence",
    "confidence",
    "attempts",
    "itl_p50_s",
    "itl_max_s",
    "error",
    "error_class",
    "token_ids",
    "nonfinite_logits",
    "created_at",
]


@dataclass
class RunPlan:
    """Everything needed to run one model; built once, reused across repeats."""

    model_name: str
    items: Sequence[EvalItem]
    prompts: dict[str, Prompt]
    continuations: dict[str, tuple[str, ...]]
    prompt_tokens: dict[str, int]
    sampling: SamplingConfig
    repeats: int
    score_choices: bool = True
    schemas: dict[str, dict] = field(default_factory=dict)
    structured_output: bool = True
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # task -> token limit

    @classmethod
    def build(
        cls,
        *,
        model_name: str,
        items: Sequence[EvalItem],
        builder: PromptBuilder,
        runtime: Runtime,
        sampling: SamplingConfig,
        repeats: int,
        schemas: dict[str, dict] | None = None,
    ) -> RunPlan:
        """Render prompts with ``builder`` (the baseline, at freeze time); ``schemas`` are the
        items' answer schemas (:func:`kit.structured.plan_schemas`)."""
        prompts = {it.id: builder.render(it) for it in items}
        conts = {it.id: c for it in items if (c := builder.continuations(it))}
        return cls.from_prompts(
            model_name=model_name,
            items=items,
            prompts=prompts,
            continuations=conts,
            runtime=runtime,
            sampling=sampling,
            repeats=repeats,
            schemas=schemas,
        )

    @classmethod
    def from_prompts(
        cls,
        *,
        model_name: str,
        items: Sequence[EvalItem],
        prompts: dict[str, Prompt],
        continuations: dict[str, tuple[str, ...]],
        runtime: Runtime,
        sampling: SamplingConfig,
        repeats: int,
        schemas: dict[str, dict] | None = None,
        structured_output: bool = True,
    ) -> RunPlan:
        """Use already rendered prompts (candidates reuse the frozen ones exactly).

        ``structured_output=False`` runs the model unconstrained although ``schemas`` are
        recorded (a model spec's ``structured_output: false``)."""
        count = prompt_counter(runtime)
        tokens = {i: count(p) for i, p in prompts.items()}
        return cls(
            model_name,
            items,
            prompts,
            continuations,
            tokens,
            sampling,
            repeats,
            schemas=dict(schemas or {}),
            structured_output=structured_output,
        )

    def keys(self) -> list[tuple[str, int]]:
        """(item, repeat) keys, longest prompts first within each repeat."""
        order = sorted(self.items, key=lambda it: (-self.prompt_tokens[it.id], it.id))
        return [(it.id, r) for r in range(self.repeats) for it in order]


def _prompt_chars(p: Prompt) -> str:
    return p.text if p.text is not None else "".join(m["content"] for m in p.messages or ())


def prompt_counter(runtime: Runtime) -> Callable[[Prompt], int]:
    """Tokens of a prompt as ``runtime`` counts them; characters / 4 where it cannot count
    (remote endpoints without a tokenizer, predictions files): from its first refusal on."""
    state = {"counts": True}

    def count(p: Prompt) -> int:
        if state["counts"]:
            try:
                return runtime.count_tokens(p)
            except NotImplementedError:
                state["counts"] = False
        return max(1, len(_prompt_chars(p)) // 4)

    return count


def run_model(
    runtime: Runtime,
    plan: RunPlan,
    store: OutputStore,
    *,
    chunk_size: int | None = None,
    score_choices: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every pending (item, repeat) of ``plan`` and append rows to ``store``.

    Returns all stored rows of this model (earlier runs included).
    """
    runtime.expect_ids([it.id for it in plan.items], repeats=plan.repeats)
    todo = pending(plan.keys(), store.done_keys())
    size = (
        chunk_size or runtime.spec.batch_size
    )  # one stored part per batch: fine progress and resume
    plan.score_choices = score_choices and runtime.supports_choice_scoring
    total, initial = len(plan.keys()), len(plan.keys()) - len(todo)
    with RunProgress(plan.model_name, total=total, initial=initial, enabled=progress) as bar:
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            frame = _run_chunk(runtime, plan, chunk)
            store.append(frame)
            bar.update(len(chunk))
    return finish_store(store, model=plan.model_name, repeats=plan.repeats)


class RunProgress:
    """A model's progress: a tqdm bar here, and events relayed to ``compkit run``'s terminal
    when a pipeline runs this kernel (:mod:`kit.progress`)."""

    def __init__(self, model: str, *, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="item",
            desc=model,
            disable=not enabled,
            dynamic_ncols=True,
        )
        self.events = task_progress(model, total=total, initial=initial)

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.events.update(n)

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        self.events.close()


def finish_store(store: OutputStore, *, model: str, repeats: int) -> pd.DataFrame:
    """Every stored row of a model; marks its store complete (parts and their sha256)."""
    rows = store.read()
    store.mark_complete(model=model, rows=len(rows), repeats=repeats)
    return rows


def chunk_keys(keys: Sequence[tuple[str, int]], size: int) -> list[list[tuple[str, int]]]:
    """Cut ``keys`` (in plan order) into batches of ``size``: the batches a local run makes."""
    return [list(keys[i : i + size]) for i in range(0, len(keys), size)]


def run_chunk_isolated(
    runtime: Runtime, plan: RunPlan, chunk: list[tuple[str, int]]
) -> pd.DataFrame:
    """Rows of one batch, like a local run makes them; when the batch raises, its items are
    run one at a time and an item that raises alone becomes an error row (``error_class``
    ``runtime_error``, the exception in ``error``), so a bad item never stops a long run.

    When every item of the batch raises alone, the plan's shortest other prompt is tried (its
    result is not kept): if that raises too, the replica itself is broken (a lost device, a closed
    model) and the batch's first exception is raised instead of storing error rows that a
    rerun could not repair.
    """
    try:
        return _run_chunk(runtime, plan, chunk)
    except Exception as exc:  # a runtime failing on one item of the batch
        batch_error = exc
    frames, failures = [], 0
    for key in chunk:
        try:
            frames.append(_run_chunk(runtime, plan, [key]))
        except Exception as exc:
            failures += 1
            frames.append(_error_rows(plan, [key], exc))
    inside = set(chunk)
    probe = next((k for k in reversed(plan.keys()) if k not in inside), None)  # shortest first
    if failures == len(chunk) and probe is not None:
        try:
            _run_chunk(runtime, plan, [probe])
        except Exception:
            raise batch_error from None
    return pd.concat(frames, ignore_index=True)


def _error_rows(plan: RunPlan, chunk: list[tuple[str, int]], exc: BaseException) -> pd.DataFrame:
    created = now_iso()
    rows = [
        _row(
            plan.model_name,
            Generation(
                item_id=i,
                text="",
                error=f"{type(exc).__name__}: {exc}"[:2000],
                error_class="runtime_error",
            ),
            None,
            r,
            repeat_seed(plan.sampling.seed, r),
            created,
        )
        for i, r in chunk
    ]
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _run_chunk(runtime: Runtime, plan: RunPlan, chunk: list[tuple[str, int]]) -> pd.DataFrame:
    seeds = {r: repeat_seed(plan.sampling.seed, r) for _, r in chunk}
    schemas = plan.schemas if plan.structured_output else {}
    gen_requests = [
        GenerationRequest(i, plan.prompts[i], seeds[r], json_schema=schemas.get(i))
        for i, r in chunk
    ]
    # one generate call per repeat so a batch never mixes seeds
    generations: dict[tuple[str, int], Generation] = {}
    # ... and never mixes token limits (a task's max_new_tokens)
    for r in sorted(seeds):
        reqs = [g for g, (_, rr) in zip(gen_requests, chunk, strict=True) if rr == r]
        for sampling, group in _by_sampling(plan, reqs):
            for g in runtime.generate(group, sampling=sampling):
                generations[(g.item_id, r)] = g
    scores: dict[str, ChoiceScores] = {}
    choice_ids = sorted({i for i, _ in chunk if i in plan.continuations})
    if (
        plan.score_choices and choice_ids
    ):  # choice logprobs do not depend on the seed: score once per item
        reqs = [ChoiceRequest(i, plan.prompts[i], plan.continuations[i]) for i in choice_ids]
        try:
            scores = {s.item_id: s for s in runtime.score_choices(reqs)}
        except NotImplementedError as exc:  # e.g. a server that cannot echo prompt logprobs
            warnings.warn(
                f"{plan.model_name}: no choice scores ({exc}); confidence falls back to "
                "token probabilities",
                stacklevel=2,
            )
            plan.score_choices = False
            scores = {}
    created = now_iso()
    rows = [
        _row(plan.model_name, generations[(i, r)], scores.get(i), r, seeds[r], created)
        for i, r in chunk
    ]
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def output_row(
    model: str, g: Generation, s: ChoiceScores | None, *, repeat: int, seed: int, created: str
) -> dict:
    """One stored output row (:data:`OUTPUT_COLUMNS`) from a generation and its choice scores
    (the live router builds its signals from the same rows stage 2 stores)."""
    return _row(model, g, s, repeat, seed, created)


def _by_sampling(
    plan: RunPlan, requests: list[GenerationRequest]
) -> list[tuple[SamplingConfig, list[GenerationRequest]]]:
    """Requests grouped by their sampling: the study's, with a task's ``max_new_tokens``."""
    tasks = {it.id: it.task for it in plan.items}
    groups: dict[int, list[GenerationRequest]] = {}
    for req in requests:
        limit = plan.max_new_tokens.get(tasks[req.item_id], plan.sampling.max_new_tokens)
        groups.setdefault(limit, []).append(req)
    return [
        (plan.sampling.model_copy(update={"max_new_tokens": limit}), group)
        for limit, group in groups.items()
    ]


def _row(
    model: str, g: Generation, s: ChoiceScores | None, repeat: int, seed: int, created: str
) -> dict:
    lp = g.token_logprobs
    probs = np.exp(lp) if lp else None
    row = {
        "model": model,
        "item_id": g.item_id,
        "repeat": repeat,
        "seed": seed,
        "output": g.text,
        "prompt_tokens": g.prompt_tokens,
        "output_tokens": g.output_tokens,
        "ttft_s": g.ttft_s,
        "latency_s": g.latency_s,
        "tokens_per_s": (g.output_tokens / g.latency_s)
        if g.output_tokens and g.latency_s
        else None,
        "finish_reason": g.finish_reason,
        "batch_size": g.batch_size,
        "token_logprobs": list(map(float, lp)) if lp else None,
        "mean_token_prob": float(probs.mean()) if probs is not None else None,
        "min_token_prob": float(probs.min()) if probs is not None else None,
        "choice_logprobs": None,
        "choice_n_tokens": None,
        "choice_probs": None,
        "choice_pred": None,
        "choice_confidence": None,
        "confidence": g.confidence,  # reported by the runtime itself (predictions files)
        "attempts": g.extra.get("attempts"),  # endpoint runtimes: requests incl. retries
        "itl_p50_s": g.extra.get("itl_p50_s"),
        "itl_max_s": g.extra.get("itl_max_s"),  # inter-token gaps
        "error": g.error,
        "error_class": g.error_class,
        "token_ids": list(map(int, g.token_ids)) if g.token_ids is not None else None,
        "nonfinite_logits": g.nonfinite_logits,
        "created_at": created,
    }
    if s is not None and s.error is None:
        norm = choice_probabilities(s.logprobs)
        row.update(
            choice_logprobs=list(map(float, s.logprobs)),
            choice_n_tokens=list(s.n_tokens),
            choice_probs=norm.tolist(),
            choice_pred=int(norm.argmax()),
            choice_confidence=float(norm.max()),
        )
    elif s is not None and g.error is None:
        row.update(error=s.error, error_class=s.error_class)
    return row


def choice_probabilities(logprobs: Sequence[float]) -> np.ndarray:
    """Softmax over the options' summed logprobs: P(option | one of the options)."""
    x = np.asarray(logprobs, dtype=float)
    if not np.isfinite(x).any():
        return np.full(len(x), 1.0 / len(x))
    x = x - np.nanmax(x[np.isfinite(x)])
    p = np.where(np.isfinite(x), np.exp(x), 0.0)
    return p / p.sum()
