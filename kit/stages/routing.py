"""Stage 6 glue: build the routed system of every candidate, judge-ready.

Reads a run (outcomes, stored outputs, the frozen slices and budget, serving timelines when
stage 5 ran) and writes:

``tables/routing_evidence.parquet``  the routed system ``<candidate>+router`` on the judged
                                      items: every item metric overall and per slice (as
                                      stage 3 computes them) and the system metrics
                                      (fallback rate, blended p95, cost, saving); plus each
                                      plain candidate's fallback rate (0: it has no router)
``tables/routing_curve.parquet``     the deferral curve: every threshold's metrics on the
                                      calibration items (what the threshold was chosen on)
                                      and on the judged items (shown, never tuned on)
``tables/routing_systems.parquet``   large-only, small-only and routed side by side on the
                                      judged items
``tables/routing_rules.parquet``     per candidate: the rule to deploy, how it was chosen,
                                      its fallback rate, saving, APGR and the oracle's
``tables/routing_oracle.parquet``    the oracle curve on the judged items
``tables/routing_items.parquet``     which items calibrated the threshold and which judged it
``routing.json``                     parameters and provenance

Example
-------
>>> result = run_routing("runs/demo")                                     # doctest: +SKIP
>>> result.rules[["candidate", "rule", "fallback_rate"]]                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kit.analysis.compare import RESULT_COLUMNS, flip_table
from kit.errors import CompkitError
from kit.routing.costs import request_costs
from kit.routing.policies import describe_rule, policy_from_config
from kit.routing.signals import build_signals
from kit.routing.simulate import (
    Pairing,
    apgr,
    blended_outcomes,
    budget_rows,
    evidence_row,
    oracle_curve,
    pair_models,
    routed_name,
)
from kit.routing.sweep import Selection, deferral_curve, select_threshold, system_rows
from kit.run import Run
from kit.stages.drilldown import flip_rate_evidence

TABLES = (
    "routing_evidence",
    "routing_curve",
    "routing_systems",
    "routing_rules",
    "routing_oracle",
    "routing_items",
)
REPORT = "routing.json"
RULE_COLUMNS = [
    "candidate",
    "system",
    "fallback",
    "rule",
    "threshold",
    "confidence_source",
    "selection",
    "selection_note",
    "feasible",
    "n_calibration",
    "n_judged",
    "fallback_rate",
    "cost_saving",
    "cost_unit",
    "latency_source",
    "apgr",
    "oracle_apgr",
]


@dataclass
class RoutingResult:
    """What :func:`run_routing` computed (the frames it wrote)."""

    evidence: pd.DataFrame
    curve: pd.DataFrame
    systems: pd.DataFrame
    rules: pd.DataFrame
    oracle: pd.DataFrame
    items: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    config_source: str = ""


def _budget_rules(run: Run) -> list:
    from kit.budget.frozen import load_frozen_budget

    return list(load_frozen_budget(run).rules) if run.frozen_budget is not None else []


def _slice_columns(run: Run, rules: list, config) -> list[str]:
    from kit.analysis.slices import default_slice_columns

    known = default_slice_columns(run.slices())
    wanted = ["task", *(r.slice.column for r in rules if r.slice), *config.slices]
    return [c for c in dict.fromkeys(wanted) if c in known]


def _metrics(rules: list, outcomes: pd.DataFrame) -> list[str]:
    from kit.metrics import METRICS

    names = ["accuracy", *(r.metric for r in rules)]
    names = ["accuracy" if n == "recall" else n for n in names]
    return [
        n
        for n in dict.fromkeys(names)
        if n in METRICS and METRICS[n].kind == "item" and METRICS[n].outcome_column in outcomes
    ]


def _side_by_side(
    judged: Pairing, routed: np.ndarray, *, slices, slice_columns, confidence, seed
) -> pd.DataFrame:
    """Large-only, small-only and routed on the judged items: value rows + system figures."""
    name = routed_name(judged.small)
    n = len(routed)
    systems = {
        f"{judged.large} only": np.ones(n, bool),
        f"{judged.small} only": np.zeros(n, bool),
        name: routed,
    }
    frames = [judged.outcomes]
    labels = {}
    for k, (label, r) in enumerate(systems.items()):
        frames.append(blended_outcomes(judged, r, name=f"s{k}"))
        labels[f"s{k}"] = label
    rows = budget_rows(
        pd.concat(frames, ignore_index=True),
        slices,
        baseline=judged.baseline,
        candidates=list(labels),
        slice_columns=slice_columns,
        metrics=None,
        confidence=confidence,
        n_resamples=1000,
        seed=seed,
    )
    sys_rows = []
    for k, (key, label) in enumerate(labels.items()):
        sys_rows += system_rows(
            judged, systems[label], name=key, confidence=confidence, seed=seed, large_only=k == 0
        )
    out = pd.concat([rows, pd.DataFrame(sys_rows)], ignore_index=True)
    out["system"] = out["model"].map(labels)
    alone = (out["model"] == "s0") & (out["metric"] == "fallback_rate")
    out.loc[alone, ["value", "value_ci_low", "value_ci_high"]] = np.nan
    out.loc[alone, "note"] = "no router: the large model answers every request"
    out["candidate"] = judged.small
    return out


@dataclass(frozen=True)
class _Context:
    """What every candidate's routing reads from the run."""

    run: Run
    config: Any
    rules: list
    fallback: str
    outcomes: pd.DataFrame
    outputs: pd.DataFrame
    slices: pd.DataFrame
    slice_columns: list[str]
    metrics: list[str]
    confidence: float
    timelines: pd.DataFrame | None


