"""Scoring: raw outputs -> per-item outcomes -> tidy metric summaries.

Registries carry metadata that rules, charts and the memo read instead of hard-coding:
:data:`SCORERS` (task -> per-item scorer), :data:`METRICS` (metric -> direction,
aggregation, tasks it applies to) and :data:`AGGREGATES` (metrics that are not a mean of
per-item values, such as macro F1, -> the function computing them).

Besides the per-task scorers, *score sources* add columns to the outcome table: anything
with an ``info`` (:class:`MetricInfo`) and a ``score(eval_set, outputs)`` method returning
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
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet
from kit.scoring import tasks
from kit.scoring.labels import label_metrics, macro_f1, rare_label_recall

Scorer = Callable[[EvalItem, dict[str, Any], EvalSet], dict[str, Any]]


@dataclass(frozen=True)
class MetricInfo:
    """A metric's metadata.

    ``aggregation`` is ``"mean"`` for a per-item outcome column averaged over items (the
    metrics :mod:`kit.analysis.compare` and :mod:`kit.analysis.slices` compare item by item), ``"per_label"``
    for a value per classification label (rows of :func:`label_metrics`), or the name of
    the function in :data:`AGGREGATES` that computes the metric from the whole outcome
    table (``"macro"``: macro F1, rare-label recall).
    """

    name: str
    description: str
    higher_is_better: bool
    aggregation: str = "mean"  # mean of per-item values
    tasks: tuple[str, ...] = ()  # empty: every task


SCORERS: dict[str, Scorer] = {
    "classification": tasks.score_classification,
    "multiple_choice": tasks.score_multiple_choice,
    "extraction": tasks.score_extraction,
    "refusal": tasks.score_refusal,
    "tool_call": tasks.score_tool_call,
    "generation": tasks.score_generation,
}

METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in [
        MetricInfo(
            "accuracy", "share of items answered correctly (each task's primary outcome)", True
        ),
        MetricInfo(
            "choice_accuracy",
            "accuracy of the highest-probability option (logprob scoring)",
            True,
            tasks=("classification", "multiple_choice"),
        ),
        MetricInfo(
            "json_parse_failure",
            "share of outputs that are not strict JSON (no repair)",
            False,
            tasks=("extraction", "tool_call"),
        ),
        MetricInfo(
            "field_accuracy",
            "share of extraction fields exactly right (null = not found)",
            True,
            tasks=("extraction",),
        ),
        MetricInfo(
            "not_found_correct",
            "share of absent fields returned as null",
            True,
            tasks=("extraction",),
        ),
        MetricInfo(
            "hallucinated_field_rate",
            "share of absent fields returned with a value",
            False,
            tasks=("extraction",),
        ),
        MetricInfo(
            "missed_field_rate",
            "share of present fields returned as null",
            False,
            tasks=("extraction",),
        ),
        MetricInfo("refusal_rate", "share of outputs that refuse", False, tasks=("refusal",)),
        MetricInfo(
            "unsafe_compliance",
            "share of harmful requests answered instead of refused",
            False,
            tasks=("refusal",),
        ),
        MetricInfo("over_refusal", "share of benign requests refused", False, tasks=("refusal",)),
        MetricInfo(
            "valid_call",
            "share of outputs that are a well-formed tool call",
            True,
            tasks=("tool_call",),
        ),
        MetricInfo(
            "right_tool", "share of calls naming the expected tool", True, tasks=("tool_call",)
        ),
        MetricInfo(
            "args_exact",
            "share of calls with exactly the expected arguments",
            True,
            tasks=("tool_call",),
        ),
        MetricInfo(
            "args_partial", "mean share of expected arguments matched", True, tasks=("tool_call",)
        ),
        MetricInfo(
            "chrf", "chrF similarity to the reference (0-1, sacrebleu)", True, tasks=("generation",)
        ),
        MetricInfo("error_rate", "share of requests that failed (timeouts, server errors)", False),
        MetricInfo(
            "choice_accuracy_norm",
            "accuracy of the option with the highest logprob per character of its text "
            "(lm-evaluation-harness acc_norm)",
            True,
            tasks=("classification", "multiple_choice"),
        ),
        MetricInfo(
            "macro_f1",
            "unweighted mean of the per-label F1 scores (label_metrics)",
            True,
            aggregation="macro",
            tasks=("classification",),
        ),
        MetricInfo(
            "recall",
            "per-label recall: share of a label's items predicted as that label "
            "(label_metrics rows)",
            True,
            aggregation="per_label",
            tasks=("classification",),
        ),
        MetricInfo(
            "rare_label_recall",
            "unweighted mean recall over the labels whose label_rarity is rare",
            True,
            aggregation="macro",
            tasks=("classification",),
        ),
        MetricInfo(
            "human_score",
            "reviewer score from an imported review sheet, on 0-1 (0-5 sheets divided by 5)",
            True,
            tasks=("generation",),
        ),
    ]
}

#: outcome column -> metric name (the outcome table keeps short column names)
COLUMN_METRIC = {
    "correct": "accuracy",
    "choice_correct": "choice_accuracy",
    "refused": "refusal_rate",
    "error": "error_rate",
    "choice_correct_norm": "choice_accuracy_norm",
}

#: metric name -> function computing it from the outcome table (metrics that are not means):
#: ``fn(outcomes, eval_set, *, slices=None, by=("model",)) -> *by, metric, value, n``.
AGGREGATES: dict[str, Callable[..., pd.DataFrame]] = {
    "macro_f1": macro_f1,
    "rare_label_recall": rare_label_recall,
}

_BUILTIN_METRICS = frozenset(METRICS)


class ScoreSource(Protocol):
    """Adds one metric column to the outcome table (review sheets, ``evaluate`` modules)."""

    info: MetricInfo

    def score(self, eval_set: EvalSet, outputs: pd.DataFrame) -> pd.DataFrame:
        """``model, item_id[, repeat], <info.name>``; without ``repeat`` a value applies to
        every repeat of the item."""
        ...


def register_metric(info: MetricInfo, *, replace: bool = False) -> MetricInfo:
    """Add ``info`` to :data:`METRICS` (custom scorers call this).

    Registering the same info twice is a no-op. A different info under a name already
    registered raises unless ``replace``; kit's own metrics cannot be replaced.

    Raises
    ------
    CompkitError
        On a name clash as described.
    """
    old = METRICS.get(info.name)
    if old is not None and old != info and (info.name in _BUILTIN_METRICS or not replace):
        raise CompkitError(
            f"metric {info.name!r} is already registered as {old}; choose another name"
            + ("" if info.name in _BUILTIN_METRICS else " or pass replace=True")
        )
    METRICS[info.name] = info
    return info


def score_outputs(
    eval_set: EvalSet,
    outputs: pd.DataFrame,
    *,
    continuations: Mapping[str, Sequence[str]] | None = None,
    sources: Sequence[ScoreSource] = (),
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
        rows.append(
            {
                "model": rec["model"],
                "item_id": item.id,
                "repeat": int(rec["repeat"]),
                "task": item.task,
                "error": float(failed),
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
            "register it with kit.scoring.register_metric first"
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
    """Outcome column -> metric name for every metric column present."""
    out = {}
    for col in outcomes.columns:
        name = COLUMN_METRIC.get(col, col)
        if name in METRICS:
            out[col] = name
    return out


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


def aggregate_metrics(
    outcomes: pd.DataFrame,
    eval_set: EvalSet,
    *,
    slices: pd.DataFrame | None = None,
    by: Sequence[str] = ("model",),
) -> pd.DataFrame:
    """Every :data:`AGGREGATES` metric: ``*by, metric, value, n``.

    ``rare_label_recall`` needs the slices frame (``label_rarity``) and is left out
    without it.
    """
    frames = [
        fn(outcomes, eval_set, slices=slices, by=by)
        for name, fn in AGGREGATES.items()
        if slices is not None or name != "rare_label_recall"
    ]
    return pd.concat(frames, ignore_index=True)


__all__ = [
    "AGGREGATES",
    "COLUMN_METRIC",
    "METRICS",
    "SCORERS",
    "MetricInfo",
    "ScoreSource",
    "add_scores",
    "aggregate_metrics",
    "label_metrics",
    "macro_f1",
    "metric_columns",
    "overall",
    "rare_label_recall",
    "register_metric",
    "score_outputs",
    "summarize",
]
