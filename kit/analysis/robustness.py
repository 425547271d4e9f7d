"""Robustness under perturbation: each model's change from an item to its perturbed copy.

Pairs are (original item, perturbed copy) of the study's perturbation suite
(:mod:`kit.perturb`). For a 0/1 metric M and one perturbation, per pair: the baseline's
values B (original) and B' (copy), the candidate's C and C'. Repeats are collapsed to the
majority outcome first (as for flips).

shift
    ``mean(C' - C)``: the candidate's own change under the perturbation (accuracy falls:
    negative). Its interval is Tango's paired score interval (the pairs are paired
    proportions of one model). The baseline's shift ``mean(B' - B)`` is ``baseline_value``.
robustness gap
    ``mean((C' - C) - (B' - B))``, the candidate's shift minus the baseline's: how much more
    the compressed model suffers from the perturbation. It is ``delta`` of the evidence row,
    with :func:`kit.stats.intervals.paired_gap_ci` (``tango_cc_gap``), valid at every n.
pooled over perturbations (slice ``overall``)
    A source item appears in one pair per perturbation, so pairs are not independent across
    perturbations: the pooled row averages each source item's pairs first (values in
    [-1, 1], gap in [-2, 2]) and uses the paired BCa bootstrap over source items (from
    :data:`kit.metrics.BOOTSTRAP_MIN_N` items; the exact zero-change bound when no source
    item's gap differs from 0).
perturbation flips
    ``1[C' != C]`` per pair (the perturbation changed the outcome) for each model;
    :func:`perturbation_flips` counts them by direction (right->wrong, wrong->right) with
    Clopper–Pearson intervals; ``perturbation_flip_rate`` rows compare the candidate's rate
    with the baseline's on the same pairs (Tango / Tang score intervals).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.analysis.compare import OVERALL, RESULT_COLUMNS, _collapse_values
from kit.errors import CompkitError
from kit.metrics import BOOTSTRAP_MIN_N, METRICS
from kit.stats.bootstrap import paired_bootstrap, zero_change_bound
from kit.stats.intervals import (
    paired_difference_ci,
    paired_gap_ci,
    paired_ratio_ci,
    proportion_ci,
)
from kit.stats.tests import mcnemar_test, paired_p_value

#: Columns of :func:`perturbation_pairs`.
PAIR_COLUMNS = ["model", "item_id", "source_id", "perturbation", "original", "perturbed"]
FLIP_COLUMNS = [
    "model",
    "metric",
    "perturbation",
    "flip",
    "count",
    "n",
    "rate",
    "rate_ci_low",
    "rate_ci_high",
    "confidence",
]
PERTURBATION_FLIPS = ("right_to_wrong", "wrong_to_right", "unchanged_right", "unchanged_wrong")
ALL = "all"


def shift_metrics(outcomes: pd.DataFrame) -> dict[str, str]:
    """Registered shift metric -> its outcome column, for the columns present and 0/1."""
    out = {}
    for spec in METRICS.values():
        if spec.stage != "robustness" or not spec.name.endswith("_shift"):
            continue
        column = spec.outcome_column
        if column in outcomes.columns:
            values = outcomes[column].dropna().to_numpy(dtype=float)
            if values.size and np.isin(values, (0.0, 1.0)).all():
                out[spec.name] = column
    return out


def perturbation_pairs(
    outcomes: pd.DataFrame,
    perturbations: pd.DataFrame,
    *,
    column: str = "correct",
    models: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per model and perturbed item: its original's and its own value of ``column``.

    Parameters
    ----------
    outcomes
        Outcomes of clean and perturbed items (``Run.outcomes(items="all")``).
    perturbations
        ``id, source_id, perturbation`` per perturbed item (``Run.perturbations()``).
    column
        A 0/1 outcome column; repeats are collapsed to their majority.
    """
    missing = [c for c in ("id", "source_id", "perturbation") if c not in perturbations]
    if missing:
        raise CompkitError(f"the perturbations frame lacks column(s) {missing}")
    if column not in outcomes.columns:
        raise CompkitError(f"outcome column {column!r} is not in the outcome table")
    frame = outcomes if models is None else outcomes[outcomes["model"].isin(models)]
    collapsed = _collapse_values(frame, [column], "majority")[column].unstack("model")
    ids = perturbations[["id", "source_id", "perturbation"]].rename(columns={"id": "item_id"})
    rows = []
    for model in collapsed.columns:
        values = collapsed[model]
        part = ids.assign(
            model=model,
            original=ids["source_id"].map(values).to_numpy(dtype=float),
            perturbed=ids["item_id"].map(values).to_numpy(dtype=float),
        )
        rows.append(part)
    if not rows:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return pd.concat(rows, ignore_index=True)[PAIR_COLUMNS]


