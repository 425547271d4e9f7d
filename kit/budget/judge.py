"""Judging the budget: rules + evidence -> one verdict per candidate and rule, then a decision.

The evidence is the long frame of :data:`kit.analysis.compare.RESULT_COLUMNS` that the stages
write (one row per model, metric and slice, each interval with its method). A rule bounds
one quantity of one row: the candidate's ``value`` (absolute rules), its ``delta`` against the
baseline (change rules in points or units, and "must not increase"), or ``rel`` (relative
rules). The verdict reads that quantity's interval:

``pass``          the whole interval satisfies the bound;
``fail``          the whole interval breaks it;
``inconclusive``  the interval straddles the limit, or no interval can be formed (too few
                  items for a bootstrap); the reason says why in plain words and how many
                  items would decide it (:func:`kit.stats.power.items_to_decide`);
``not measured``  the evidence has no row for the metric and slice (a stage has not run).

A 95% interval judged against a one-sided limit errs on each side at most 2.5% of the time:
a candidate whose true value breaks the rule passes it at most 2.5% of the time, one whose
true value meets it fails at most 2.5% (``benchmarks/verdict_calibration.py`` measures this
for every rule kind at n = 5 ... 1,500).

A candidate is ``accepted`` only when every rule passes: an intersection-union test, whose
error of accepting a candidate that breaks any rule stays at most 2.5% without a correction for
the number of rules (Berger 1982). It is ``rejected`` when any rule fails (each rule's false
fail rate is at most 2.5%, so with k rules a compliant candidate is wrongly rejected at most
k x 2.5% of the time), else ``inconclusive``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from kit.budget.grammar import AbsoluteBound, Budget, Op, Rule
from kit.errors import CompkitError
from kit.metrics import MetricSpec, format_interval, format_value
from kit.metrics import metric as metric_spec
from kit.stats.intervals import METHODS, check_confidence
from kit.stats.power import items_to_decide, paired_null_variance, scaled_items_to_decide

Verdict = Literal["pass", "fail", "inconclusive", "not measured"]
VERDICTS = ("pass", "fail", "inconclusive", "not measured")
DECISIONS = ("accepted", "rejected", "inconclusive")
#: Columns of :func:`evaluate_rules`, in order.
VERDICT_COLUMNS = [
    "candidate",
    "rule_id",
    "rule",
    "why",
    "metric",
    "slice",
    "quantity",
    "op",
    "threshold",
    "unit",
    "observed",
    "baseline",
    "ci_low",
    "ci_high",
    "n",
    "method",
    "confidence",
    "verdict",
    "reason",
    "n_needed",
]
DECISION_COLUMNS = [
    "candidate",
    "decision",
    "n_rules",
    "n_pass",
    "n_fail",
    "n_inconclusive",
    "n_not_measured",
    "reason",
]
#: Evidence columns :func:`evaluate_rules` needs.
EVIDENCE_REQUIRED = ["model", "slice", "slice_value", "metric"]
#: Evidence columns read when present (the rest of :data:`kit.analysis.compare.RESULT_COLUMNS`).
EVIDENCE_OPTIONAL = [
    "n",
    "value",
    "value_ci_low",
    "value_ci_high",
    "baseline_value",
    "delta",
    "ci_low",
    "ci_high",
    "rel",
    "rel_ci_low",
    "rel_ci_high",
    "p_value",
    "value_method",
    "delta_method",
    "rel_method",
    "n_base_only",
    "n_cand_only",
    "confidence",
    "note",
]
_QUANTITY_COLUMNS = {
    "value": ("value", "value_ci_low", "value_ci_high", "value_method"),
    "change": ("delta", "ci_low", "ci_high", "delta_method"),
    "relative change": ("rel", "rel_ci_low", "rel_ci_high", "rel_method"),
}


# --------------------------------------------------------------------------- measure


@dataclass(frozen=True)
class Measure:
    """The quantity a rule bounds, read from one evidence row."""

    quantity: str
    estimate: float
    low: float
    high: float
    method: str
    n: float
    baseline: float
    note: str
    row: Mapping[str, Any]


def _num(row: Mapping[str, Any], key: str) -> float:
    try:
        return float(row.get(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    return value if isinstance(value, str) else ""


def measure(rule: Rule, row: Mapping[str, Any]) -> Measure | str:
    """The bounded quantity and its interval; a string says why it cannot be measured."""
    quantity = rule.quantity
    est_col, lo_col, hi_col, method_col = _QUANTITY_COLUMNS[quantity]
    baseline = _num(row, "baseline_value")
    if quantity != "value" and not math.isfinite(baseline):
        return "the evidence has no baseline value, so the change cannot be measured"
    estimate = _num(row, est_col)
    if quantity == "change" and not math.isfinite(estimate):
        estimate = _num(row, "value") - baseline
    return Measure(
        quantity=quantity,
        estimate=estimate,
        low=_num(row, lo_col),
        high=_num(row, hi_col),
        method=_text(row, method_col),
        n=_num(row, "n"),
        baseline=baseline,
        note=_text(row, "note"),
        row=row,
    )


def _inside(x: float, op: Op, t: float) -> bool:
    tol = 1e-9 * max(1.0, abs(t))
    if op == "<":
        return x < t - tol
    if op == "<=":
        return x <= t + tol
    if op == ">":
        return x > t + tol
    return x >= t - tol


def judge(low: float, high: float, op: Op, threshold: float) -> str:
    """``pass`` if all of [low, high] satisfies ``op threshold``, ``fail`` if none of it does,
    else ``inconclusive``. The bound's own inclusivity decides an end on the threshold
    (values within 1e-9 of it count as on it)."""
    far, near = (high, low) if op in ("<", "<=") else (low, high)
    if _inside(far, op, threshold):
        return "pass"
    if not _inside(near, op, threshold):
        return "fail"
    return "inconclusive"


# --------------------------------------------------------------------------- items to decide


def items_needed(rule: Rule, m: Measure, *, confidence: float) -> float:
    """Items at which a fresh study would decide the rule with 80% predictive power
    (:func:`kit.stats.power.items_to_decide`)."""
    t = rule.bound.threshold
    if not math.isfinite(m.n) or m.n <= 0 or not math.isfinite(m.estimate):
        return math.nan
    if m.method == "clopper_pearson":
        p = m.estimate
        return items_to_decide(
            estimate=p,
            limit=t,
            variance=p * (1 - p),
            null_variance=t * (1 - t),
            n=m.n,
            confidence=confidence,
        )
    if m.method in ("tango_cc", "tang_cc", "tango"):
        b, c = _num(m.row, "n_base_only"), _num(m.row, "n_cand_only")
        delta = (c - b) / m.n
        limit = t * m.baseline if m.method == "tang_cc" else t
        return items_to_decide(
            estimate=delta,
            limit=limit,
            variance=(b + c) / m.n - delta**2,
            null_variance=paired_null_variance(limit, b, c, m.n),
            n=m.n,
            confidence=confidence,
        )
    toward = m.high if t > m.estimate else m.low
    return scaled_items_to_decide(
        estimate=m.estimate,
        limit=t,
        half_width=abs(toward - m.estimate),
        n=m.n,
        confidence=confidence,
    )


# --------------------------------------------------------------------------- rules


def _check_evidence(evidence: pd.DataFrame, confidence: float) -> pd.DataFrame:
    missing = [c for c in EVIDENCE_REQUIRED if c not in evidence.columns]
    if missing:
        raise CompkitError(
            f"evidence lacks column(s) {missing}; expected the long result frame of "
            "kit.analysis.compare.compare_models (model, slice, slice_value, metric, ...)"
        )
    frame = evidence.reindex(columns=[*dict.fromkeys([*evidence.columns, *EVIDENCE_OPTIONAL])])
    frame = frame.assign(slice_value=frame["slice_value"].astype(str))
    dup = frame.duplicated(["model", "metric", "slice", "slice_value"], keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        raise CompkitError(
            f"evidence has {int(dup.sum())} duplicated rows, e.g. model {first['model']!r}, "
            f"metric {first['metric']!r}, slice {first['slice']}={first['slice_value']}; "
            "give one row per candidate, metric and slice"
        )
    levels = pd.to_numeric(frame["confidence"], errors="coerce").dropna().unique()
    off = [float(x) for x in levels if abs(float(x) - confidence) > 1e-9]
    if off:
        raise CompkitError(
            f"the evidence holds intervals at {off} but the verdict asks for {confidence}; "
            "rerun the stages so every interval has the study's confidence level"
        )
    return frame


def evaluate_rules(
    rules: Budget | Sequence[Rule],
    *,
    evidence: pd.DataFrame,
    candidates: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Judge every rule for every candidate: one verdict row each (:data:`VERDICT_COLUMNS`).

    Parameters
    ----------
    rules
        A :class:`~kit.budget.grammar.Budget` (normally the frozen one) or rules.
    evidence
        The long evidence frame (:data:`kit.analysis.compare.RESULT_COLUMNS`), one row per
        candidate, metric and slice; its intervals must have level ``confidence``.
    candidates
        Default: every model in ``evidence`` (in order). A candidate without rows gets
        ``not measured`` verdicts.
    confidence
        The level the evidence was computed at (checked against its ``confidence`` column).

    Returns
    -------
    DataFrame
        ``observed`` and its interval are the bounded quantity: the candidate's value, its
        change (candidate - baseline), or its relative change (change / baseline), shares as
        fractions; ``method`` names the interval (:data:`kit.stats.intervals.METHODS`);
        ``n_needed`` (undecided rules) the items that would decide it.
    """
    check_confidence(confidence)
    rule_list = list(rules.rules if isinstance(rules, Budget) else rules)
    frame = _check_evidence(evidence, confidence)
    models = list(candidates) if candidates is not None else list(dict.fromkeys(frame["model"]))
    if not models:
        raise CompkitError("no candidate to judge: the evidence is empty and no candidates given")
    index = {
        (str(r["model"]), str(r["metric"]), str(r["slice"]), str(r["slice_value"])): r
        for r in frame.to_dict("records")
    }
    rows = [_verdict_row(rule, m, index, confidence) for m in models for rule in rule_list]
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _verdict_row(rule: Rule, model: str, index, confidence: float) -> dict[str, Any]:
    spec = metric_spec(rule.metric)
    where = (rule.slice.column, rule.slice.value) if rule.slice else ("overall", "all")
    base = {
        "candidate": model,
        "rule_id": rule.id,
        "rule": rule.text,
        "why": rule.why,
        "metric": rule.metric,
        "slice": rule.slice_label,
        "quantity": rule.quantity,
        "op": rule.bound.op,
        "threshold": rule.bound.threshold,
        "unit": spec.unit,
        "confidence": confidence,
        "n_needed": math.nan,
    }
    row = index.get((model, rule.metric, *where))
    if row is None:
        return {**base, "verdict": "not measured", "reason": _missing_reason(rule, spec)}
    m = measure(rule, row)
    if isinstance(m, str):
        return {**base, "n": _num(row, "n"), "verdict": "not measured", "reason": m}
    out = {
        **base,
        "observed": m.estimate,
        "baseline": m.baseline,
        "ci_low": m.low,
        "ci_high": m.high,
        "n": m.n,
        "method": m.method,
    }
    if math.isnan(m.low) or math.isnan(m.high):
        return {**out, "verdict": "inconclusive", "reason": _no_interval_reason(rule, m, spec)}
    verdict = judge(m.low, m.high, rule.bound.op, rule.bound.threshold)
    if verdict == "inconclusive":
        out["n_needed"] = items_needed(rule, m, confidence=confidence)
    reason = _reason(rule, m, spec, verdict, out["n_needed"], confidence)
    return {**out, "verdict": verdict, "reason": reason}


