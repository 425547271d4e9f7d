"""Teacher forcing: every model scores the baseline's own answers, token by token.

Token-level prediction distributions (KL divergence, same top token, the reference token's
probability) compare two models on the *same* token sequence, as llama.cpp's
``llama-perplexity --kl-divergence`` does. Here the sequences are the baseline's answers to
the eval prompts:

which tokens
    For each clean eval item (repeat 0, no failed request), the baseline's prompt token ids
    (its runtime's ``encode_prompt``: chat template applied) followed by the token ids the
    baseline *generated* for it, the end-of-generation token included when it stopped.
    Every model is fed exactly these ids; a candidate's own chat template or tokenizer is
    not used (a candidate with another vocabulary is "not comparable", never a number).
which positions
    Every generated position ``t``: the next-token distribution after the prompt and the
    first ``t`` generated tokens (the first is the distribution generation drew its first
    token from). Prompt positions are not scored.
what is kept
    Log-softmax in float64 of the raw logits (no temperature, no top-p). For the baseline its
    ``top_k`` most probable tokens per position (``distributions.top_k``, 32); for a
    candidate its logprobs at the *baseline's* top-k tokens, its own most probable token, and
    for both the target token's logprob, the smallest logprob over the vocabulary and the
    count of NaN / inf logits. :mod:`kit.analysis.distributions` turns these into the KL and
    its bounds (the top-k truncation bounds the KL from both sides; see there).

Rows are stored per model in ``distributions/<model>/`` (crash-safe parquet parts,
:class:`kit.store.OutputStore`, one row per item); the completion marker records the model's
vocabulary hash, ``top_k`` and, for a candidate that cannot be compared, why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kit.progress import task_progress
from kit.runtimes.base import Prompt, Runtime, TokenScoreRequest, TokenScores
from kit.store import OutputStore

DISTRIBUTIONS = "distributions"
#: Columns of a stored distribution row (one per model and item).
DISTRIBUTION_COLUMNS = [
    "model",
    "item_id",
    "repeat",
    "start",
    "n_positions",
    "token_ids",
    "target_logprobs",
    "support_ids",
    "support_logprobs",
    "argmax_ids",
    "argmax_logprobs",
    "min_logprobs",
    "nonfinite",
    "error",
]
CHUNK = 8


def distribution_store(run_dir: str | Path, model: str) -> OutputStore:
    """``distributions/<model>/`` of a run folder."""
    return OutputStore(Path(run_dir) / DISTRIBUTIONS / model)


def store_meta(store: OutputStore) -> dict[str, Any]:
    """What the completion marker of a distribution store records ({} when unfinished)."""
    if not store.is_complete():
        return {}
    return json.loads(store.complete_marker.read_text(encoding="utf-8"))


def _first_repeat(outputs: pd.DataFrame, ids: set[str]) -> pd.DataFrame:
    rows = outputs[outputs["item_id"].isin(ids)].sort_values(["item_id", "repeat"])
    return rows.drop_duplicates("item_id")


def _has_tokens(row: Mapping[str, Any]) -> bool:
    tokens = row.get("token_ids")
    error = row.get("error")
    failed = error is not None and not (isinstance(error, float) and error != error)
    return not failed and tokens is not None and len(tokens) > 0


def baseline_requests(
    runtime: Runtime,
    *,
    prompts: Mapping[str, Prompt],
    outputs: pd.DataFrame,
    ids: set[str],
    top_k: int,
) -> list[TokenScoreRequest]:
    """One request per clean item: the baseline's prompt ids + its generated ids."""
    requests = []
    for row in _first_repeat(outputs, ids).to_dict("records"):
        if not _has_tokens(row):
            continue
        prompt_ids = list(runtime.encode_prompt(prompts[row["item_id"]]))
        sequence = tuple(prompt_ids + [int(t) for t in row["token_ids"]])
        requests.append(TokenScoreRequest(row["item_id"], sequence, len(prompt_ids), None, top_k))
    return requests


def candidate_requests(baseline: pd.DataFrame) -> list[TokenScoreRequest]:
    """The baseline's sequences again, each position asking for the baseline's top-k ids."""
    out = []
    for row in baseline.to_dict("records"):
        if row.get("error") or row["n_positions"] == 0:
            continue
        support = tuple(tuple(int(t) for t in s) for s in row["support_ids"])
        out.append(
            TokenScoreRequest(
                row["item_id"], tuple(int(t) for t in row["token_ids"]), int(row["start"]), support
            )
        )
    return out