def _wide(pairs: pd.DataFrame, baseline: str, candidate: str) -> pd.DataFrame:
    """Per pair B, B', C, C' (pairs where all four exist)."""
    key = ["item_id", "source_id", "perturbation"]
    base = pairs[pairs["model"] == baseline].set_index(key)[["original", "perturbed"]]
    cand = pairs[pairs["model"] == candidate].set_index(key)[["original", "perturbed"]]
    wide = base.set_axis(["B", "Bp"], axis=1).join(cand.set_axis(["C", "Cp"], axis=1), how="inner")
    wide = wide.dropna()
    return wide.reset_index()


def _count(x: pd.Series, y: pd.Series) -> tuple[int, int]:
    """(#x=1 & y=0, #x=0 & y=1) of two 0/1 columns."""
    return int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())


def _gap_row(w: pd.DataFrame, confidence: float) -> dict:
    """Closed-form evidence numbers of one candidate on the pairs of one perturbation."""
    n = len(w)
    b_c, c_c = _count(w["C"], w["Cp"])  # the candidate's own shift C -> C'
    b_b, c_b = _count(w["B"], w["Bp"])
    value_lo, value_hi = paired_difference_ci(b_c, c_c, n, confidence=confidence)
    gap_lo, gap_hi = paired_gap_ci(
        _count(w["Bp"], w["Cp"]), _count(w["B"], w["C"]), n, confidence=confidence
    )
    gaps = (w["Cp"] - w["C"]) - (w["Bp"] - w["B"])
    value, base = (c_c - b_c) / n, (c_b - b_b) / n
    return {
        "n": n,
        "value": value,
        "value_ci_low": value_lo,
        "value_ci_high": value_hi,
        "baseline_value": base,
        "delta": value - base,
        "ci_low": gap_lo,
        "ci_high": gap_hi,
        "p_value": paired_p_value(np.zeros(n), gaps.to_numpy(dtype=float), binary=False),
        "value_method": "tango_cc",
        "delta_method": "tango_cc_gap",
        "n_base_only": b_c,
        "n_cand_only": c_c,
        "note": "",
    }


