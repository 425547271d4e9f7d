"""Paired comparison of candidates against the frozen baseline, item by item.

Every statistic here is *paired*: a candidate and the baseline are compared on the same
items, so item difficulty cancels out and small real differences become visible.

Results share one long shape, :data:`RESULT_COLUMNS` (the evidence the budget is judged on):
per model, slice (``overall``/``all`` for every item), value and metric the number of paired
items ``n``; the candidate's ``value`` with its interval; ``baseline_value``; the change
``delta`` = value - baseline_value with its interval (``ci_low``, ``ci_high``); the relative
change ``rel`` = delta / baseline_value with its interval; a ``p_value``; and the method
behind each interval (``value_method``, ``delta_method``, ``rel_method``; see
:data:`kit.stats.intervals.METHODS`), the counts they rest on and a ``note`` when an interval
could not be formed.

Intervals (chosen per metric, :mod:`kit.metrics`)
-------------------------------------------------
0/1 per item
    Clopper–Pearson for the value, Tango's paired score interval (continuity-corrected) for
    the change, Tang's paired ratio score interval (continuity-corrected) for the relative
    change: closed forms from the counts ``n``, ``n_base_only`` (baseline 1, candidate 0)
    and ``n_cand_only``. They hold their level at every n, including when no item changed.
other values in [0, 1] (chrF, field shares, a 0/1 metric averaged over repeats)
    the paired BCa bootstrap (:func:`kit.stats.bootstrap.paired_bootstrap`), only from
    :data:`kit.metrics.BOOTSTRAP_MIN_N` paired items on (below, the intervals are NaN and
    ``note`` says so); when no item's value changed, the change is bounded exactly by the
    share of items that could have changed (:func:`kit.stats.bootstrap.zero_change_bound`).

Repeats
-------
The outcome table holds one row per ``model, item_id, repeat``. Before two models are
compared, each model's repeats are collapsed to one value per item (``repeats=``):

``"mean"``
    mean over repeats (NaN ignored). Matches :func:`kit.scoring.summarize`; a binary metric
    becomes a share in [0, 1] when repeats disagree. Default of :func:`compare_models`.
``"majority"``
    binary metrics: the majority outcome over repeats, a tie going to the lowest repeat's
    outcome; ``pred`` is the most common prediction among the repeats with that outcome
    (ties: lowest repeat), so the shown prediction always has the shown outcome.
    Non-binary metrics fall back to the mean. Default of :func:`flip_table`.
``"first"``
    the lowest repeat only (normally repeat 0 against repeat 0).

Example
-------
>>> table = compare_models(outcomes, baseline="base", by="task")     # doctest: +SKIP
>>> flip_table(outcomes, baseline="base")                            # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kit.errors import CompkitError
from kit.metrics import BOOTSTRAP_MIN_N, MetricSpec
from kit.metrics import metric as registered_metric
from kit.scoring import metric_columns
from kit.stats.bootstrap import paired_bootstrap, zero_change_bound
from kit.stats.intervals import (
    paired_difference_ci,
    paired_ratio_ci,
    proportion_ci,
)
from kit.stats.tests import mcnemar_test, paired_p_value

#: The long result shape shared by compare, slices, the budget, charts and the memo.
RESULT_COLUMNS = [
    "model",
    "slice",
    "slice_value",
    "metric",
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
#: Flip kinds of :func:`item_flips`, in display order.
FLIP_KINDS = (
    "right_to_wrong",
    "wrong_to_right",
    "wrong_to_other_wrong",
    "unchanged_right",
    "unchanged_wrong",
)
REPEAT_MODES = ("mean", "majority", "first")
OVERALL = ("overall", "all")
_KEY = ["model", "item_id"]


# --------------------------------------------------------------------------- validation


def _check_outcomes(outcomes: pd.DataFrame, *, baseline: str) -> None:
    needed = ["model", "item_id", "repeat"]
    missing = [c for c in needed if c not in outcomes.columns]
    if missing:
        raise CompkitError(
            f"outcome table lacks column(s) {missing}; expected the per-item table from "
            "kit.scoring.score_outputs (model, item_id, repeat, task, correct, ...)"
        )
    if not (outcomes["model"] == baseline).any():
        models = sorted(outcomes["model"].astype(str).unique())
        raise CompkitError(
            f"baseline {baseline!r} has no rows in the outcome table; models: {models}"
        )


def _candidate_list(
    outcomes: pd.DataFrame, *, baseline: str, candidates: Sequence[str] | str | None
) -> list[str]:
    present = list(dict.fromkeys(outcomes["model"]))
    if candidates is None:
        chosen = [m for m in present if m != baseline]
    else:
        chosen = [candidates] if isinstance(candidates, str) else list(candidates)
        unknown = [m for m in chosen if m not in present]
        if unknown:
            raise CompkitError(
                f"candidate(s) {unknown} have no rows in the outcome table; models: {present}"
            )
    if not chosen:
        raise CompkitError(f"no candidate to compare with baseline {baseline!r}; models: {present}")
    return chosen


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise CompkitError(f"{name}={value!r} is not one of {list(allowed)}")


def _as_list(by: str | Sequence[str] | None) -> list[str]:
    if by is None:
        return []
    return [by] if isinstance(by, str) else list(by)


def metric_info(name: str) -> MetricSpec:
    """Registry entry for a metric name or an outcome column name (``correct`` -> accuracy).

    Raises
    ------
    CompkitError
        If the metric is not registered in :data:`kit.metrics.METRICS`.
    """
    return registered_metric(name)


def _metric_column(outcomes: pd.DataFrame, metric: str) -> str:
    """The outcome column holding ``metric`` (a column name or a registry name)."""
    if metric in outcomes.columns:
        return metric
    for column, name in metric_columns(outcomes).items():
        if name == metric:
            return column
    raise CompkitError(
        f"metric {metric!r} is not a column of the outcome table; metric columns present: "
        f"{sorted(metric_columns(outcomes))}"
    )


def _is_binary(values: np.ndarray) -> bool:
    finite = values[~np.isnan(values)]
    return finite.size > 0 and bool(np.isin(finite, (0.0, 1.0)).all())


# --------------------------------------------------------------------------- repeats


def _collapse_values(frame: pd.DataFrame, columns: Sequence[str], repeats: str) -> pd.DataFrame:
    """One row per (model, item_id) with each column collapsed over repeats."""
    _check_choice("repeats", repeats, REPEAT_MODES)
    frame = frame.sort_values([*_KEY, "repeat"], kind="stable")
    if repeats == "first":
        lowest = frame.groupby(_KEY, sort=True)["repeat"].transform("min") == frame["repeat"]
        frame = frame[lowest]
    grouped = frame.groupby(_KEY, sort=True)[list(columns)]
    mean = grouped.mean()
    if repeats != "majority":
        return mean
    first = grouped.first()  # lowest repeat with a value: breaks ties
    out = mean.copy()
    for column in columns:
        if _is_binary(frame[column].to_numpy(dtype=float)):
            m = mean[column]
            out[column] = np.where(m > 0.5, 1.0, np.where(m < 0.5, 0.0, first[column]))
    return out


def _collapse_with_pred(frame: pd.DataFrame, column: str, repeats: str) -> pd.DataFrame:
    """Per (model, item_id): ``outcome`` and a ``pred`` that has that outcome."""
    _check_choice("repeats", repeats, ("majority", "first"))
    cols = [*_KEY, "repeat", column, *(["pred"] if "pred" in frame.columns else [])]
    f = frame[cols].dropna(subset=[column]).sort_values([*_KEY, "repeat"], kind="stable")
    if repeats == "first":
        f = f.drop_duplicates(_KEY)
    else:
        grouped = f.groupby(_KEY, sort=False)[column]
        mean, first = grouped.transform("mean"), grouped.transform("first")
        majority = np.where(mean > 0.5, 1.0, np.where(mean < 0.5, 0.0, first))
        f = f[f[column].to_numpy() == majority]
        if "pred" in f.columns:
            key = f["pred"].map(lambda p: None if _missing(p) else str(p))
            f = f.assign(_votes=f.groupby([*_KEY, key], dropna=False)["repeat"].transform("size"))
            f = f.sort_values([*_KEY, "_votes", "repeat"], ascending=[True, True, False, True])
        f = f.drop_duplicates(_KEY)
    out = f.rename(columns={column: "outcome"}).set_index(_KEY)
    if "pred" not in out.columns:
        out["pred"] = None
    return out[["outcome", "pred"]]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


# --------------------------------------------------------------------------- flips


def item_flips(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    metric: str = "correct",
    repeats: str = "majority",
    by: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (candidate, item): baseline vs candidate outcome and prediction.

    Parameters
    ----------
    outcomes
        Per-item outcome table (``model, item_id, repeat, pred, <metric>``...).
    baseline, candidates
        Model names; ``candidates=None`` takes every other model.
    metric
        A binary outcome column (``correct``) or its registry name (``accuracy``). For a
        lower-is-better metric (``json_parse_failure``) "right" means the value 0.
    repeats
        ``"majority"`` (default) or ``"first"``; see the module docstring.
    by
        Item-level columns of ``outcomes`` to carry along (e.g. ``"task"``).

    Returns
    -------
    DataFrame
        ``model, item_id, metric, baseline_outcome, candidate_outcome, baseline_pred,
        candidate_pred, flip`` plus ``task`` and the ``by`` columns. ``flip`` is one of
        :data:`FLIP_KINDS`. Both wrong with different non-missing predictions is
        ``wrong_to_other_wrong``; without predictions it counts as ``unchanged_wrong``.
        Items missing the metric for either model are left out.
    """
    _check_outcomes(outcomes, baseline=baseline)
    models = _candidate_list(outcomes, baseline=baseline, candidates=candidates)
    column = _metric_column(outcomes, metric)
    info = metric_info(column)
    if not _is_binary(outcomes[column].to_numpy(dtype=float)):
        raise CompkitError(f"flips need a binary (0/1) metric; column {column!r} has other values")
    collapsed = _collapse_with_pred(
        outcomes[outcomes["model"].isin([baseline, *models])], column, repeats
    )
    present = set(collapsed.index.get_level_values("model"))
    empty = collapsed.droplevel("model").iloc[:0]
    base = collapsed.xs(baseline, level="model") if baseline in present else empty
    carry = [c for c in dict.fromkeys(["task", *_as_list(by)]) if c in outcomes.columns]
    item_cols = _item_columns(outcomes, baseline=baseline, columns=carry)
    frames = []
    for model in models:
        # a model with no item measured on this metric (e.g. no parsable JSON, so no
        # hallucinated-field outcome) has no pair: its flips are absent, not an error
        cand = collapsed.xs(model, level="model") if model in present else empty
        pair = base.add_suffix("_b").join(cand.add_suffix("_c"), how="inner")
        frames.append(
            _classify_flips(pair, good=1.0 if info.higher_is_better else 0.0).assign(model=model)
        )
    out = pd.concat(frames).reset_index().join(item_cols, on="item_id")
    out["metric"] = info.name
    lead = [
        "model",
        "item_id",
        "metric",
        "baseline_outcome",
        "candidate_outcome",
        "baseline_pred",
        "candidate_pred",
        "flip",
    ]
    return out[lead + carry].reset_index(drop=True)


