"""Answers obtained under load, scored like stage 3 and compared with unloaded ones.

Batching, queueing and a server's own policies (a cut stream) can change answers, so the
serving stage scores the outputs of every profile with :func:`kit.scoring.score_outputs`
(the scorers of stages 2-3) and compares them item by item:

* ``accuracy_under_load``: share of a profile's measured eval requests answered correctly
  (a failed request is a wrong answer, as in stage 3);
* ``parse_failure_under_load``: among answered requests of tasks with a format, the share
  whose answer could not be read: not strict JSON (extraction, tool calls) or naming no
  label / option (classification, multiple choice);
* against a reference profile of the same model (``synchronous``, or batch size 1):
  ``load_flip_rate`` (items whose correctness changed), ``answer_change_rate`` (items whose
  text changed) and the paired accuracy change (Tango's interval) on the items both answered;
* :func:`batch_flips`: the same comparison between batch size 1 and N in process, or
  concurrency 1 and N on a server: the batch-size part of the noise floor.

Every interval is from :mod:`kit.stats.intervals` (Clopper–Pearson, Tango).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kit.evalset import EvalSet
from kit.execute import OUTPUT_COLUMNS
from kit.scoring import score_outputs
from kit.stats.intervals import paired_difference_ci, proportion_ci

FORMAT_TASKS = ("extraction", "tool_call", "classification", "multiple_choice")
QUALITY_KEYS = ["model", "profile", "group", "slice", "slice_value"]


def served_outputs(timeline: pd.DataFrame) -> pd.DataFrame:
    """Measured eval requests as output rows (:data:`kit.execute.OUTPUT_COLUMNS`), one per
    model, profile and item (the first, when a profile cycled through the items)."""
    t = timeline[(timeline["phase"] == "measure") & timeline["item_id"].notna()]
    t = t.drop_duplicates(["model", "profile", "item_id"], keep="first")
    rows = pd.DataFrame(index=t.index, columns=OUTPUT_COLUMNS)
    rows["model"] = t["model"]
    rows["item_id"] = t["item_id"]
    rows["repeat"] = 0
    rows["output"] = t["output"].where(t["status"] == "ok", "")
    rows["error"] = t["error"].where(t["status"] != "ok", None)
    rows["error_class"] = t["error_class"]
    rows["output_tokens"] = t["output_tokens"]
    return rows.assign(**{k: t[k] for k in ["profile", "group", "slice", "slice_value"]})


def score_under_load(eval_set: EvalSet, timeline: pd.DataFrame) -> pd.DataFrame:
    """One outcome per model, profile and item: ``correct``, ``answered``,
    ``parse_failure`` (NaN where the task has no format or the request failed), the text."""
    rows = served_outputs(timeline)
    if rows.empty:
        return pd.DataFrame(
            columns=[
                *QUALITY_KEYS,
                "item_id",
                "task",
                "correct",
                "answered",
                "parse_failure",
                "output",
            ]
        )
    profiles = (
        rows[["profile", "group", "slice", "slice_value"]].drop_duplicates().reset_index(drop=True)
    )
    code = {p: i for i, p in enumerate(profiles["profile"])}
    scored = score_outputs(
        eval_set,
        rows.assign(repeat=rows["profile"].map(code)).drop(
            columns=["profile", "group", "slice", "slice_value"]
        ),
    )
    scored["profile"] = scored["repeat"].map(dict(enumerate(profiles["profile"])))
    scored = scored.merge(profiles, on="profile")
    answered = scored["error"] == 0
    scored["answered"] = answered.astype(float)
    scored["parse_failure"] = _parse_failure(scored).where(answered)
    texts = rows.set_index(["model", "profile", "item_id"])["output"]
    scored["output"] = [
        texts.get((m, p, i))
        for m, p, i in zip(scored["model"], scored["profile"], scored["item_id"], strict=True)
    ]
    return scored[
        [*QUALITY_KEYS, "item_id", "task", "correct", "answered", "parse_failure", "output"]
    ]


def _parse_failure(scored: pd.DataFrame) -> pd.Series:
    json_fail = (
        scored["json_parse_failure"]
        if "json_parse_failure" in scored
        else pd.Series(np.nan, index=scored.index)
    )
    no_pred = scored["pred"].isna().astype(float)
    choice = scored["task"].isin(("classification", "multiple_choice"))
    out = pd.Series(np.nan, index=scored.index)
    out[choice] = no_pred[choice]
    structured = scored["task"].isin(("extraction", "tool_call"))
    out[structured] = json_fail[structured]
    return out


def quality_table(
    outcomes: pd.DataFrame, *, references: dict[str, str], confidence: float = 0.95
) -> pd.DataFrame:
    """Per model and profile: ``accuracy_under_load``, ``parse_failure_under_load`` and,
    against ``references[model]`` (a profile name), ``load_flip_rate``,
    ``answer_change_rate`` and ``accuracy_change_vs_unloaded``: ``*QUALITY_KEYS, metric,
    value, ci_low, ci_high, n, method, reference``."""
    rows: list[dict[str, Any]] = []
    for key, g in outcomes.groupby(QUALITY_KEYS, sort=False, dropna=False):
        base = dict(zip(QUALITY_KEYS, key, strict=True))
        rows.append(_share(base, "accuracy_under_load", g["correct"], confidence))
        parse = g["parse_failure"].dropna()
        if len(parse):
            rows.append(_share(base, "parse_failure_under_load", parse, confidence))
        ref = references.get(base["model"])
        if ref is not None and ref != base["profile"]:
            other = outcomes[(outcomes["model"] == base["model"]) & (outcomes["profile"] == ref)]
            rows += [{**r, "reference": ref} for r in _versus(base, g, other, confidence)]
    columns = [*QUALITY_KEYS, "metric", "value", "ci_low", "ci_high", "n", "method", "reference"]
    return pd.DataFrame(rows, columns=columns)


def _share(
    base: dict[str, Any], metric: str, values: pd.Series, confidence: float
) -> dict[str, Any]:
    n, k = len(values), round(float(values.sum()))
    lo, hi = proportion_ci(k, n, confidence=confidence)
    value = k / n if n else math.nan
    return {
        **base,
        "metric": metric,
        "value": value,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": n,
        "method": "clopper_pearson",
    }


def _versus(base, g: pd.DataFrame, ref: pd.DataFrame, confidence: float) -> list[dict[str, Any]]:
    """Flips and the paired accuracy change of ``g`` against ``ref`` on shared items."""
    both = g.merge(ref, on="item_id", suffixes=("", "_ref"))
    n = len(both)
    if n == 0:
        return []
    lost = int(((both["correct_ref"] == 1) & (both["correct"] == 0)).sum())  # right -> wrong
    won = int(((both["correct_ref"] == 0) & (both["correct"] == 1)).sum())
    changed = (both["output"].fillna("") != both["output_ref"].fillna("")).astype(float)
    lo, hi = paired_difference_ci(lost, won, n, confidence=confidence)
    delta = (won - lost) / n
    flips = _share(
        base,
        "load_flip_rate",
        pd.Series([1.0] * (lost + won) + [0.0] * (n - lost - won)),
        confidence,
    )
    return [
        flips,
        _share(base, "answer_change_rate", changed, confidence),
        {
            **base,
            "metric": "accuracy_change_vs_unloaded",
            "value": delta,
            "ci_low": float(lo),
            "ci_high": float(hi),
            "n": n,
            "method": "tango_cc",
        },
    ]


def batch_flips(
    outcomes: pd.DataFrame, *, model: str, single: str, batched: str, confidence: float = 0.95
) -> dict[str, Any] | None:
    """Flip rate between the ``single`` profile (batch size 1, concurrency 1) and the
    ``batched`` one of ``model``, on the items both answered: ``batch_flip_rate`` (correctness
    changed), ``answer_change_rate``, counts and Clopper–Pearson CIs; None without shared items."""
    a = outcomes[(outcomes["model"] == model) & (outcomes["profile"] == single)]
    b = outcomes[(outcomes["model"] == model) & (outcomes["profile"] == batched)]
    both = a.merge(b, on="item_id", suffixes=("_single", "_batched"))
    both = both[(both["answered_single"] == 1) & (both["answered_batched"] == 1)]
    n = len(both)
    if n == 0:
        return None
    flips = int((both["correct_single"] != both["correct_batched"]).sum())
    changed = int((both["output_single"].fillna("") != both["output_batched"].fillna("")).sum())
    f_lo, f_hi = proportion_ci(flips, n, confidence=confidence)
    c_lo, c_hi = proportion_ci(changed, n, confidence=confidence)
    return {
        "model": model,
        "single": single,
        "batched": batched,
        "n": n,
        "flips": flips,
        "batch_flip_rate": flips / n,
        "ci_low": float(f_lo),
        "ci_high": float(f_hi),
        "changed": changed,
        "answer_change_rate": changed / n,
        "change_ci_low": float(c_lo),
        "change_ci_high": float(c_hi),
        "method": "clopper_pearson",
    }


def runtime_agreement(outcomes: pd.DataFrame, stored: pd.DataFrame) -> pd.DataFrame:
    """Share of each profile's served answers equal to the model's stage-2 (or frozen)
    output for the same item (repeat 0): the served runtime against the evaluated one.
    ``model, profile, n, same, share``."""
    if stored.empty or outcomes.empty:
        return pd.DataFrame(columns=["model", "profile", "n", "same", "share"])
    ref = stored[stored["repeat"] == 0][["model", "item_id", "output"]].rename(
        columns={"output": "stored"}
    )
    both = outcomes.merge(ref, on=["model", "item_id"])
    both["same"] = (both["output"].fillna("") == both["stored"].fillna("")).astype(int)
    table = (
        both.groupby(["model", "profile"], sort=False)["same"]
        .agg(n="count", same="sum")
        .reset_index()
    )
    table["share"] = table["same"] / table["n"]
    return table
