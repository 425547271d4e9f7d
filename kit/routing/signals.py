"""What a router can see of a request before deciding: the *signals* frame.

One row per request (``item_id, repeat``) of one model, with only what is known at serving
time, never a gold label:

``choice_confidence``, ``mean_token_prob``, ``min_token_prob``
    as stored by stage 2 (:data:`kit.execute.OUTPUT_COLUMNS`);
``token_quantile_prob``
    the ``q`` quantile of the answer's token probabilities (``q = 0.1`` by default): a low
    quantile is not length-biased the way the product of token probabilities is, and ranks
    errors better than the mean (Gupta et al. 2024, "Language model cascades: token-level
    uncertainty and beyond");
``auto_confidence``
    ``choice_confidence`` where options were scored, else ``token_quantile_prob``;
``parse_failed``
    the answer of an extraction / tool-call item is not strict JSON or not a well-formed call;
``abstained``
    the answer says "not found" / "I don't know", or no label / option could be read from it
    (a refusal is *not* an abstention: it is a safety decision, and routing it would trade
    refusals for compliance);
slice columns
    the frozen slices known before answering (``task``, ``length_bucket``, the eval set's
    own columns).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.errors import CompkitError

SIGNAL_COLUMNS = [
    "item_id",
    "repeat",
    "task",
    "choice_confidence",
    "mean_token_prob",
    "min_token_prob",
    "token_quantile_prob",
    "auto_confidence",
    "parse_failed",
    "abstained",
]
#: Answers that abstain ("not found", "I don't know", "cannot determine", ...).
NOT_FOUND = re.compile(
    r"\b(not found|no (?:such )?information|i (?:do not|don't) know|unknown|cannot (?:be )?"
    r"determined?|can't (?:be )?determined?|not (?:mentioned|provided|stated|specified)|n/a)\b",
    re.IGNORECASE,
)
_CHOICE_TASKS = ("classification", "multiple_choice")
_JSON_TASKS = ("extraction", "tool_call")


def token_quantile(logprobs: object, q: float) -> float:
    """The ``q`` quantile of ``exp(logprobs)`` (NaN when there are none)."""
    if logprobs is None or (isinstance(logprobs, float) and np.isnan(logprobs)):
        return float("nan")
    values = np.exp(np.asarray(list(logprobs), dtype=np.float64))
    values = values[np.isfinite(values)]
    return float(np.quantile(values, q)) if values.size else float("nan")


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)


def _abstained(output: pd.Series, pred: pd.Series, task: pd.Series) -> np.ndarray:
    text = output.fillna("").astype(str)
    said = text.map(lambda t: bool(NOT_FOUND.search(t)) or not t.strip()).to_numpy()
    unread = (task.isin(_CHOICE_TASKS) & pred.isna()).to_numpy()
    return said | unread


def _parse_failed(frame: pd.DataFrame) -> np.ndarray:
    json_fail = _numeric(frame, "json_parse_failure")
    valid = _numeric(frame, "valid_call")
    tool = frame["task"].eq("tool_call").to_numpy()
    is_json = frame["task"].isin(_JSON_TASKS).to_numpy()
    return is_json & ((json_fail == 1) | (tool & (valid == 0)))


def build_signals(
    outputs: pd.DataFrame,
    outcomes: pd.DataFrame,
    *,
    model: str,
    slices: pd.DataFrame | None = None,
    quantile: float = 0.1,
) -> pd.DataFrame:
    """The signals frame of ``model`` (:data:`SIGNAL_COLUMNS` + slice columns).

    Parameters
    ----------
    outputs
        Stored output rows (``Run.outputs()``): confidences, token logprobs, the answer text.
    outcomes
        Scored outcomes (``Run.outcomes()``): ``task``, ``pred`` and the parse columns (read
        from the answer alone, not the label).
    slices
        ``frozen/slices.parquet`` (``id`` + slice columns), joined on ``item_id``.
    quantile
        ``q`` of ``token_quantile_prob``.

    Raises
    ------
    CompkitError
        When ``model`` has no outcomes, or outputs and outcomes do not pair one to one.
    """
    if not 0 < quantile < 1:
        raise CompkitError(f"token quantile must be in (0, 1), got {quantile}")
    key = ["item_id", "repeat"]
    mine = outcomes[outcomes["model"] == model]
    if mine.empty:
        raise CompkitError(
            f"no outcomes for model {model!r}; models: {sorted(outcomes['model'].unique())}"
        )
    out_rows = outputs[outputs["model"] == model]
    wanted = ("output", "token_logprobs", "mean_token_prob", "min_token_prob", "choice_confidence")
    keep = [c for c in wanted if c in out_rows.columns]
    merged = mine.drop(columns=[c for c in keep if c in mine.columns]).merge(
        out_rows[[*key, *keep]], on=key, how="left", validate="one_to_one"
    )
    frame = merged[key].copy()
    frame["task"] = merged["task"].astype(str)
    for column in ("choice_confidence", "mean_token_prob", "min_token_prob"):
        frame[column] = _numeric(merged, column)
    lps = merged["token_logprobs"] if "token_logprobs" in merged else pd.Series([None] * len(frame))
    frame["token_quantile_prob"] = [token_quantile(lp, quantile) for lp in lps]
    choice = frame["choice_confidence"].to_numpy()
    frame["auto_confidence"] = np.where(
        np.isnan(choice), frame["token_quantile_prob"].to_numpy(), choice
    )
    frame["parse_failed"] = _parse_failed(merged)
    pred = merged["pred"] if "pred" in merged.columns else pd.Series([None] * len(merged))
    output = merged["output"] if "output" in merged.columns else pd.Series([""] * len(merged))
    frame["abstained"] = _abstained(output, pred, merged["task"])
    if slices is not None:
        extra = slices.rename(columns={"id": "item_id"})
        extra = extra.drop(columns=[c for c in extra.columns if c in ("task",)])
        frame = frame.merge(extra, on="item_id", how="left")
    return frame.reset_index(drop=True)


def check_signals(signals: pd.DataFrame, *, needed: Sequence[str]) -> None:
    """Raise naming the signal columns a policy needs that the frame lacks."""
    missing = [c for c in needed if c not in signals.columns]
    if missing:
        raise CompkitError(f"signals frame lacks column(s) {missing}")
