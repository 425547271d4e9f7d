"""Scoring: raw outputs -> per-item outcomes -> tidy metric summaries.

:data:`SCORERS` maps a task to its per-item scorer; the metrics the outcome columns hold
(direction, unit, tasks, interval methods) are declared once in :data:`kit.metrics.METRICS`.

Besides the per-task scorers, *score sources* add columns to the outcome table: anything
with an ``info`` (:class:`kit.metrics.MetricSpec`) and a ``score(eval_set, outputs)`` method returning
``model, item_id[, repeat], <info.name>`` (:class:`ScoreSource`). Two ship with kit: filled
review sheets (:func:`kit.scoring.review.review_scores`, metric ``human_score``) and
``evaluate`` modules loaded from a local path (:func:`kit.scoring.custom.evaluate_scorer`).

Example
-------
>>> outcomes = score_outputs(eval_set, outputs)         # doctest: +SKIP
>>> summarize(outcomes)                                 # model, task, metric, value, n
>>> label_metrics(outcomes, eval_set)                   # model, label, precision, recall, f1, support
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet, label_set
from kit.metrics import METRICS, MetricSpec, item_metrics
from kit.scoring import tasks
from kit.scoring.artifacts import artifact_flags
from kit.scoring.labels import label_metrics, macro_f1

Scorer = Callable[[EvalItem, dict[str, Any], EvalSet], dict[str, Any]]


SCORERS: dict[str, Scorer] = {
    "classification": tasks.score_classification,
    "multiple_choice": tasks.score_multiple_choice,
    "extraction": tasks.score_extraction,
    "refusal": tasks.score_refusal,
    "tool_call": tasks.score_tool_call,
    "generation": tasks.score_generation,
}


class ScoreSource(Protocol):
    """Adds one metric column to the outcome table (review sheets, ``evaluate`` modules)."""

    info: MetricSpec

    def score(self, eval_set: EvalSet, outputs: pd.DataFrame) -> pd.DataFrame:
        """``model, item_id[, repeat], <info.name>``; without ``repeat`` a value applies to
        every repeat of the item."""
        ...


def score_outputs(
    eval_set: EvalSet,
    outputs: pd.DataFrame,
    *,
    continuations: Mapping[str, Sequence[str]] | None = None,
    sources: Sequence[ScoreSource] = (),
    choice_answer: Sequence[str] = (),
) -> pd.DataFrame:
    """One outcome row per (model, item, repeat): ``model, item_id, repeat, task, correct, ...``.

    Failed requests (``error`` set) score as wrong and count in ``error``.

    Parameters
    ----------
    eval_set, outputs
        The items and the stored output rows (``kit.execute.OUTPUT_COLUMNS``).
    continuations
        Item id -> the texts that were scored by logprob (a frozen run's
        ``FrozenRun.continuations``). With them, choice items get ``choice_correct_norm``
        (lm-evaluation-harness ``acc_norm``) next to ``choice_correct`` (``acc``).
    sources
        :class:`ScoreSource` objects whose column is merged in (see :func:`add_scores`).
    choice_answer
        Tasks answered by the highest-logprob option (a study's ``answer: choice``): their
        ``correct`` and ``pred`` come from the choice scores (``generated_correct`` keeps the
        generated text's result). A row of such a task without choice scores keeps the
        generated answer and counts in ``choice_missing``.
    """
    items = eval_set.by_id()
    unknown = sorted(set(outputs["item_id"]) - set(items))
    if unknown:
        raise ValueError(
            f"outputs name {len(unknown)} item(s) not in the eval set, e.g. {unknown[:3]}"
        )
    conts = continuations or {}
    rows = []
    for rec in outputs.to_dict("records"):
        item = items[rec["item_id"]]
        failed = rec.get("error") is not None and not (
            isinstance(rec["error"], float) and np.isnan(rec["error"])
        )
        rec["continuations"] = conts.get(item.id)
        scored = {"correct": 0.0} if failed else SCORERS[item.task](item, rec, eval_set)
        if item.task in choice_answer and not failed:
            scored = _answer_by_choice(item, scored, rec, eval_set)
        rows.append(
            {
                "model": rec["model"],
                "item_id": item.id,
                "repeat": int(rec["repeat"]),
                "task": item.task,
                "error": float(failed),
                **artifact_flags(rec),
                **scored,
            }
        )
    frame = pd.DataFrame(rows)
    lead = ["model", "item_id", "repeat", "task", "pred", "correct"]
    for col in lead:
        if col not in frame:
            frame[col] = np.nan
    frame = frame[lead + [c for c in frame.columns if c not in lead]]
    for source in sources:
        frame = add_scores(frame, source.score(eval_set, outputs), column=source.info.name)
    return frame


def _answer_by_choice(
    item: EvalItem, scored: dict[str, Any], row: dict[str, Any], eval_set: EvalSet
) -> dict[str, Any]:
    out = {**scored, "generated_correct": scored.get("correct")}
    if "choice_correct" not in scored:
        out["choice_missing"] = 1.0
        return out
    idx = int(row["choice_pred"])
    out["correct"] = scored["choice_correct"]
    out["pred"] = label_set(eval_set, item)[idx] if item.task == "classification" else str(idx)
    return out


def add_scores(outcomes: pd.DataFrame, scores: pd.DataFrame, *, column: str) -> pd.DataFrame:
    """The outcome table with ``scores[column]`` merged in as an outcome column.

    ``scores`` holds ``model, item_id[, repeat], <column>``; rows without a score get NaN.
    Without ``repeat`` a score applies to every repeat of its item.

    Raises
    ------
    CompkitError
        When ``column`` is not a registered metric, ``scores`` misses a key column, repeats
        a key, or names a (model, item) the outcome table does not have.
    """
    if column not in METRICS:
        raise CompkitError(
            f"score column {column!r} is not a registered metric; "
            "register it with kit.metrics.register_metric first"
        )
    keys = ["model", "item_id", "repeat"] if "repeat" in scores.columns else ["model", "item_id"]
    missing = [c for c in ["model", "item_id", column] if c not in scores.columns]
    if missing:
        raise CompkitError(f"scores for {column!r} lack column(s) {missing}")
    if scores.duplicated(keys).any():
        raise CompkitError(
            f"scores for {column!r} repeat keys {keys}, e.g. "
            f"{scores[scores.duplicated(keys)][keys].iloc[0].tolist()}"
        )
    known = set(zip(outcomes["model"], outcomes["item_id"], strict=True))
    stray = [k for k in zip(scores["model"], scores["item_id"], strict=True) if k not in known]
    if stray:
        raise CompkitError(
            f"scores for {column!r} name {len(stray)} (model, item) pair(s) that have "
            f"no outcome rows, e.g. {stray[:3]}"
        )
    table = scores[[*keys, column]].astype({column: float})
    if "repeat" in keys:
        table = table.astype({"repeat": outcomes["repeat"].dtype})
    return outcomes.drop(columns=[column], errors="ignore").merge(table, on=keys, how="left")


def metric_columns(outcomes: pd.DataFrame) -> dict[str, str]:
    """Outcome column -> metric name for every registered item metric column present."""
    return {
        m.outcome_column: m.name for m in item_metrics() if m.outcome_column in outcomes.columns
    }


def summarize(outcomes: pd.DataFrame, *, by: tuple[str, ...] = ("model", "task")) -> pd.DataFrame:
    """Tidy mean of every metric: ``*by, metric, value, n`` (n = items with a value).

    Repeats are averaged per item first, so each item weighs the same.
    """
    cols = metric_columns(outcomes)
    per_item = outcomes.groupby([*dict.fromkeys(("model", *by)), "item_id"], dropna=False)[
        list(cols)
    ].mean()
    long = (
        per_item.reset_index()
        .melt(
            id_vars=[*dict.fromkeys(("model", *by)), "item_id"],
            var_name="column",
            value_name="value",
        )
        .dropna(subset=["value"])
    )
    long["metric"] = long["column"].map(cols)
    out = (
        long.groupby([*dict.fromkeys(("model", *by)), "metric"], dropna=False)["value"]
        .agg(value="mean", n="count")
        .reset_index()
    )
    return out[[*dict.fromkeys(("model", *by)), "metric", "value", "n"]]


def overall(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Summary over all tasks (``task`` = ``all``) plus the per-task rows."""
    everything = summarize(outcomes.assign(task="all"))
    return pd.concat([everything, summarize(outcomes)], ignore_index=True)


__all__ = [
    "SCORERS",
    "ScoreSource",
    "add_scores",
    "label_metrics",
    "macro_f1",
    "metric_columns",
    "overall",
    "score_outputs",
    "summarize",
]