# --------------------------------------------------------------------------- decision


def decide(verdicts: pd.DataFrame) -> pd.DataFrame:
    """One decision per candidate from :func:`evaluate_rules` rows.

    ``rejected`` if any rule fails; else ``inconclusive`` if any rule is inconclusive or
    not measured; else ``accepted`` (every rule passed: the intersection-union test).
    """
    rows = []
    for candidate, group in verdicts.groupby("candidate", sort=False):
        counts = {v: int((group["verdict"] == v).sum()) for v in VERDICTS}
        if counts["fail"]:
            decision = "rejected"
        elif counts["inconclusive"] or counts["not measured"]:
            decision = "inconclusive"
        else:
            decision = "accepted"
        rows.append(
            {
                "candidate": candidate,
                "decision": decision,
                "n_rules": len(group),
                "n_pass": counts["pass"],
                "n_fail": counts["fail"],
                "n_inconclusive": counts["inconclusive"],
                "n_not_measured": counts["not measured"],
                "reason": _decision_reason(decision, group),
            }
        )
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


def _decision_reason(decision: str, group: pd.DataFrame) -> str:
    if decision == "accepted":
        return f"passes all {len(group)} rule(s)"
    parts = []
    for verdict, label in (
        ("fail", "fails"),
        ("inconclusive", "undecided"),
        ("not measured", "not measured"),
    ):
        rules = group.loc[group["verdict"] == verdict, "rule"]
        if len(rules):
            parts.append(f"{label}: " + ", ".join(f"'{r}'" for r in rules))
    return "; ".join(parts)