def _item_columns(outcomes: pd.DataFrame, *, baseline: str, columns: Sequence[str]) -> pd.DataFrame:
    """Item-level columns (constant per item), read from the baseline's rows."""
    rows = outcomes[outcomes["model"] == baseline]
    return rows.groupby("item_id", sort=True)[list(columns)].first()


def _classify_flips(pair: pd.DataFrame, *, good: float) -> pd.DataFrame:
    b_ok = pair["outcome_b"].to_numpy() == good
    c_ok = pair["outcome_c"].to_numpy() == good
    pb = pair["pred_b"].map(lambda p: None if _missing(p) else str(p))
    pc = pair["pred_c"].map(lambda p: None if _missing(p) else str(p))
    other = (pb.notna() & pc.notna() & (pb != pc)).to_numpy()
    flip = np.select(
        [b_ok & ~c_ok, ~b_ok & c_ok, b_ok & c_ok, other],
        ["right_to_wrong", "wrong_to_right", "unchanged_right", "wrong_to_other_wrong"],
        default="unchanged_wrong",
    )
    return pd.DataFrame(
        {
            "baseline_outcome": pair["outcome_b"],
            "candidate_outcome": pair["outcome_c"],
            "baseline_pred": pair["pred_b"],
            "candidate_pred": pair["pred_c"],
            "flip": flip,
        },
        index=pair.index,
    )


