"""Paired evidence for macro F1: the one set-level classification metric a rule may name.

Macro F1 is not a mean of per-item values, so it has no closed-form paired interval. Items are
resampled jointly for the baseline and each candidate (the same weights), the per-label counts
of every resample come from matrix products (``F1_l = 2 TP_l / (predicted_l + support_l)``,
the labels being those with items in the resample), and the interval is BCa with the
jackknife acceleration computed exactly (removing an item changes at most two labels' counts).

Two guards keep a bootstrap from claiming what it cannot see: fewer than
:data:`kit.metrics.BOOTSTRAP_MIN_N` classification items, or no item whose predicted label
differs between the two models, leave the interval undefined (the row's ``note`` says which),
so a rule on macro F1 is then undecided rather than passed on ``[0, 0]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.analysis.compare import OVERALL, RESULT_COLUMNS
from kit.evalset import EvalSet
from kit.metrics import BOOTSTRAP_MIN_N
from kit.stats.bootstrap import bca_quantiles, weight_blocks


def _majority_pred(outcomes: pd.DataFrame, model: str, items: list[str]) -> np.ndarray:
    rows = outcomes[(outcomes["model"] == model) & outcomes["item_id"].isin(items)]
    rows = rows.assign(pred=rows["pred"].map(lambda p: p if isinstance(p, str) else ""))
    rows = rows.sort_values(["item_id", "repeat"], kind="stable")
    mode = rows.groupby("item_id", sort=False)["pred"].agg(lambda s: s.value_counts().index[0])
    return mode.reindex(items).fillna("").to_numpy(dtype=object)


def _one_hot(values: np.ndarray, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((values.size, len(labels)))
    for row, value in enumerate(values):
        if value in index:
            out[row, index[value]] = 1.0
    return out


def _macro(tp: np.ndarray, pred: np.ndarray, sup: np.ndarray) -> np.ndarray:
    """Macro F1 over the labels with support, along the last axis."""
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(sup > 0, 2 * tp / (pred + sup), np.nan)
    return np.nanmean(f1, axis=-1)


def _jackknife(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Leave-one-out macro F1 for every item (exact: one item touches at most two labels)."""
    tp_items = t * p
    tp, pred, sup = tp_items.sum(0), p.sum(0), t.sum(0)
    out = np.empty(t.shape[0])
    for i in range(t.shape[0]):
        out[i] = _macro(tp - tp_items[i], pred - p[i], sup - t[i])
    return out


def macro_f1_evidence(
    outcomes: pd.DataFrame,
    eval_set: EvalSet,
    *,
    baseline: str,
    candidates: Sequence[str],
    slices: pd.DataFrame | None = None,
    slice_columns: Sequence[str] = (),
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Macro F1 of each candidate against the baseline, overall and per slice value.

    Returns
    -------
    DataFrame
        :data:`kit.analysis.compare.RESULT_COLUMNS` rows with ``metric="macro_f1"`` and BCa
        intervals (``bca_bootstrap``) for value, change and relative change.
    """
    truth = {it.id: it.label for it in eval_set.items if it.task == "classification"}
    items = sorted(
        i for i in truth if i in set(outcomes.loc[outcomes["model"] == baseline, "item_id"])
    )
    if not items:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    groups: list[tuple[str, str, np.ndarray]] = [(*OVERALL, np.ones(len(items), dtype=bool))]
    if slices is not None:
        table = slices.set_index("id").reindex(items)
        for column in slice_columns:
            for value in sorted(table[column].dropna().astype(str).unique()):
                groups.append((column, value, (table[column].astype(str) == value).to_numpy()))
    true = np.array([truth[i] for i in items], dtype=object)
    base_pred = _majority_pred(outcomes, baseline, items)
    rows = []
    rng = np.random.default_rng(seed)
    for model in candidates:
        cand_pred = _majority_pred(outcomes, model, items)
        for column, value, mask in groups:
            rows.append(
                _pair_row(
                    true[mask], base_pred[mask], cand_pred[mask], rng, n_resamples, confidence
                )
                | {"model": model, "slice": column, "slice_value": value}
            )
    out = pd.DataFrame(rows).assign(metric="macro_f1", confidence=confidence)
    return out.reindex(columns=RESULT_COLUMNS)


def _pair_row(true, base_pred, cand_pred, rng, n_resamples, confidence) -> dict:
    labels = sorted(set(true))
    t = _one_hot(true, labels)
    pb, pc = _one_hot(base_pred, labels), _one_hot(cand_pred, labels)
    n = true.size
    est_b = float(_macro((t * pb).sum(0), pb.sum(0), t.sum(0)))
    est_c = float(_macro((t * pc).sum(0), pc.sum(0), t.sum(0)))
    row = {
        "n": n,
        "value": est_c,
        "baseline_value": est_b,
        "delta": est_c - est_b,
        "rel": (est_c - est_b) / est_b if est_b > 0 else np.nan,
        "value_method": "bca_bootstrap",
        "delta_method": "bca_bootstrap",
        "rel_method": "bca_bootstrap",
        "note": "",
    }
    changed = int(np.sum(base_pred != cand_pred))
    if n < BOOTSTRAP_MIN_N:
        return row | {
            "note": f"fewer than {BOOTSTRAP_MIN_N} classification items: a bootstrap "
            "interval of macro F1 is not trusted here"
        }
    reps = _resampled(t, pb, pc, rng, n_resamples)
    jb, jc = _jackknife(t, pb), _jackknife(t, pc)
    with np.errstate(invalid="ignore", divide="ignore"):
        jack_rel = np.where(jb > 0, (jc - jb) / jb, np.nan)
    accel = np.array([_accel(jc), _accel(jc - jb), _accel(jack_rel)])
    point = np.array([est_c, est_c - est_b, row["rel"]])
    low, high = bca_quantiles(reps, point, accel, confidence)
    row |= dict(zip(["value_ci_low", "ci_low", "rel_ci_low"], low, strict=True))
    row |= dict(zip(["value_ci_high", "ci_high", "rel_ci_high"], high, strict=True))
    if changed == 0:
        for key in ("ci_low", "ci_high", "rel_ci_low", "rel_ci_high"):
            row[key] = np.nan
        row["note"] = (
            "no predicted label differs between the two models: a bootstrap cannot bound the "
            "change of macro F1 from identical outputs (judge accuracy or recall instead)"
        )
    return row


def _accel(jack: np.ndarray) -> float:
    u = np.nanmean(jack) - jack
    u = u[np.isfinite(u)]
    s2 = float(np.sum(u**2))
    return float(np.sum(u**3) / (6 * s2**1.5)) if s2 > 0 else 0.0


def _resampled(t, pb, pc, rng, n_resamples) -> np.ndarray:
    """(R, 3): resampled candidate macro F1, change and relative change."""
    counts = np.ones(t.shape[0], dtype=np.int64)
    out = []
    blocks = weight_blocks(
        rng,
        method="indices",
        n_rows=t.shape[0],
        counts=counts,
        n_resamples=n_resamples,
        max_cells=2**22,
    )
    for w in blocks:
        sup = w @ t
        mb = _macro(w @ (t * pb), w @ pb, sup)
        mc = _macro(w @ (t * pc), w @ pc, sup)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.stack([mc, mc - mb, np.where(mb > 0, (mc - mb) / mb, np.nan)], axis=1))
    return np.concatenate(out, axis=0)
