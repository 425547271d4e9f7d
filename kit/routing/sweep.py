"""Sweeping the router's threshold, and choosing it without touching the judged items.

:func:`deferral_curve` gives, for every threshold, the blended system's value of every budget
metric (overall and on the budget's slices, with the same intervals as any candidate) and its
system figures (fallback rate, blended p95 latency, blended cost, saving), in one long frame:
:data:`kit.analysis.compare.RESULT_COLUMNS` + ``threshold``.

The threshold that is judged is never tuned on the items it is judged on
(:func:`select_threshold`):

``split``     items are split once (seeded, stratified by task) into a calibration part, on
              which the threshold is chosen, and a held-out part, on which the routed system
              is judged. The judged rule is exactly the rule to deploy.
``crossfit``  items are split into ``folds``; each fold is routed with the threshold chosen
              on the other folds, and the routed system is judged on every item, each routed
              out of fold. The rule to deploy is the threshold chosen on all items; the
              judged system used the fold thresholds (reported), an honest estimate of how
              a rule chosen this way performs on new items.

The choice (:func:`choose_threshold`): the lowest fallback rate (then the lowest threshold)
whose calibration point estimates meet every budget rule the routing evidence measures, among
thresholds with a fallback rate within ``max_fallback_rate``. When none meets every rule,
the one meeting the most (then the lowest fallback rate) is taken and ``feasible`` is False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kit.analysis.compare import RESULT_COLUMNS
from kit.budget.judge import _inside
from kit.errors import CompkitError
from kit.routing.policies import confidence_signal
from kit.routing.simulate import (
    Pairing,
    blended_outcomes,
    budget_rows,
    evidence_row,
    system_figures,
    threshold_grid,
)

CURVE_COLUMNS = [*RESULT_COLUMNS, "threshold"]
#: System metrics (registered in :mod:`kit.metrics`, stage ``routing``) and their intervals.
SYSTEM_METRICS = {
    "fallback_rate": ("fallback_rate", "fallback_ci_low", "fallback_ci_high", "clopper_pearson"),
    "blended_latency_p95_ms": (
        "latency_p95_ms",
        "latency_p95_ci_low",
        "latency_p95_ci_high",
        "order_statistic",
    ),
    "routing_cost_saving": ("cost_saving", "saving_ci_low", "saving_ci_high", "bca_bootstrap"),
}
COST_METRICS = {"USD": "blended_cost_per_request_usd", "compute_s": "blended_compute_s_per_request"}


def system_rows(
    pairing: Pairing,
    routed: np.ndarray,
    *,
    name: str,
    confidence: float,
    seed: int = 0,
    large_only: bool = False,
) -> list[dict]:
    """Evidence rows of the system figures of ``name`` (the large model alone, without a
    small model in front, as ``baseline_value``)."""
    fig = system_figures(pairing, routed, confidence=confidence, seed=seed, large_only=large_only)
    ref = system_figures(pairing, routed, confidence=confidence, seed=seed, large_only=True)
    rows = []
    n = int(fig["n"])
    for metric, (est, low, high, method) in SYSTEM_METRICS.items():
        base = float(ref[est]) if metric != "fallback_rate" else np.nan
        rows.append(
            evidence_row(
                name,
                metric,
                fig[est],
                fig[low],
                fig[high],
                n=n,
                method=method,
                confidence=confidence,
                baseline_value=base,
            )
        )
    unit = str(fig["cost_unit"])
    rows.append(
        evidence_row(
            name,
            COST_METRICS[unit],
            fig["cost_per_request"],
            fig["cost_ci_low"],
            fig["cost_ci_high"],
            n=n,
            method="bca_bootstrap",
            confidence=confidence,
            baseline_value=float(ref["cost_per_request"]),
        )
    )
    return rows


def deferral_curve(
    pairing: Pairing,
    policy,
    *,
    slices: pd.DataFrame,
    slice_columns: Sequence[str],
    metrics: Sequence[str] | None,
    confidence: float = 0.95,
    thresholds: Sequence[float] | None = None,
    extra: Sequence[float] = (),
    n_resamples: int = 500,
    seed: int = 0,
) -> pd.DataFrame:
    """Every threshold's blended system: :data:`CURVE_COLUMNS`, one row per threshold, metric
    and slice value (``model`` = ``t<k>``; ``threshold`` the value). ``thresholds`` default to
    :func:`~kit.routing.simulate.threshold_grid` of the policy's confidence signal; ``extra``
    are added (the chosen threshold, so the curve holds its exact point)."""
    signal = confidence_signal(policy)
    if signal is None:
        raise CompkitError(f"policy {policy.describe()!r} has no confidence threshold to sweep")
    grid = (
        np.asarray(thresholds, float)
        if thresholds is not None
        else threshold_grid(pairing.signals[signal].to_numpy(dtype=float))
    )
    grid = np.union1d(grid, np.asarray(extra, float))
    names = [f"t{k}" for k in range(len(grid))]
    frames, system = [pairing.outcomes], []
    for name, t in zip(names, grid, strict=True):
        routed = policy.with_threshold(float(min(t, 1.0))).route(pairing.signals)
        if t > 1.0:  # just above the top confidence: everything goes by confidence
            routed = np.ones(len(routed), bool)
        frames.append(blended_outcomes(pairing, routed, name=name))
        system += system_rows(pairing, routed, name=name, confidence=confidence, seed=seed)
    rows = budget_rows(
        pd.concat(frames, ignore_index=True),
        slices,
        baseline=pairing.baseline,
        candidates=names,
        slice_columns=slice_columns,
        metrics=metrics,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    out = pd.concat([rows, pd.DataFrame(system)], ignore_index=True)
    out["threshold"] = out["model"].map(dict(zip(names, grid, strict=True)))
    return out[CURVE_COLUMNS]


def _point(rule, row: pd.Series) -> float:
    col = {"value": "value", "change": "delta", "relative change": "rel"}[rule.quantity]
    value = row.get(col)
    if rule.quantity == "change" and not np.isfinite(value):
        value = row.get("value") - row.get("baseline_value")
    return float(value)


def rules_met(curve: pd.DataFrame, rules: Sequence) -> pd.DataFrame:
    """Per threshold: how many of the measurable ``rules`` its point estimates meet.

    Columns ``threshold, fallback_rate, n_rules, n_met``; a rule whose metric and slice the
    curve lacks (a serving latency) is not counted."""
    rows = []
    for t, group in curve.groupby("threshold", sort=True):
        index = {(r.metric, r.slice, str(r.slice_value)): r for r in group.itertuples()}
        n_rules = n_met = 0
        for rule in rules:
            where = (rule.slice.column, rule.slice.value) if rule.slice else ("overall", "all")
            row = index.get((rule.metric, *where))
            if row is None:
                continue
            point = _point(rule, pd.Series(row._asdict()))
            n_rules += 1
            n_met += bool(
                np.isfinite(point) and _inside(point, rule.bound.op, rule.bound.threshold)
            )
        fb = group.loc[group["metric"] == "fallback_rate", "value"]
        rows.append(
            {"threshold": t, "fallback_rate": float(fb.iloc[0]), "n_rules": n_rules, "n_met": n_met}
        )
    return pd.DataFrame(rows, columns=["threshold", "fallback_rate", "n_rules", "n_met"])


@dataclass(frozen=True)
class Choice:
    threshold: float
    fallback_rate: float
    feasible: bool
    n_met: int
    n_rules: int


def choose_threshold(
    curve: pd.DataFrame, rules: Sequence, *, max_fallback_rate: float = 1.0
) -> Choice:
    """The threshold to deploy from a calibration curve (module docstring)."""
    met = rules_met(curve, rules)
    allowed = met[met["fallback_rate"] <= max_fallback_rate + 1e-12]
    if allowed.empty:
        allowed = met.nsmallest(1, "fallback_rate")
    ok = allowed[allowed["n_met"] == allowed["n_rules"]]
    pick = ok if len(ok) else allowed[allowed["n_met"] == allowed["n_met"].max()]
    best = pick.sort_values(["fallback_rate", "threshold"]).iloc[0]
    return Choice(
        float(best["threshold"]),
        float(best["fallback_rate"]),
        bool(len(ok)),
        int(best["n_met"]),
        int(best["n_rules"]),
    )


def _rank(item_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}|{item_id}".encode()).hexdigest()


def split_items(items: pd.DataFrame, *, share: float, seed: int) -> tuple[list[str], list[str]]:
    """``(calibration, held_out)`` item ids: within each task, items ordered by
    ``sha256(seed|id)``, the first ``round(share x n)`` (at least one, at most n - 1 when
    n > 1) calibrate."""
    cal, held = [], []
    for _, group in items.groupby("task", sort=True):
        ids = sorted(map(str, group["item_id"].unique()), key=lambda i: _rank(i, seed))
        k = round(share * len(ids))
        k = min(max(k, 1), len(ids) - 1) if len(ids) > 1 else len(ids)
        cal += ids[:k]
        held += ids[k:]
    if not cal or not held:
        raise CompkitError("too few items to split into calibration and held-out parts")
    return cal, held


def fold_items(items: pd.DataFrame, *, folds: int, seed: int) -> list[list[str]]:
    """Item ids in ``folds`` folds, each task dealt round-robin in ``sha256(seed|id)`` order."""
    out: list[list[str]] = [[] for _ in range(folds)]
    for _, group in items.groupby("task", sort=True):
        ids = sorted(map(str, group["item_id"].unique()), key=lambda i: _rank(i, seed))
        for k, item in enumerate(ids):
            out[k % folds].append(item)
    if any(not f for f in out):
        raise CompkitError(f"too few items for {folds} folds; lower routing.folds")
    return out


@dataclass(frozen=True)
class Selection:
    """How the judged threshold was chosen and where the routed system is judged.

    ``routed`` is aligned with ``judged.keys``; ``threshold`` is the rule to deploy;
    ``fold_thresholds`` (cross-fitting) the thresholds each fold was judged with.
    """

    method: str
    threshold: float
    feasible: bool
    calibration_items: tuple[str, ...]
    judged: Pairing
    routed: np.ndarray
    fold_thresholds: tuple[float, ...]
    calibration_curve: pd.DataFrame

    def describe(self) -> str:
        n_cal, n_judged = len(self.calibration_items), len(set(self.judged.keys["item_id"]))
        if self.method == "split":
            return (
                f"threshold chosen on a calibration split of {n_cal} items; the routed system "
                f"is judged on the {n_judged} held-out items it never saw"
            )
        spread = ", ".join(f"{t:.3g}" for t in self.fold_thresholds)
        return (
            f"cross-fitted over {len(self.fold_thresholds)} folds: each of the {n_judged} judged "
            f"items was routed with a threshold chosen on the other folds ({spread}); the rule "
            "to deploy is the threshold chosen on all items"
        )


def select_threshold(
    pairing: Pairing,
    policy,
    *,
    rules: Sequence,
    config,
    slices: pd.DataFrame,
    slice_columns: Sequence[str],
    metrics: Sequence[str] | None,
    confidence: float = 0.95,
) -> Selection:
    """Choose the threshold without the judged items (module docstring) and route those."""
    items = pairing.keys.merge(
        pairing.signals[["item_id", "repeat", "task"]].astype({"item_id": str}),
        on=["item_id", "repeat"],
    )

    def choose(ids):
        sub = pairing.subset(ids)
        curve = deferral_curve(
            sub,
            policy,
            slices=slices,
            slice_columns=slice_columns,
            metrics=metrics,
            confidence=confidence,
            seed=config.seed,
        )
        pick = choose_threshold(curve, rules, max_fallback_rate=config.max_fallback_rate)
        return pick, curve

    if config.selection == "split":
        cal, held = split_items(items, share=config.calibration_share, seed=config.seed)
        pick, curve = choose(cal)
        judged = pairing.subset(held)
        routed = policy.with_threshold(min(pick.threshold, 1.0)).route(judged.signals)
        if pick.threshold > 1.0:
            routed[:] = True
        return Selection(
            "split", pick.threshold, pick.feasible, tuple(cal), judged, routed, (), curve
        )
    return _crossfit(pairing, policy, items, config, choose)


def _crossfit(pairing: Pairing, policy, items: pd.DataFrame, config, choose) -> Selection:
    """Each fold routed with the threshold chosen on the other folds."""
    folds = fold_items(items, folds=config.folds, seed=config.seed)
    routed = np.zeros(len(pairing.keys), bool)
    chosen = []
    ids = pairing.keys["item_id"].astype(str)
    for fold in folds:
        rest = [i for f in folds if f is not fold for i in f]
        pick, _ = choose(rest)
        chosen.append(pick.threshold)
        mask = ids.isin(fold).to_numpy()
        fold_routed = policy.with_threshold(min(pick.threshold, 1.0)).route(pairing.signals)
        routed[mask] = True if pick.threshold > 1.0 else fold_routed[mask]
    final, curve = choose(None)
    return Selection(
        "crossfit",
        final.threshold,
        final.feasible,
        tuple(sorted(set(ids))),
        pairing,
        routed,
        tuple(chosen),
        curve,
    )


#: Columns of :func:`curve_points` (one row per threshold: what the charts draw).
POINT_COLUMNS = [
    "candidate",
    "split",
    "threshold",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "fallback_rate",
    "latency_p95_ms",
    "cost_per_request",
    "cost_saving",
]


def curve_points(
    curve: pd.DataFrame, *, metric: str = "accuracy", slice: str = "overall", slice_value="all"
) -> pd.DataFrame:
    """The deferral curve of one metric (overall or on one slice value) with each threshold's
    system figures, one row per candidate, split and threshold (:data:`POINT_COLUMNS`)."""
    need = {"candidate", "split", "threshold", "metric", "slice", "slice_value", "value"}
    missing = need - set(curve.columns)
    if missing:
        raise CompkitError(f"curve_points needs a routing_curve frame; it lacks {sorted(missing)}")
    keys = ["candidate", "split", "threshold"]
    want = curve[
        (curve["metric"] == metric)
        & (curve["slice"] == slice)
        & (curve["slice_value"].astype(str) == str(slice_value))
    ]
    if want.empty:
        raise CompkitError(f"the routing curve has no {metric} on {slice}={slice_value}")
    out = want[[*keys, "value", "value_ci_low", "value_ci_high"]].rename(
        columns={"value_ci_low": "ci_low", "value_ci_high": "ci_high"}
    )
    out["metric"] = metric
    system = curve[curve["metric"].isin([*SYSTEM_METRICS, *COST_METRICS.values()])]
    wide = system.pivot_table(index=keys, columns="metric", values="value").reset_index()
    cost = next((c for c in COST_METRICS.values() if c in wide.columns), None)
    wide = wide.rename(
        columns={
            "blended_latency_p95_ms": "latency_p95_ms",
            "routing_cost_saving": "cost_saving",
            **({cost: "cost_per_request"} if cost else {}),
        }
    )
    merged = out.merge(wide, on=keys, how="left")
    return merged.reindex(columns=POINT_COLUMNS).sort_values(keys).reset_index(drop=True)


def at_threshold(
    curve: pd.DataFrame, *, candidate: str, threshold: float, split: str = "judged"
) -> pd.DataFrame:
    """The routed system at the curve's threshold nearest ``threshold`` (one candidate and
    split): every metric's row, for exploring. The verdict never reads it."""
    mine = curve[(curve["candidate"] == candidate) & (curve["split"] == split)]
    if mine.empty:
        raise CompkitError(f"no {split} routing curve for candidate {candidate!r}")
    grid = np.sort(mine["threshold"].unique())
    nearest = grid[int(np.argmin(np.abs(grid - float(threshold))))]
    cols = ["metric", "slice", "slice_value", "n", "value", "value_ci_low", "value_ci_high"]
    cols += ["delta", "ci_low", "ci_high", "threshold"]
    return mine[mine["threshold"] == nearest][cols].reset_index(drop=True)