def _route_candidate(ctx: _Context, small: str) -> dict:
    config = ctx.config
    signals = build_signals(
        ctx.outputs, ctx.outcomes, model=small, slices=ctx.slices, quantile=config.token_quantile
    )
    costs = request_costs(ctx.run, [small, ctx.fallback], timelines=ctx.timelines)
    pairing = pair_models(
        ctx.outcomes, signals, costs, small=small, large=ctx.fallback, baseline=ctx.run.baseline
    )
    policy = policy_from_config(
        config,
        source=config.confidence,
        slice_columns=ctx.slice_columns,
        tasks=sorted(set(signals["task"])),
    )
    sel = select_threshold(
        pairing,
        policy,
        rules=ctx.rules,
        config=config,
        slices=ctx.slices,
        slice_columns=ctx.slice_columns,
        metrics=ctx.metrics,
        confidence=ctx.confidence,
    )
    return _record(ctx, sel, policy, costs)


def _judged_evidence(ctx: _Context, sel: Selection, name: str) -> pd.DataFrame:
    """The routed system's evidence on the judged items, and the plain candidate's fallback
    rate (0 by construction: it has no router)."""
    judged = sel.judged
    blended = blended_outcomes(judged, sel.routed, name=name)
    rows = budget_rows(
        pd.concat([judged.outcomes, blended], ignore_index=True),
        ctx.slices,
        baseline=ctx.run.baseline,
        candidates=[name],
        slice_columns=ctx.slice_columns,
        metrics=None,
        confidence=ctx.confidence,
        n_resamples=2000,
        seed=ctx.config.seed,
    )
    system = system_rows(judged, sel.routed, name=name, confidence=ctx.confidence)
    flips = flip_table(
        pd.concat([judged.outcomes, blended], ignore_index=True),
        baseline=ctx.run.baseline,
        candidates=[name],
        metric="correct",
    )
    flip_rows = flip_rate_evidence(flips, confidence=ctx.confidence)
    rows = pd.concat([rows, flip_rows], ignore_index=True)
    plain = evidence_row(
        judged.small,
        "fallback_rate",
        0.0,
        0.0,
        0.0,
        n=len(judged.keys),
        method="by_construction",
        confidence=ctx.confidence,
        note="no router: every request is answered by the candidate",
    )
    return pd.concat([rows, pd.DataFrame([*system, plain])], ignore_index=True)