def _rows(model: str, requests: Sequence[TokenScoreRequest], scores: Sequence[TokenScores]):
    records = []
    for req, s in zip(requests, scores, strict=True):
        records.append(
            {
                "model": model,
                "item_id": req.item_id,
                "repeat": 0,
                "start": req.start,
                "n_positions": len(s.target_logprobs),
                "token_ids": list(req.token_ids),
                "target_logprobs": s.target_logprobs,
                "support_ids": s.support_ids,
                "support_logprobs": s.support_logprobs,
                "argmax_ids": s.argmax_ids,
                "argmax_logprobs": s.argmax_logprobs,
                "min_logprobs": s.min_logprobs,
                "nonfinite": s.nonfinite,
                "error": s.error,
            }
        )
    return pd.DataFrame(records, columns=DISTRIBUTION_COLUMNS)


def score_into(
    runtime: Runtime,
    requests: Sequence[TokenScoreRequest],
    store: OutputStore,
    *,
    model: str,
    progress: bool,
    meta: Mapping[str, Any],
) -> float:
    """Score every pending request into ``store`` (resumable); returns the seconds spent."""
    started = time.perf_counter()
    done = {item for item, _ in store.done_keys()}
    todo = [r for r in requests if r.item_id not in done]
    bar = tqdm(
        total=len(requests),
        initial=len(requests) - len(todo),
        unit="item",
        desc=f"{model} (token distributions)",
        disable=not progress,
        dynamic_ncols=True,
    )
    events = task_progress(f"{model} distributions", total=len(requests), initial=bar.n)
    try:
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i : i + CHUNK]
            store.append(_rows(model, chunk, runtime.score_tokens(chunk)))
            bar.update(len(chunk))
            events.update(len(chunk))
    finally:
        bar.close()
        events.close()
    store.mark_complete(model=model, rows=len(requests), **meta)
    return time.perf_counter() - started


def baseline_distributions(
    runtime: Runtime,
    *,
    prompts: Mapping[str, Prompt],
    outputs: pd.DataFrame,
    ids: set[str],
    run_dir: Path,
    model: str,
    top_k: int,
    enabled: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Teacher-force the baseline on its own answers (stage 1); ``{}`` when the runtime has
    no logits or the study turned distributions off, else the seconds it took."""
    if not enabled or not runtime.supports_token_scoring:
        return {}
    requests = baseline_requests(runtime, prompts=prompts, outputs=outputs, ids=ids, top_k=top_k)
    meta = {"role": "baseline", "top_k": top_k, "vocabulary_sha256": runtime.vocabulary_sha256()}
    seconds = score_into(
        runtime,
        requests,
        distribution_store(run_dir, model),
        model=model,
        progress=progress,
        meta=meta,
    )
    return {"distributions_s": round(seconds, 3)}


def candidate_distributions(
    runtime: Runtime,
    *,
    run_dir: Path,
    baseline: str,
    model: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Teacher-force a candidate on the baseline's sequences (stage 2).

    Returns what was done: ``{"status": "scored", "seconds": ...}``, or ``not comparable``
    (another vocabulary: recorded in the store's marker, no rows), or ``not measured``
    (the baseline has no distributions, or this runtime has no logits).
    """
    base_store = distribution_store(run_dir, baseline)
    base_meta = store_meta(base_store)
    if not base_meta:
        return {"status": "not measured", "reason": "the baseline has no token distributions"}
    if not runtime.supports_token_scoring:
        return {"status": "not measured", "reason": f"runtime {runtime.name!r} has no logits"}
    store = distribution_store(run_dir, model)
    mine = runtime.vocabulary_sha256()
    if mine is None or mine != base_meta.get("vocabulary_sha256"):
        store.clear()
        reason = (
            "the candidate's vocabulary differs from the baseline's (another tokenizer): "
            "token-level distributions are not comparable"
        )
        store.mark_complete(
            model=model,
            rows=0,
            role="candidate",
            comparable=False,
            reason=reason,
            vocabulary_sha256=mine,
        )
        return {"status": "not comparable", "reason": reason}
    requests = candidate_requests(base_store.read())
    meta = {"role": "candidate", "comparable": True, "vocabulary_sha256": mine}
    seconds = score_into(runtime, requests, store, model=model, progress=progress, meta=meta)
    return {"status": "scored", "seconds": round(seconds, 3)}