def flip_table(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    metric: str = "correct",
    repeats: str = "majority",
    by: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Counts and rates of each flip kind per candidate (and per slice with ``by``).

    Parameters are those of :func:`item_flips`.

    Returns
    -------
    DataFrame
        ``model, metric, slice, slice_value, flip, count, n, rate`` with one row per flip
        kind in :data:`FLIP_KINDS` (zero counts included); ``n`` is the number of paired
        items and ``rate = count / n``.

    Examples
    --------
    >>> flips = flip_table(outcomes, baseline="base")                 # doctest: +SKIP
    >>> flips.pivot(index="model", columns="flip", values="rate")     # doctest: +SKIP
    """
    by_cols = _as_list(by)
    flips = item_flips(
        outcomes,
        baseline=baseline,
        candidates=candidates,
        metric=metric,
        repeats=repeats,
        by=by_cols,
    )
    frames = [_count_flips(flips, ["model"]).assign(slice=OVERALL[0], slice_value=OVERALL[1])]
    for column in by_cols:
        counted = _count_flips(flips.dropna(subset=[column]), ["model", column])
        frames.append(counted.rename(columns={column: "slice_value"}).assign(slice=column))
    out = pd.concat(frames, ignore_index=True)
    out["slice_value"] = out["slice_value"].astype(str)
    out["metric"] = flips["metric"].iloc[0] if len(flips) else metric_info(metric).name
    return out[["model", "metric", "slice", "slice_value", "flip", "count", "n", "rate"]]


def _count_flips(flips: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    kind = pd.Categorical(flips["flip"], categories=FLIP_KINDS)
    counts = flips.assign(flip=kind).groupby([*keys, "flip"], observed=False, sort=True).size()
    counts = counts.rename("count").reset_index()
    counts = counts[counts.groupby(keys, sort=False)["count"].transform("sum") > 0]
    counts["n"] = counts.groupby(keys, sort=False)["count"].transform("sum")
    counts["rate"] = counts["count"] / counts["n"]
    counts["flip"] = counts["flip"].astype(str)
    return counts.reset_index(drop=True)


def agreement_rate(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    repeats: str = "majority",
    by: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Share of items where the candidate's ``pred`` equals the baseline's.

    Only items where both predictions are present count (extraction and generation items
    have no ``pred``). Predictions are compared as text; repeats collapse as in
    :func:`item_flips`.

    Returns
    -------
    DataFrame
        ``model, slice, slice_value, agreement, n``.
    """
    if "pred" not in outcomes.columns:
        raise CompkitError("agreement needs a 'pred' column in the outcome table")
    by_cols = _as_list(by)
    flips = item_flips(
        outcomes, baseline=baseline, candidates=candidates, repeats=repeats, by=by_cols
    )
    pb = flips["baseline_pred"].map(lambda p: None if _missing(p) else str(p))
    pc = flips["candidate_pred"].map(lambda p: None if _missing(p) else str(p))
    both = pb.notna() & pc.notna()
    flips = flips[both].assign(agree=(pb[both] == pc[both]).astype(float))
    frames = [_agreement(flips, ["model"]).assign(slice=OVERALL[0], slice_value=OVERALL[1])]
    for column in by_cols:
        part = _agreement(flips.dropna(subset=[column]), ["model", column])
        frames.append(part.rename(columns={column: "slice_value"}).assign(slice=column))
    out = pd.concat(frames, ignore_index=True)
    out["slice_value"] = out["slice_value"].astype(str)
    return out[["model", "slice", "slice_value", "agreement", "n"]]


def _agreement(flips: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return flips.groupby(keys, sort=True)["agree"].agg(agreement="mean", n="size").reset_index()


# --------------------------------------------------------------------------- compare_models


def compare_models(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    by: str | Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    repeats: str = "mean",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "auto",
) -> pd.DataFrame:
    """Every metric of every candidate against the baseline, overall and per slice.

    Parameters
    ----------
    outcomes
        Per-item outcome table; ``by`` columns must be item-level (constant per item).
    baseline, candidates
        Model names; ``candidates=None`` takes every other model.
    by
        Slice column(s) of ``outcomes``; each gives its own rows (not a cross product).
    metrics
        Metric names or columns; default every registered metric column present.
    repeats
        ``"mean"`` (default), ``"majority"`` or ``"first"``; see the module docstring.
    confidence
        Level of every interval.
    n_resamples, seed, method
        Bootstrap settings for metrics that are not 0/1 per item
        (:func:`kit.stats.bootstrap.paired_bootstrap`); the same seed serves every metric.

    Returns
    -------
    DataFrame
        :data:`RESULT_COLUMNS` (see the module docstring). ``p_value`` (two-sided): McNemar
        (:func:`kit.stats.tests.mcnemar_test`) for 0/1 values, else the Wilcoxon
        signed-rank test on the paired differences (1.0 when none differs).
    """
    _check_outcomes(outcomes, baseline=baseline)
    models = _candidate_list(outcomes, baseline=baseline, candidates=candidates)
    columns = _metric_map(outcomes, metrics)
    by_cols = _as_list(by)
    missing = [c for c in by_cols if c not in outcomes.columns]
    if missing:
        raise CompkitError(f"slice column(s) {missing} are not in the outcome table")
    values, groups = _item_matrix(
        outcomes,
        baseline=baseline,
        models=models,
        columns=list(columns),
        repeats=repeats,
        by=by_cols,
    )
    frames = []
    for column, name in columns.items():
        matrix = values[column]
        if _is_binary(matrix):
            rows = _binary_rows(matrix, models, groups, confidence)
        else:
            rows = _bounded_rows(
                matrix,
                models,
                groups,
                confidence=confidence,
                n_resamples=n_resamples,
                seed=seed,
                method=method,
            )
        frames.append(rows.assign(metric=name))
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    out = pd.concat(frames, ignore_index=True).assign(confidence=confidence)
    return out.reindex(columns=RESULT_COLUMNS)


def _metric_map(outcomes: pd.DataFrame, metrics: Sequence[str] | None) -> dict[str, str]:
    present = metric_columns(outcomes)
    if metrics is None:
        return present
    out = {}
    for name in metrics:
        column = _metric_column(outcomes, name)
        out[column] = metric_info(column).name
    return out


def _item_matrix(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    models: list[str],
    columns: list[str],
    repeats: str,
    by: list[str],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per metric column an (items x [baseline, *models]) matrix; per slice column its values.

    Items are the baseline's items, sorted by id; a candidate's missing item is NaN.
    """
    sub = outcomes[outcomes["model"].isin([baseline, *models])]
    collapsed = _collapse_values(sub, columns, repeats)
    wide = collapsed.unstack("model")
    items = np.sort(outcomes.loc[outcomes["model"] == baseline, "item_id"].unique())
    wide = wide.reindex(items)
    order = [baseline, *models]
    values = {c: wide[c].reindex(columns=order).to_numpy(dtype=np.float64) for c in columns}
    item_cols = _item_columns(outcomes, baseline=baseline, columns=by).reindex(items)
    groups = {c: item_cols[c].to_numpy(dtype=object) for c in by}
    return values, groups


def _slice_codes(
    groups: Mapping[str, np.ndarray], n: int
) -> list[tuple[str, list[Any], np.ndarray]]:
    """(slice name, labels, code per item; -1 = no value), overall first."""
    out: list[tuple[str, list[Any], np.ndarray]] = [
        (OVERALL[0], [OVERALL[1]], np.zeros(n, dtype=np.int64))
    ]
    for name, raw in groups.items():
        codes, labels = pd.factorize(pd.Series(raw, dtype=object), sort=True)
        out.append((name, list(labels), codes.astype(np.int64)))
    return out


def _binary_rows(
    matrix: np.ndarray, models: list[str], groups: Mapping[str, np.ndarray], confidence: float
) -> pd.DataFrame:
    """Closed-form rows for 0/1 values: counts per slice, then the score / exact intervals."""
    base = matrix[:, 0]
    records = []
    for j, model in enumerate(models):
        cand = matrix[:, j + 1]
        valid = ~np.isnan(base) & ~np.isnan(cand)
        for name, labels, codes in _slice_codes(groups, base.size):
            keep = valid & (codes >= 0)
            cd, size = codes[keep], len(labels)
            b, c = base[keep], cand[keep]

            def count(weights, cd=cd, size=size):
                return np.bincount(cd, weights=weights, minlength=size)

            n, xb, xc = count(None), count(b), count(c)
            base_only, cand_only = count((b == 1) & (c == 0)), count((b == 0) & (c == 1))
            for li, label in enumerate(labels):
                if n[li] > 0:
                    records.append(
                        (
                            model,
                            name,
                            str(label),
                            n[li],
                            xb[li],
                            xc[li],
                            base_only[li],
                            cand_only[li],
                        )
                    )
    cols = ["model", "slice", "slice_value", "n", "x_base", "x_cand", "n_base_only", "n_cand_only"]
    frame = pd.DataFrame(records, columns=cols)
    return _binary_intervals(frame, confidence)


def _binary_intervals(frame: pd.DataFrame, confidence: float) -> pd.DataFrame:
    n, xb, xc = (frame[c].to_numpy(dtype=float) for c in ("n", "x_base", "x_cand"))
    b, c = frame["n_base_only"].to_numpy(dtype=float), frame["n_cand_only"].to_numpy(dtype=float)
    both = xc - c
    value_lo, value_hi = proportion_ci(xc, n, confidence=confidence)
    delta_lo, delta_hi = paired_difference_ci(b, c, n, confidence=confidence)
    rel_lo, rel_hi = paired_ratio_ci(both, b, c, n, confidence=confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(xb > 0, (xc - xb) / xb, np.nan)
    return frame.assign(
        value=xc / n,
        value_ci_low=value_lo,
        value_ci_high=value_hi,
        baseline_value=xb / n,
        delta=(xc - xb) / n,
        ci_low=delta_lo,
        ci_high=delta_hi,
        rel=rel,
        rel_ci_low=np.where(xb > 0, rel_lo, np.nan),
        rel_ci_high=np.where(xb > 0, rel_hi, np.nan),
        p_value=[mcnemar_test(int(x), int(y)).p_value for x, y in zip(b, c, strict=True)],
        value_method="clopper_pearson",
        delta_method="tango_cc",
        rel_method="tang_cc",
        note=np.where(xb > 0, "", "relative change undefined: the baseline's value is 0"),
    ).drop(columns=["x_base", "x_cand"])


def _bounded_rows(
    matrix: np.ndarray,
    models: list[str],
    groups: Mapping[str, np.ndarray],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    method: str,
) -> pd.DataFrame:
    """Bootstrap rows for values in [0, 1] that are not all 0/1 (BCa, with the guards)."""
    cands = {m: matrix[:, i + 1] for i, m in enumerate(models)}
    boot = paired_bootstrap(
        matrix[:, 0],
        cands,
        groups=groups,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        method=method,
    ).rename(columns={"candidate": "model"})
    boot["p_value"] = _p_values(boot, matrix, models, groups)
    boot = boot.assign(
        value_method="bca_bootstrap",
        delta_method="bca_bootstrap",
        rel_method="bca_bootstrap",
        note="",
    )
    return _bootstrap_guards(boot, confidence).drop(columns=["n_changed"])


def _bootstrap_guards(boot: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Below the minimum n no bootstrap interval; no changed item: the exact zero-change bound."""
    boot = boot.copy()
    unchanged = boot["n_changed"].to_numpy() == 0
    half = zero_change_bound(boot["n"].to_numpy(), confidence=confidence)
    base = boot["baseline_value"].to_numpy(dtype=float)
    boot.loc[unchanged, "ci_low"] = boot.loc[unchanged, "delta"] - half[unchanged]
    boot.loc[unchanged, "ci_high"] = boot.loc[unchanged, "delta"] + half[unchanged]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_half = np.where(base > 0, half / base, np.inf)
    boot.loc[unchanged, "rel_ci_low"] = boot.loc[unchanged, "rel"] - rel_half[unchanged]
    boot.loc[unchanged, "rel_ci_high"] = boot.loc[unchanged, "rel"] + rel_half[unchanged]
    for col in ("delta_method", "rel_method"):
        boot.loc[unchanged, col] = "bounded_zero_change"
    small = boot["n"].to_numpy() < BOOTSTRAP_MIN_N
    cols = ["value_ci_low", "value_ci_high"]
    boot.loc[small, cols] = np.nan
    boot.loc[small & ~unchanged, ["ci_low", "ci_high", "rel_ci_low", "rel_ci_high"]] = np.nan
    boot.loc[small, "note"] = (
        f"fewer than {BOOTSTRAP_MIN_N} paired items: a bootstrap interval is not trusted here"
    )
    return boot


def _p_values(
    boot: pd.DataFrame, matrix: np.ndarray, models: list[str], groups: Mapping[str, np.ndarray]
) -> np.ndarray:
    index = {m: i + 1 for i, m in enumerate(models)}
    codes = {
        name: (c, {str(v): i for i, v in enumerate(labels)})
        for name, labels, c in _slice_codes(groups, matrix.shape[0])
    }
    out = np.empty(len(boot))
    rows = boot[["model", "slice", "slice_value"]].itertuples(index=False)
    for row, (model, slice_name, slice_value) in enumerate(rows):
        item_codes, label_code = codes[slice_name]
        mask = item_codes == label_code[slice_value]
        base, cand = matrix[mask, 0], matrix[mask, index[model]]
        keep = ~np.isnan(base) & ~np.isnan(cand)
        out[row] = paired_p_value(base[keep], cand[keep], binary=False)
    return out


# --------------------------------------------------------------------------- choice distributions


def choice_divergence(
    baseline_probs: Sequence[Sequence[float]],
    candidate_probs: Sequence[Sequence[float]],
    *,
    item_ids: Sequence[Any] | None = None,
    eps: float = 1e-12,
) -> pd.DataFrame:
    """Per-item KL(baseline || candidate) and total variation between choice distributions.

    Parameters
    ----------
    baseline_probs, candidate_probs
        One probability list per item over that item's choices (lists may differ in length
        between items, not between the two models). Each list is renormalised to sum to 1
        after flooring entries at ``eps`` (so a candidate's zero gives a large, finite KL).
    item_ids
        Labels for the rows; default 0..n-1.

    Returns
    -------
    DataFrame
        ``item_id, n_choices, kl, tv`` with KL in nats (:func:`scipy.special.rel_entr`)
        and ``tv = 0.5 * sum |p - q|``. Aggregate with :func:`divergence_summary`.

    Examples
    --------
    >>> choice_divergence([[0.5, 0.5]], [[0.9, 0.1]])[["kl", "tv"]].round(4).values.tolist()
    [[0.5108, 0.4]]
    """
    from scipy.special import rel_entr

    if len(baseline_probs) != len(candidate_probs):
        raise CompkitError(
            f"{len(baseline_probs)} baseline vs {len(candidate_probs)} candidate "
            "probability lists; give one per item for both"
        )
    for i, (a, b) in enumerate(zip(baseline_probs, candidate_probs, strict=True)):
        if len(a) != len(b):
            raise CompkitError(
                f"item {i}: baseline gives {len(a)} choice probabilities, "
                f"candidate {len(b)}; they must cover the same choices"
            )
    p, mask = _padded(baseline_probs, eps, "baseline")
    q, _ = _padded(candidate_probs, eps, "candidate")
    ids = list(range(len(p))) if item_ids is None else list(item_ids)
    return pd.DataFrame(
        {
            "item_id": ids,
            "n_choices": mask.sum(axis=1),
            "kl": rel_entr(p, q).sum(axis=1),
            "tv": 0.5 * np.abs(p - q).sum(axis=1),
        }
    )


def _padded(
    probs: Sequence[Sequence[float]], eps: float, who: str
) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(row) for row in probs), default=0)
    out = np.zeros((len(probs), width))
    mask = np.zeros((len(probs), width), dtype=bool)
    for i, row in enumerate(probs):
        values = np.asarray(row, dtype=np.float64)
        if values.size == 0 or np.any(values < 0) or not np.all(np.isfinite(values)):
            raise CompkitError(f"item {i}: {who} probabilities must be non-empty, finite and >= 0")
        out[i, : values.size] = np.maximum(values, eps)
        mask[i, : values.size] = True
    out /= out.sum(axis=1, keepdims=True)
    return out, mask


def divergence_summary(divergence: pd.DataFrame, *, quantile: float = 0.95) -> pd.DataFrame:
    """Aggregate :func:`choice_divergence`: ``measure, mean, p95, max, n`` for kl and tv."""
    rows = [
        {
            "measure": m,
            "mean": divergence[m].mean(),
            f"p{round(quantile * 100)}": divergence[m].quantile(quantile),
            "max": divergence[m].max(),
            "n": int(divergence[m].count()),
        }
        for m in ("kl", "tv")
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- noise floor


def noise_floor(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    metrics: Sequence[str] | None = None,
    by: str | Sequence[str] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "auto",
) -> pd.DataFrame:
    """The baseline against itself: each repeat r > 0 compared with repeat 0.

    The same statistics as :func:`compare_models` and :func:`flip_table`, so the memo can
    say "the baseline flips x% against itself" next to each candidate's flip rate.

    Returns
    -------
    DataFrame
        ``model, repeat`` + the other :data:`RESULT_COLUMNS` + ``flip_rate``
        (right->wrong + wrong->right), ``right_to_wrong_rate``, ``wrong_to_right_rate``
        (NaN for non-binary metrics). ``model`` is the baseline and ``value`` is repeat r.
        With a single repeat: an empty frame with these columns whose ``attrs["note"]``
        says why.
    """
    _check_outcomes(outcomes, baseline=baseline)
    columns = [
        "model",
        "repeat",
        *RESULT_COLUMNS[1:],
        "flip_rate",
        "right_to_wrong_rate",
        "wrong_to_right_rate",
    ]
    rows = outcomes[outcomes["model"] == baseline]
    repeats = sorted(rows["repeat"].unique())
    if len(repeats) < 2:
        empty = pd.DataFrame(columns=columns)
        empty.attrs["note"] = (
            f"baseline {baseline!r} has a single repeat; run it with repeats >= 2 "
            "to measure its noise floor"
        )
        return empty
    reference = "\x00repeat-0"
    names = {f"{baseline}#repeat{r}": r for r in repeats[1:]}
    pseudo = pd.concat(
        [rows[rows["repeat"] == repeats[0]].assign(model=reference)]
        + [
            rows[rows["repeat"] == r].assign(model=name, repeat=repeats[0])
            for name, r in names.items()
        ],
        ignore_index=True,
    )
    table = compare_models(
        pseudo,
        baseline=reference,
        by=by,
        metrics=metrics,
        repeats="first",
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        method=method,
    )
    rates = _noise_flip_rates(pseudo, reference, table["metric"].unique(), by)
    table = table.merge(rates, on=["model", "slice", "slice_value", "metric"], how="left")
    table["repeat"] = table["model"].map(names)
    table["model"] = baseline
    return table.reindex(columns=columns)


def _noise_flip_rates(
    pseudo: pd.DataFrame, reference: str, metrics: Sequence[str], by
) -> pd.DataFrame:
    frames = []
    for metric in metrics:
        column = _metric_column(pseudo, metric)
        if not _is_binary(pseudo[column].to_numpy(dtype=float)):
            continue
        flips = flip_table(pseudo, baseline=reference, metric=column, repeats="first", by=by)
        wide = flips.pivot_table(
            index=["model", "metric", "slice", "slice_value"],
            columns="flip",
            values="rate",
            observed=True,
        ).reset_index()
        wide = wide.rename(
            columns={
                "right_to_wrong": "right_to_wrong_rate",
                "wrong_to_right": "wrong_to_right_rate",
            }
        )
        wide["flip_rate"] = wide["right_to_wrong_rate"] + wide["wrong_to_right_rate"]
        frames.append(
            wide[
                [
                    "model",
                    "metric",
                    "slice",
                    "slice_value",
                    "flip_rate",
                    "right_to_wrong_rate",
                    "wrong_to_right_rate",
                ]
            ]
        )
    if not frames:
        return pd.DataFrame(
            columns=[
                "model",
                "metric",
                "slice",
                "slice_value",
                "flip_rate",
                "right_to_wrong_rate",
                "wrong_to_right_rate",
            ]
        )
    return pd.concat(frames, ignore_index=True)