def _summary(ctx, sel: Selection, policy, costs, evidence, shown, oracle) -> dict:
    """The ``routing_rules`` row of one candidate."""
    judged, name = sel.judged, routed_name(sel.judged.small)
    acc = shown[(shown["metric"] == "accuracy") & (shown["slice"] == "overall")]
    fb = shown[shown["metric"] == "fallback_rate"][["threshold", "value"]]
    points = acc[["threshold", "value"]].merge(fb, on="threshold", suffixes=("", "_fb"))
    points = points.rename(columns={"value_fb": "fallback_rate"})
    small_acc = float(np.nanmean(_column(judged, judged.small)))
    large_acc = float(np.nanmean(_column(judged, judged.large)))
    mine = evidence[evidence["model"] == name].set_index("metric")["value"]
    deploy = policy.with_threshold(min(sel.threshold, 1.0))
    return {
        "candidate": judged.small,
        "system": name,
        "fallback": ctx.fallback,
        "rule": describe_rule(deploy, fallback=ctx.fallback),
        "threshold": sel.threshold,
        "confidence_source": ctx.config.confidence,
        "selection": sel.method,
        "selection_note": sel.describe(),
        "feasible": sel.feasible,
        "n_calibration": len(sel.calibration_items),
        "n_judged": int(judged.keys["item_id"].nunique()),
        "fallback_rate": float(mine["fallback_rate"]),
        "cost_saving": float(mine["routing_cost_saving"]),
        "cost_unit": judged.cost_unit,
        "latency_source": "; ".join(sorted(set(costs["latency_source"]))),
        "apgr": apgr(points, small=small_acc, large=large_acc),
        "oracle_apgr": apgr(oracle, small=small_acc, large=large_acc),
    }


def _record(ctx: _Context, sel: Selection, policy, costs: pd.DataFrame) -> dict:
    judged, small = sel.judged, sel.judged.small
    evidence = _judged_evidence(ctx, sel, routed_name(small))
    shown = deferral_curve(
        judged,
        policy,
        slices=ctx.slices,
        slice_columns=ctx.slice_columns,
        metrics=ctx.metrics,
        confidence=ctx.confidence,
        extra=[sel.threshold],
        seed=ctx.config.seed,
    )
    curve = pd.concat(
        [sel.calibration_curve.assign(split="calibration"), shown.assign(split="judged")],
        ignore_index=True,
    ).assign(candidate=small)
    oracle = oracle_curve(judged).assign(candidate=small)
    systems = _side_by_side(
        judged,
        sel.routed,
        slices=ctx.slices,
        slice_columns=ctx.slice_columns,
        confidence=ctx.confidence,
        seed=ctx.config.seed,
    )
    rule = _summary(ctx, sel, policy, costs, evidence, shown, oracle)
    return {
        "evidence": evidence,
        "curve": curve,
        "systems": systems,
        "rule": rule,
        "oracle": oracle,
        "items": _item_roles(sel),
    }


def _item_roles(sel: Selection) -> pd.DataFrame:
    """Which items calibrated the threshold and which judged the routed system."""
    judged = sorted(set(sel.judged.keys["item_id"]))
    calibration = list(sel.calibration_items) if sel.method == "split" else []
    role = "judged (cross-fitted)" if sel.method == "crossfit" else "judged"
    return pd.DataFrame(
        {
            "candidate": sel.judged.small,
            "item_id": [*calibration, *judged],
            "role": ["calibration"] * len(calibration) + [role] * len(judged),
        }
    )


def _column(pairing: Pairing, model: str) -> np.ndarray:
    o = pairing.outcomes
    return o.loc[o["model"] == model, "correct"].to_numpy(dtype=float)


def routed_candidates(run: Run, config) -> tuple[str, list[str]]:
    """``(fallback, candidates to route)`` from the study's ``routing:`` block."""
    fallback = config.fallback or run.baseline
    have = [*run.candidates(), run.baseline]
    if fallback not in have:
        raise CompkitError(f"routing.fallback {fallback!r} has no stored outputs; models: {have}")
    names = config.candidates if config.candidates is not None else run.candidates()
    missing = [n for n in names if n not in have]
    if missing:
        raise CompkitError(f"routing.candidates {missing} have no stored outputs; models: {have}")
    return fallback, [n for n in names if n != fallback]