# --------------------------------------------------------------------------- reasons


def _kind(rule: Rule) -> str | bool:
    if isinstance(rule.bound, AbsoluteBound):
        return False
    return "relative" if rule.bound.kind == "relative" else "points"


def _limit_text(rule: Rule, spec: MetricSpec) -> str:
    return rule.bound.describe(spec.unit, short=True)


def _where(rule: Rule) -> str:
    return f" on {rule.slice}" if rule.slice else ""


def _missing_reason(rule: Rule, spec: MetricSpec) -> str:
    return (
        f"not measured: no {spec.name}{_where(rule)} for this candidate in the evidence "
        f"(the {spec.stage} stage reports it; has it run?)"
    )


def _head(rule: Rule, m: Measure, spec: MetricSpec, confidence: float) -> str:
    what = {"value": spec.name, "change": "change", "relative change": "relative change"}
    est = format_value(m.estimate, unit=spec.unit, quantity=m.quantity)
    interval = format_interval(m.low, m.high, unit=spec.unit, quantity=m.quantity)
    method = METHODS.get(m.method, m.method or "interval")
    items = f"{int(m.n):,} item{'s' if m.n != 1 else ''}" if math.isfinite(m.n) else "? items"
    return (
        f"{what[m.quantity]} {est} ({confidence * 100:g}% CI {interval}; {method}; "
        f"{items}{_where(rule)})"
    )


