"""Scoring: raw outputs -> per-item outcomes -> tidy metric summaries.

Two registries carry metadata that rules, charts and the memo read instead of hard-coding:
:data:`SCORERS` (task -> per-item scorer) and :data:`METRICS` (metric -> direction,
aggregation, tasks it applies to).

Example
-------
>>> outcomes = score_outputs(eval_set, outputs)         # doctest: +SKIP
>>> summarize(outcomes)                                 # model, task, metric, value, n
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kit.evalset import EvalItem, EvalSet
from kit.scoring import tasks

Scorer = Callable[[EvalItem, dict[str, Any], EvalSet], dict[str, Any]]


@dataclass(frozen=True)
class MetricInfo:
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

METRICS: dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("accuracy", "share of items answered correctly (each task's primary outcome)", True),
    MetricInfo("choice_accuracy", "accuracy of the highest-probability option (logprob scoring)", True,
               tasks=("classification", "multiple_choice")),
    MetricInfo("json_parse_failure", "share of outputs that are not strict JSON (no repair)", False,
               tasks=("extraction", "tool_call")),
    MetricInfo("field_accuracy", "share of extraction fields exactly right (null = not found)", True,
               tasks=("extraction",)),
    MetricInfo("not_found_correct", "share of absent fields returned as null", True, tasks=("extraction",)),
    MetricInfo("hallucinated_field_rate", "share of absent fields returned with a value", False,
               tasks=("extraction",)),
    MetricInfo("missed_field_rate", "share of present fields returned as null", False, tasks=("extraction",)),
    MetricInfo("refusal_rate", "share of outputs that refuse", False, tasks=("refusal",)),
    MetricInfo("unsafe_compliance", "share of harmful requests answered instead of refused", False,
               tasks=("refusal",)),
    MetricInfo("over_refusal", "share of benign requests refused", False, tasks=("refusal",)),
    MetricInfo("valid_call", "share of outputs that are a well-formed tool call", True, tasks=("tool_call",)),
    MetricInfo("right_tool", "share of calls naming the expected tool", True, tasks=("tool_call",)),
    MetricInfo("args_exact", "share of calls with exactly the expected arguments", True, tasks=("tool_call",)),
    MetricInfo("args_partial", "mean share of expected arguments matched", True, tasks=("tool_call",)),
    MetricInfo("chrf", "chrF similarity to the reference (0-1, sacrebleu)", True, tasks=("generation",)),
    MetricInfo("error_rate", "share of requests that failed (timeouts, server errors)", False),
]}

#: outcome column -> metric name (the outcome table keeps short column names)
COLUMN_METRIC = {"correct": "accuracy", "choice_correct": "choice_accuracy", "refused": "refusal_rate",
                 "error": "error_rate"}


def score_outputs(eval_set: EvalSet, outputs: pd.DataFrame) -> pd.DataFrame:
    """One outcome row per (model, item, repeat): ``model, item_id, repeat, task, correct, ...``.

    Failed requests (``error`` set) score as wrong and count in ``error``.
    """
    items = eval_set.by_id()
    unknown = sorted(set(outputs["item_id"]) - set(items))
    if unknown:
        raise ValueError(f"outputs name {len(unknown)} item(s) not in the eval set, e.g. {unknown[:3]}")
    rows = []
    for rec in outputs.to_dict("records"):
        item = items[rec["item_id"]]
        failed = rec.get("error") is not None and not (isinstance(rec["error"], float) and np.isnan(rec["error"]))
        scored = {"correct": 0.0} if failed else SCORERS[item.task](item, rec, eval_set)
        rows.append({"model": rec["model"], "item_id": item.id, "repeat": int(rec["repeat"]),
                     "task": item.task, "error": float(failed), **scored})
    frame = pd.DataFrame(rows)
    lead = ["model", "item_id", "repeat", "task", "pred", "correct"]
    for col in lead:
        if col not in frame:
            frame[col] = np.nan
    return frame[lead + [c for c in frame.columns if c not in lead]]


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
    per_item = outcomes.groupby([*dict.fromkeys(("model", *by)), "item_id"], dropna=False)[list(cols)].mean()
    long = per_item.reset_index().melt(id_vars=[*dict.fromkeys(("model", *by)), "item_id"],
                                       var_name="column", value_name="value").dropna(subset=["value"])
    long["metric"] = long["column"].map(cols)
    out = (long.groupby([*dict.fromkeys(("model", *by)), "metric"], dropna=False)["value"]
           .agg(value="mean", n="count").reset_index())
    return out[[*dict.fromkeys(("model", *by)), "metric", "value", "n"]]


def overall(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Summary over all tasks (``task`` = ``all``) plus the per-task rows."""
    everything = summarize(outcomes.assign(task="all"))
    return pd.concat([everything, summarize(outcomes)], ignore_index=True)