def robustness_evidence(
    pairs_by_metric: dict[str, pd.DataFrame],
    *,
    baseline: str,
    candidates: Sequence[str],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Evidence rows (:data:`RESULT_COLUMNS`) of every shift metric: per candidate, per
    perturbation and pooled (``overall``); see the module docstring.

    Parameters
    ----------
    pairs_by_metric
        Shift metric name -> :func:`perturbation_pairs` of its outcome column.
    """
    rows = []
    for metric, pairs in pairs_by_metric.items():
        for cand in candidates:
            w = _wide(pairs, baseline, cand)
            if w.empty:
                continue
            for name, part in w.groupby("perturbation", sort=True):
                rows.append(
                    {
                        "model": cand,
                        "slice": "perturbation",
                        "slice_value": str(name),
                        "metric": metric,
                        **_gap_row(part, confidence),
                    }
                )
            rows.append(_pooled_row(w, cand, metric, confidence, n_resamples, seed))
    frame = pd.DataFrame(rows).assign(confidence=confidence)
    return frame.reindex(columns=RESULT_COLUMNS)


def _pooled_row(
    w: pd.DataFrame, cand: str, metric: str, confidence: float, n_resamples: int, seed: int
) -> dict:
    """Pooled over perturbations: per source item the mean of its pairs, then BCa."""
    shifts = (
        w.assign(cs=w["Cp"] - w["C"], bs=w["Bp"] - w["B"]).groupby("source_id")[["cs", "bs"]].mean()
    )
    row = pooled_numbers(
        shifts["bs"].to_numpy(),
        shifts["cs"].to_numpy(),
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
        width=2.0,
    )
    row["note"] = (
        f"pooled over {w['perturbation'].nunique()} perturbation(s): per source item the mean "
        "of its pairs. " + row["note"]
    ).strip()
    return {"model": cand, "slice": OVERALL[0], "slice_value": OVERALL[1], "metric": metric, **row}


def pooled_numbers(
    base: np.ndarray,
    cand: np.ndarray,
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    width: float,
) -> dict:
    """Paired BCa numbers of per-source-item values (the pooled rows), with the kit's guards:
    no interval below :data:`kit.metrics.BOOTSTRAP_MIN_N` items, and when no item's change
    differs from 0 the exact bound ``width * CP upper bound`` (``width``: the largest change
    an item can show)."""
    boot = paired_bootstrap(
        base, {"c": cand}, n_resamples=n_resamples, confidence=confidence, seed=seed
    ).iloc[0]
    n, changed = int(boot["n"]), int(boot["n_changed"])
    out = {
        "n": n,
        "value": boot["value"],
        "value_ci_low": boot["value_ci_low"],
        "value_ci_high": boot["value_ci_high"],
        "baseline_value": boot["baseline_value"],
        "delta": boot["delta"],
        "ci_low": boot["ci_low"],
        "ci_high": boot["ci_high"],
        "p_value": paired_p_value(base, cand, binary=False),
        "value_method": "bca_bootstrap",
        "delta_method": "bca_bootstrap",
        "note": "",
    }
    if changed == 0:
        half = float(zero_change_bound(n, confidence=confidence, width=width))
        out.update(
            ci_low=out["delta"] - half,
            ci_high=out["delta"] + half,
            delta_method="bounded_zero_change",
        )
    if n < BOOTSTRAP_MIN_N:
        out.update(value_ci_low=np.nan, value_ci_high=np.nan)
        if changed:
            out.update(ci_low=np.nan, ci_high=np.nan)
        out["note"] = (
            f"fewer than {BOOTSTRAP_MIN_N} source items: a bootstrap interval is not trusted "
            "here; judge a single perturbation instead"
        )
    return out


def perturbation_flip_evidence(
    pairs: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """``perturbation_flip_rate`` rows: the candidate's share of pairs whose outcome the
    perturbation changed, against the baseline's on the same pairs; per perturbation
    (closed-form intervals) and pooled (``overall``: per source item the share of its
    perturbations that flipped it, paired BCa over source items)."""
    rows = []
    for cand in candidates:
        w = _wide(pairs, baseline, cand)
        if w.empty:
            continue
        w = w.assign(f=(w["C"] != w["Cp"]).astype(float), g=(w["B"] != w["Bp"]).astype(float))
        for value, part in w.groupby("perturbation", sort=True):
            rows.append(
                {
                    "model": cand,
                    "slice": "perturbation",
                    "slice_value": str(value),
                    **_flip_rate_numbers(part, confidence),
                }
            )
        shares = w.groupby("source_id")[["g", "f"]].mean()
        pooled = pooled_numbers(
            shares["g"].to_numpy(),
            shares["f"].to_numpy(),
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            width=1.0,
        )
        rows.append({"model": cand, "slice": OVERALL[0], "slice_value": OVERALL[1], **pooled})
    frame = pd.DataFrame(rows).assign(metric="perturbation_flip_rate", confidence=confidence)
    return frame.reindex(columns=RESULT_COLUMNS)


def _flip_rate_numbers(part: pd.DataFrame, confidence: float) -> dict:
    n = len(part)
    f, g = part["f"], part["g"]
    xc, xb = int(f.sum()), int(g.sum())
    b, c = _count(g, f)  # baseline flipped only / candidate flipped only
    both = xc - c
    lo, hi = proportion_ci(xc, n, confidence=confidence)
    d_lo, d_hi = paired_difference_ci(b, c, n, confidence=confidence)
    r_lo, r_hi = paired_ratio_ci(both, b, c, n, confidence=confidence)
    return {
        "n": n,
        "value": xc / n,
        "value_ci_low": lo,
        "value_ci_high": hi,
        "baseline_value": xb / n,
        "delta": (xc - xb) / n,
        "ci_low": d_lo,
        "ci_high": d_hi,
        "rel": (xc - xb) / xb if xb else np.nan,
        "rel_ci_low": r_lo if xb else np.nan,
        "rel_ci_high": r_hi if xb else np.nan,
        "p_value": mcnemar_test(b, c).p_value,
        "value_method": "clopper_pearson",
        "delta_method": "tango_cc",
        "rel_method": "tang_cc",
        "n_base_only": b,
        "n_cand_only": c,
        "note": "" if xb else "relative change undefined: the baseline never flipped",
    }


def perturbation_flips(
    pairs: pd.DataFrame, *, metric: str = "accuracy", confidence: float = 0.95
) -> pd.DataFrame:
    """Flips by direction under each perturbation, per model (baseline included).

    ``right_to_wrong``: the original right, its perturbed copy wrong (for a lower-is-better
    metric "right" is the value 0); ``wrong_to_right`` the reverse; the two unchanged kinds.
    Rates have Clopper–Pearson intervals; ``perturbation = "all"`` pools every pair.

    Returns
    -------
    DataFrame
        :data:`FLIP_COLUMNS`.
    """
    good = 1.0 if METRICS[metric].higher_is_better else 0.0
    p = pairs.dropna(subset=["original", "perturbed"])
    kind = np.select(
        [
            (p["original"] == good) & (p["perturbed"] != good),
            (p["original"] != good) & (p["perturbed"] == good),
            (p["original"] == good),
        ],
        ["right_to_wrong", "wrong_to_right", "unchanged_right"],
        default="unchanged_wrong",
    )
    p = p.assign(flip=pd.Categorical(kind, categories=PERTURBATION_FLIPS))
    frames = [p.assign(perturbation=ALL), p]
    counts = (
        pd.concat(frames, ignore_index=True)
        .groupby(["model", "perturbation", "flip"], observed=False, sort=True)
        .size()
        .rename("count")
        .reset_index()
    )
    counts["n"] = counts.groupby(["model", "perturbation"])["count"].transform("sum")
    counts = counts[counts["n"] > 0].reset_index(drop=True)
    lo, hi = proportion_ci(
        counts["count"].to_numpy(), counts["n"].to_numpy(), confidence=confidence
    )
    counts = counts.assign(
        metric=metric,
        flip=counts["flip"].astype(str),
        rate=counts["count"] / counts["n"],
        rate_ci_low=lo,
        rate_ci_high=hi,
        confidence=confidence,
    )
    return counts[FLIP_COLUMNS]