def _no_interval_reason(rule: Rule, m: Measure, spec: MetricSpec) -> str:
    est = format_value(m.estimate, unit=spec.unit, quantity=m.quantity)
    why = m.note or "no interval could be formed from this evidence"
    return (
        f"{m.quantity} {est} on {int(m.n) if math.isfinite(m.n) else '?'} items{_where(rule)} "
        f"vs limit {_limit_text(rule, spec)}: {why}, so the rule is not decided"
    )


def _reason(
    rule: Rule, m: Measure, spec: MetricSpec, verdict: str, n_needed: float, confidence: float
) -> str:
    head = _head(rule, m, spec, confidence)
    limit = _limit_text(rule, spec)
    if verdict == "pass":
        return f"{head} is inside the limit {limit}: the whole interval satisfies it"
    if verdict == "fail":
        return f"{head} breaks the limit {limit}: the whole interval lies outside it"
    span = m.high - m.low
    if math.isfinite(span):
        width = format_value(span, unit=spec.unit, quantity=m.quantity).lstrip("+")
        gap = f"{int(m.n):,} items give an interval {width} wide"
    else:
        gap = f"{int(m.n):,} items leave the interval unbounded"
    if np.isfinite(n_needed):
        more = (
            f"about {int(n_needed):,} items would decide it (80% chance over the truths these "
            "items still allow)"
        )
    else:
        more = (
            "no affordable number of items is likely to decide it (the truth may sit on the limit)"
        )
    if abs(m.estimate - rule.bound.threshold) <= 1e-12:
        more += (
            "; the estimate sits exactly on the limit, and a candidate whose truth is on it "
            "(no change against a zero-tolerance rule) never passes: a rule that must pass "
            "an unchanged model needs a tolerance"
        )
    return f"{head} straddles the limit {limit}: {gap}, which cannot decide it; {more}"