def routing_config(run: Run, study: str | Path | None = None) -> tuple[Any, str]:
    """The ``routing:`` block to build and where it came from: the study file's (when given)
    or the frozen study's; the note says when the two differ (the router was set after the
    baseline was frozen, which the memo reports)."""
    frozen = run.study.routing
    if study is None or not str(study).strip():
        if frozen is None:
            return None, "no routing: block in the frozen study: stage 6 has nothing to build"
        return frozen, "the frozen study's routing: block"
    from kit.study import load_study

    current = load_study(study).routing
    if current is None:
        return None, f"no routing: block in {study}: stage 6 has nothing to build"
    if current == frozen:
        return current, "the study's routing: block (as frozen)"
    return current, (
        f"the routing: block of {study}, edited after the baseline was frozen (the frozen copy "
        "differs): the threshold is still chosen on calibration items only"
    )


def run_routing(
    run: str | Path | Run,
    *,
    config: Any = None,
    study: str | Path | None = None,
    write: bool = True,
) -> RoutingResult:
    """Stage 6: the routed system of every candidate (module docstring), written to ``tables/``.

    Parameters
    ----------
    run
        A frozen run with outcomes (stage 2); serving timelines are used when stage 5 ran.
    config
        A :class:`kit.study.RoutingConfig` (default: :func:`routing_config`).
    study
        The study file whose ``routing:`` block to use (default: the frozen study's).
    write
        Write the tables and ``routing.json``.
    """
    run = Run.open(run)
    config, source = (
        (config, "given by the caller") if config is not None else routing_config(run, study)
    )
    if config is None:
        return _empty(source)
    rules = _budget_rules(run)
    outcomes = run.outcomes().astype({"item_id": str})
    fallback, names = routed_candidates(run, config)
    if not names:
        raise CompkitError(f"{run.root}: no candidate to route (fallback {fallback!r})")
    ctx = _Context(
        run,
        config,
        rules,
        fallback,
        outcomes,
        run.outputs().astype({"item_id": str}),
        run.slices(),
        _slice_columns(run, rules, config),
        _metrics(rules, outcomes),
        run.confidence,
        _timelines(run),
    )
    parts = [_route_candidate(ctx, n) for n in names]
    result = RoutingResult(
        evidence=pd.concat([p["evidence"] for p in parts], ignore_index=True)[RESULT_COLUMNS],
        curve=pd.concat([p["curve"] for p in parts], ignore_index=True),
        systems=pd.concat([p["systems"] for p in parts], ignore_index=True),
        rules=pd.DataFrame([p["rule"] for p in parts], columns=RULE_COLUMNS),
        oracle=pd.concat([p["oracle"] for p in parts], ignore_index=True),
        items=pd.concat([p["items"] for p in parts], ignore_index=True),
    )
    result.config_source = source
    if write:
        _write(run, result, config)
    return result


def _timelines(run: Run) -> pd.DataFrame | None:
    """The serving stage's per-request timelines (None before stage 5)."""
    from kit.stages.serving import load_timelines

    frame = load_timelines(run)
    return frame if not frame.empty else None


def _empty(source: str) -> RoutingResult:
    """Nothing routed (no ``routing:`` block): empty frames, nothing written."""
    return RoutingResult(
        evidence=pd.DataFrame(columns=RESULT_COLUMNS),
        curve=pd.DataFrame(),
        systems=pd.DataFrame(),
        rules=pd.DataFrame(columns=RULE_COLUMNS),
        oracle=pd.DataFrame(),
        items=pd.DataFrame(columns=["item_id", "role", "candidate"]),
        config_source=source,
    )


def _write(run: Run, result: RoutingResult, config) -> None:
    import json

    from kit.environment import kit_info
    from kit.store import atomic_write_text, now_iso

    for name in TABLES:
        frame = getattr(result, name.removeprefix("routing_"))
        result.paths[name] = run.write_table(name, frame)
    report = {
        "kind": "compkit.routing",
        "created_at": now_iso(),
        "config": config.model_dump(mode="json"),
        "config_source": result.config_source,
        "confidence": run.confidence,
        "rules": json.loads(result.rules.to_json(orient="records")),
        "kit": kit_info().model_dump(mode="json"),
    }
    atomic_write_text(run.root / REPORT, json.dumps(report, indent=2) + "\n")


def read_routing(run: str | Path | Run) -> RoutingResult | None:
    """The stored routing tables (None when stage 6 has not run)."""
    run = Run.open(run)
    if not all(run.has_table(n) for n in TABLES):
        return None
    frames = {n.removeprefix("routing_"): run.table(n) for n in TABLES}
    return RoutingResult(**frames)
