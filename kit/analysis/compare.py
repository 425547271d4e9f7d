"""Paired comparison of candidates against the frozen baseline, item by item.

Every statistic here is *paired*: a candidate and the baseline are compared on the same
items, so item difficulty cancels out and small real differences become visible.

Results share one long shape (see ``docs``/ARCHITECTURE):
``model, slice, slice_value, metric, value, baseline_value, delta, ci_low, ci_high, n, p_value``
with ``slice="overall"``, ``slice_value="all"`` for the rows over every item.

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

import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from kit.errors import CompkitError
from kit.scoring import COLUMN_METRIC, METRICS, MetricInfo, metric_columns

#: The long result shape shared by compare, slices, budget rules, charts and the memo.
RESULT_COLUMNS = [
    "model",
    "slice",
    "slice_value",
    "metric",
    "value",
    "baseline_value",
    "delta",
    "ci_low",
    "ci_high",
    "n",
    "p_value",
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
BOOTSTRAP_METHODS = ("auto", "counts", "indices", "poisson")
OVERALL = ("overall", "all")
#: Below this many discordant pairs McNemar uses the exact binomial test.
MCNEMAR_EXACT_BELOW = 25
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


def metric_info(metric: str) -> MetricInfo:
    """Registry entry for a metric name or an outcome column name (``correct`` -> accuracy).

    Raises
    ------
    CompkitError
        If the metric is not registered in :data:`kit.scoring.METRICS`.
    """
    name = COLUMN_METRIC.get(metric, metric)
    if name not in METRICS:
        raise CompkitError(
            f"metric {metric!r} is not registered in kit.scoring.METRICS (known: {sorted(METRICS)}); "
            "register it there so its direction (higher_is_better) is known"
        )
    return METRICS[name]


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
    base = collapsed.xs(baseline, level="model")
    carry = [c for c in dict.fromkeys(["task", *_as_list(by)]) if c in outcomes.columns]
    item_cols = _item_columns(outcomes, baseline=baseline, columns=carry)
    frames = []
    for model in models:
        cand = collapsed.xs(model, level="model")
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


# --------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on the discordant pairs of a paired binary outcome.

    ``b``: baseline right, candidate wrong; ``c``: baseline wrong, candidate right.
    ``method`` is ``"exact"`` (binomial; statistic = min(b, c)) or ``"chi2"``
    (continuity-corrected chi-square statistic).
    """

    statistic: float
    p_value: float
    b: int
    c: int
    method: str


def mcnemar_test(b: int, c: int, *, exact: bool | None = None) -> McNemarResult:
    """Two-sided McNemar test from the two discordant counts.

    Uses :func:`statsmodels.stats.contingency_tables.mcnemar`.

    Parameters
    ----------
    b, c
        Discordant counts (baseline right & candidate wrong; baseline wrong & candidate right).
    exact
        ``True``: exact binomial test (``exact=True``). ``False``: chi-square with
        Edwards' continuity correction. ``None`` (default): exact when
        ``b + c < MCNEMAR_EXACT_BELOW`` (25, the usual rule below which the chi-square
        approximation is poor), otherwise the corrected chi-square, which tracks the exact
        p-value closely from there on (b=15, c=10: 0.4244 exact vs 0.4237) and whose
        statistic is the conventional one to report for large counts.

    Examples
    --------
    >>> round(mcnemar_test(10, 2).p_value, 4)
    0.0386
    """
    from statsmodels.stats.contingency_tables import mcnemar

    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise CompkitError(f"McNemar counts must be >= 0, got b={b}, c={c}")
    use_exact = (b + c < MCNEMAR_EXACT_BELOW) if exact is None else bool(exact)
    if b + c == 0:
        return McNemarResult(0.0, 1.0, b, c, "exact" if use_exact else "chi2")
    result = mcnemar([[0, b], [c, 0]], exact=use_exact, correction=True)
    return McNemarResult(
        float(result.statistic), float(result.pvalue), b, c, "exact" if use_exact else "chi2"
    )


# --------------------------------------------------------------------------- bootstrap


@dataclass
class _Grouping:
    """One slice column: sorted labels and a code per item (-1 = missing)."""

    name: str
    labels: list[Any]
    codes: np.ndarray


@dataclass
class _Layout:
    """A grouping over the bootstrap rows: contiguous [start, end) per label in ``design``."""

    bounds: list[tuple[int, int]]
    order: np.ndarray | None  # permutation sorting the rows by label (None: already sorted)
    design: np.ndarray  # the design rows in that order


def _groupings(groups: Mapping[str, ArrayLike] | None, n: int) -> list[_Grouping]:
    out = []
    for name, values in (groups or {}).items():
        values = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
        if len(values) != n:
            raise CompkitError(f"group column {name!r} has {len(values)} values for {n} items")
        codes, labels = pd.factorize(pd.Series(values), sort=True)
        out.append(_Grouping(str(name), list(labels), codes.astype(np.int64)))
    return out


def _layout(codes: np.ndarray, n_labels: int, design: np.ndarray) -> _Layout:
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    labels = np.arange(n_labels)
    starts = np.searchsorted(sorted_codes, labels, side="left").tolist()
    ends = np.searchsorted(sorted_codes, labels, side="right").tolist()
    bounds = list(zip(starts, ends, strict=True))
    if np.array_equal(order, np.arange(codes.size)):
        return _Layout(bounds, None, design)
    return _Layout(bounds, order, design[order])


def _paired_design(base: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """(rows, 3k): per candidate the pair indicator, paired difference and candidate value.

    Unpaired items (either value NaN) are 0 in every column. Column-major, so the first
    2k columns (all that resamples need) are a BLAS-ready view.
    """
    k = cands.shape[0]
    out = np.empty((3 * k, base.size))
    base_ok = ~np.isnan(base)
    for j in range(k):
        valid = base_ok & ~np.isnan(cands[j])
        out[j] = valid
        out[k + j] = np.where(valid, cands[j] - base, 0.0)
        out[2 * k + j] = np.where(valid, cands[j], 0.0)
    return out.T


def _compress(
    base: np.ndarray, cands: np.ndarray, groupings: list[_Grouping]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Distinct (slice codes, outcome pattern) rows: (first item of each, counts), or None.

    None when the data has more than n/8 distinct rows: then drawing item indices is
    cheaper than a multinomial over rows.
    """
    n = base.size
    limit = n // 8
    code = np.zeros(n, dtype=np.int64)
    radix = 1
    for column in [base, *cands, *(g.codes for g in groupings)]:
        sub, uniques = pd.factorize(column, use_na_sentinel=True)
        size = len(uniques) + 1
        if size > limit or radix > (2**62) // size:
            return None
        code += (sub.astype(np.int64) + 1) * radix
        radix *= size
    _, first, counts = np.unique(code, return_index=True, return_counts=True)
    if first.size > limit:
        return None
    return first, counts


def _choose_method(method: str, compressed: Any) -> str:
    if method == "auto":
        return "counts" if compressed is not None else "indices"
    if method == "counts" and compressed is None:
        raise CompkitError(
            "method='counts' needs discrete data with few distinct rows (<= n/8); "
            "use method='indices' or 'auto'"
        )
    return method


@functools.cache
def _poisson_cuts() -> np.ndarray:
    """uint16 cuts: for u uniform on 0..65535, #{cuts <= u} is Poisson(1) to within 2**-16."""
    from scipy.stats import poisson

    cuts = np.round(poisson.cdf(np.arange(16), 1.0) * 2**16).astype(np.int64)
    return cuts[cuts < 2**16].astype(np.uint16)


def _poisson_weights(draws: np.ndarray) -> np.ndarray:
    counts = np.zeros(draws.shape, dtype=np.uint8)
    for cut in _poisson_cuts():
        counts += draws >= cut
    return counts.astype(np.float64)


def weight_blocks(
    rng: np.random.Generator,
    *,
    method: str,
    n_rows: int,
    counts: np.ndarray,
    n_resamples: int,
    max_cells: int,
) -> Iterator[np.ndarray]:
    """Bootstrap weights per row, ``block x n_rows`` at a time (at most ``max_cells``)."""
    block = max(1, min(n_resamples, max_cells // max(n_rows, 1)))
    index_dtype = np.int32 if n_rows < 2**31 else np.int64
    n_items = int(counts.sum())
    probs = counts / n_items
    done = 0
    while done < n_resamples:
        size = min(block, n_resamples - done)
        if method == "counts":
            weights = rng.multinomial(n_items, probs, size=size).astype(np.float64)
        elif method == "indices":
            idx = rng.integers(0, n_rows, size=(size, n_rows), dtype=index_dtype)
            weights = np.empty((size, n_rows))
            for r in range(size):
                weights[r] = np.bincount(idx[r], minlength=n_rows)
        else:
            draws = rng.integers(0, 2**16, size=(size, n_rows), dtype=np.uint16)
            weights = _poisson_weights(draws)
        yield weights
        done += size


def _group_sums(
    weights: np.ndarray, design: np.ndarray, layouts: list[_Layout], columns: int
) -> list[np.ndarray]:
    """Weighted sums of the first ``columns`` design columns: overall (b, 1, c), per layout (b, G, c).

    The rows are sorted by the first layout, so the overall sums are its slice sums plus
    the sum over its leading rows without a slice value (one pass over the weights).
    """
    per_layout = []
    for lay in layouts:
        w = weights if lay.order is None else np.take(weights, lay.order, axis=1)
        sums = np.zeros((weights.shape[0], len(lay.bounds), columns))
        for label, (start, end) in enumerate(lay.bounds):
            if end > start:
                sums[:, label] = w[:, start:end] @ lay.design[start:end, :columns]
        per_layout.append(sums)
    if layouts and layouts[0].order is None and layouts[0].bounds:
        unlabelled = layouts[0].bounds[0][0]  # rows with a missing value come first
        overall = (
            per_layout[0].sum(axis=1) + weights[:, :unlabelled] @ design[:unlabelled, :columns]
        )
    else:
        overall = weights @ design[:, :columns]
    return [overall[:, None, :], *per_layout]


def paired_bootstrap(
    baseline: ArrayLike,
    candidates: Mapping[str, ArrayLike],
    *,
    groups: Mapping[str, ArrayLike] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | np.random.Generator = 0,
    method: str = "auto",
    max_cells: int = 2**23,
) -> pd.DataFrame:
    """Paired percentile-bootstrap CIs for the mean difference candidate - baseline.

    Items are resampled jointly: every resample uses the same item weights for the
    baseline, every candidate and every slice, so all intervals come from one set of
    resamples. A slice's statistic is the mean over the resampled items in the slice (its
    size varies across resamples). Sums per slice are matrix products of a block of
    weights with slice-contiguous rows, so the work is vectorised and memory is bounded.

    Parameters
    ----------
    baseline
        Per-item values of the baseline, shape (n,); NaN = metric not defined for the item.
    candidates
        Candidate name -> per-item values aligned with ``baseline``.
    groups
        Slice column name -> per-item slice values (a missing value puts the item in no
        slice of that column; it still counts overall).
    n_resamples, confidence, seed
        Number of resamples, CI level (percentile interval), RNG seed or Generator.
    method
        How resample weights are drawn, ``block`` resamples at a time so that at most
        ``max_cells`` weights exist at once (never an items x resamples matrix):

        ``"indices"``
            the classic bootstrap: per resample, n positions from
            ``rng.integers(0, n, size=(block, n), dtype=np.int32)`` into the items ordered
            (stably) by the first ``groups`` column, counted with ``np.bincount``. The draws
            do not depend on ``block``: resample r uses the same positions as the r-th call
            of ``rng.integers(0, n, size=n, dtype=np.int32)`` in a plain loop.
        ``"counts"``
            exact shortcut for discrete data: items with the same slice values and the same
            outcome pattern over all models are interchangeable, so each distinct row's
            resampled count is drawn from ``Multinomial(n, row_counts / n)`` - the same
            distribution as resampling items, at a cost set by the number of distinct rows
            (at most 3**models x slices for binary metrics), not by n.
        ``"poisson"``
            Poisson bootstrap approximation: independent Poisson(1) weights per item, from
            16-bit uniform draws (probabilities exact to 2**-16, weights capped at 8).
        ``"auto"`` (default)
            ``"counts"`` when there are at most n/8 distinct rows, else ``"indices"``.
    max_cells
        Most weights held at once (rows x block); 2**23 float64 weights are 64 MB.

    Returns
    -------
    DataFrame
        ``candidate, slice, slice_value, value, baseline_value, delta, ci_low, ci_high, n``
        (``slice="overall"``, ``slice_value="all"`` first). Only items where both values are
        defined count (``n`` pairs); value and baseline value are means over those pairs.
        Resamples in which a slice has no pairs are skipped when taking percentiles; slice
        values without pairs are dropped.

    Examples
    --------
    >>> base = np.array([1, 1, 0, 1, 0, 1.0])
    >>> out = paired_bootstrap(base, {"q4": np.array([1, 0, 0, 1, 0, 1.0])}, n_resamples=200)
    >>> out[["candidate", "delta"]].round(3).values.tolist()
    [['q4', -0.167]]
    """
    _check_choice("method", method, BOOTSTRAP_METHODS)
    if not 0 < confidence < 1:
        raise CompkitError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise CompkitError(f"n_resamples must be >= 1, got {n_resamples}")
    base = np.asarray(baseline, dtype=np.float64)
    names = list(candidates)
    if not names:
        raise CompkitError("paired_bootstrap needs at least one candidate")
    cands = np.stack([np.asarray(candidates[m], dtype=np.float64) for m in names])
    if base.ndim != 1 or cands.shape[1] != base.size:
        raise CompkitError(
            f"baseline has shape {base.shape}; every candidate needs {base.size} values"
        )
    groupings = _groupings(groups, base.size)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    points, reps = _bootstrap_sums(
        base, cands, groupings, rng=rng, n_resamples=n_resamples, method=method, max_cells=max_cells
    )
    return _bootstrap_frame(names, groupings, points, reps, confidence)


def _bootstrap_sums(
    base: np.ndarray,
    cands: np.ndarray,
    groupings: list[_Grouping],
    *,
    rng: np.random.Generator,
    n_resamples: int,
    method: str,
    max_cells: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full-sample sums (G, 3k) and per-resample sums (R, G, 2k): overall, then per grouping."""
    k = cands.shape[0]
    compressed = _compress(base, cands, groupings) if method in ("auto", "counts") else None
    method = _choose_method(method, compressed)
    if method == "counts":
        rows, counts = compressed  # type: ignore[misc]
    else:
        rows, counts = np.arange(base.size), np.ones(base.size, dtype=np.int64)
    if groupings:  # rows sorted by the first slice column: its slices are contiguous
        first = np.argsort(groupings[0].codes[rows], kind="stable")
        rows, counts = rows[first], counts[first]
    design = _paired_design(base[rows], cands[:, rows])
    layouts = [_layout(g.codes[rows], len(g.labels), design) for g in groupings]
    points = [p[0] for p in _group_sums(counts[None, :].astype(np.float64), design, layouts, 3 * k)]
    reps = [np.empty((n_resamples, p.shape[0], 2 * k)) for p in points]
    blocks = weight_blocks(
        rng,
        method=method,
        n_rows=rows.size,
        counts=counts,
        n_resamples=n_resamples,
        max_cells=max_cells,
    )
    done = 0
    for weights in blocks:
        for rep, part in zip(reps, _group_sums(weights, design, layouts, 2 * k), strict=True):
            rep[done : done + weights.shape[0]] = part
        done += weights.shape[0]
    return points, reps


def _bootstrap_frame(
    names: list[str],
    groupings: list[_Grouping],
    points: list[np.ndarray],
    reps: list[np.ndarray],
    confidence: float,
) -> pd.DataFrame:
    k = len(names)
    tail = (1 - confidence) / 2
    labels = [[OVERALL]] + [[(g.name, v) for v in g.labels] for g in groupings]
    rows = []
    for point, rep, lab in zip(points, reps, labels, strict=True):
        if not lab:
            continue
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            deltas = rep[..., k:] / rep[..., :k]  # (R, G, k)
            low, high = np.nanquantile(deltas, [tail, 1 - tail], axis=0)
        for gi, (slice_name, slice_value) in enumerate(lab):
            for ki, name in enumerate(names):
                pairs, diff_sum, cand_sum = point[gi, ki], point[gi, k + ki], point[gi, 2 * k + ki]
                if pairs == 0:
                    continue
                value, delta = cand_sum / pairs, diff_sum / pairs
                rows.append(
                    (
                        name,
                        slice_name,
                        str(slice_value),
                        value,
                        value - delta,
                        delta,
                        low[gi, ki],
                        high[gi, ki],
                        int(pairs),
                    )
                )
    columns = [
        "candidate",
        "slice",
        "slice_value",
        "value",
        "baseline_value",
        "delta",
        "ci_low",
        "ci_high",
        "n",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    order = {name: i for i, name in enumerate(names)}
    frame = frame.sort_values("candidate", key=lambda s: s.map(order), kind="stable")
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------- compare_models


def compare_models(
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    by: str | Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    repeats: str = "mean",
    n_resamples: int = 1000,
    confidence: float = 0.95,
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
    n_resamples, confidence, seed, method
        Passed to :func:`paired_bootstrap`; the same seed is used for every metric.

    Returns
    -------
    DataFrame
        :data:`RESULT_COLUMNS`. ``delta = value - baseline_value`` over the ``n`` items
        where both models have the metric; ``ci_low, ci_high`` bound ``delta``.
        ``p_value`` (two-sided): McNemar (:func:`mcnemar_test`) when the metric's per-item
        values are all 0/1 (binary metrics with one repeat, or any repeats mode other than
        ``"mean"``); otherwise the Wilcoxon signed-rank test on the paired differences
        (:func:`scipy.stats.wilcoxon`, zero differences dropped; 1.0 when all are zero).
        Wilcoxon tests for a symmetric shift, the CI describes the mean difference.
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
        cands = {m: matrix[:, i + 1] for i, m in enumerate(models)}
        boot = paired_bootstrap(
            matrix[:, 0],
            cands,
            groups=groups,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
            method=method,
        )
        boot["p_value"] = _p_values(boot, matrix, models, groups)
        frames.append(boot.assign(metric=name).rename(columns={"candidate": "model"}))
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.concat(frames, ignore_index=True)[RESULT_COLUMNS]


def _metric_map(outcomes: pd.DataFrame, metrics: Sequence[str] | None) -> dict[str, str]:
    present = metric_columns(outcomes)
    if metrics is None:
        return present
    out = {}
    for metric in metrics:
        column = _metric_column(outcomes, metric)
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


def _p_values(
    boot: pd.DataFrame, matrix: np.ndarray, models: list[str], groups: Mapping[str, np.ndarray]
) -> np.ndarray:
    binary = _is_binary(matrix)
    index = {m: i + 1 for i, m in enumerate(models)}
    codes = {
        g.name: (g.codes, {str(v): i for i, v in enumerate(g.labels)})
        for g in _groupings(groups, matrix.shape[0])
    }
    out = np.empty(len(boot))
    rows = boot[["candidate", "slice", "slice_value"]].itertuples(index=False)
    for row, (model, slice_name, slice_value) in enumerate(rows):
        if slice_name == OVERALL[0]:
            mask = np.ones(matrix.shape[0], dtype=bool)
        else:
            item_codes, label_code = codes[slice_name]
            mask = item_codes == label_code[slice_value]
        base, cand = matrix[mask, 0], matrix[mask, index[model]]
        keep = ~np.isnan(base) & ~np.isnan(cand)
        out[row] = _paired_p_value(base[keep], cand[keep], binary=binary)
    return out


def _paired_p_value(base: np.ndarray, cand: np.ndarray, *, binary: bool) -> float:
    if binary:
        b = int(np.sum((base == 1) & (cand == 0)))
        c = int(np.sum((base == 0) & (cand == 1)))
        return mcnemar_test(b, c).p_value
    diff = cand - base
    if not np.any(diff != 0):
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(diff, zero_method="wilcox").pvalue)


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


# --------------------------------------------------------------------------- power


def minimum_detectable_effect(
    n: int | ArrayLike, *, p: float, alpha: float = 0.05, power: float = 0.8
) -> float | np.ndarray:
    """Smallest paired difference of a binary metric that ``n`` items detect.

    The per-item difference ``d = candidate - baseline`` of a paired binary metric is -1,
    0 or 1; with discordant rate ``p`` (share of items whose outcome differs, i.e. the flip
    rate right->wrong + wrong->right) and true difference ``delta`` it has variance
    ``p - delta**2``. A two-sided test of mean zero with the normal approximation detects
    standardised effect ``es = delta / sqrt(p - delta**2)`` with the given power, where
    ``es`` comes from :class:`statsmodels.stats.power.NormalIndPower` (one sample,
    ``ratio=0``). Solving gives ``delta = es * sqrt(p) / sqrt(1 + es**2)``.

    Returns ``inf`` where even ``delta = p`` (every discordant pair one way) is not
    detectable. For a metric in [0, 1] that is not binary, reading ``p`` as the share of
    items whose value changes over-states the variance, so the result is conservative.

    Parameters
    ----------
    n
        Number of paired items (scalar or array).
    p
        Expected discordant rate in (0, 1].

    Examples
    --------
    >>> round(float(minimum_detectable_effect(1000, p=0.1)), 4)
    0.0279
    """
    from statsmodels.stats.power import NormalIndPower

    if not 0 < p <= 1:
        raise CompkitError(f"discordant rate p must be in (0, 1], got {p}")
    sizes = np.atleast_1d(np.asarray(n, dtype=np.float64))
    out = np.full(sizes.shape, np.inf)
    solver = NormalIndPower()
    for i, size in enumerate(sizes):
        if size < 2:
            continue
        es = solver.solve_power(effect_size=None, nobs1=size, alpha=alpha, power=power, ratio=0.0)
        delta = float(es) * math.sqrt(p) / math.sqrt(1 + float(es) ** 2)
        out[i] = delta if delta <= p else np.inf
    return float(out[0]) if np.ndim(n) == 0 else out


def mde_warnings(
    table: pd.DataFrame,
    *,
    budgets: Mapping[str, float],
    discordant_rate: float = 0.1,
    flips: pd.DataFrame | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> pd.DataFrame:
    """Rows of a comparison table too small to detect the drop a budget cares about.

    Parameters
    ----------
    table
        A :data:`RESULT_COLUMNS` frame (:func:`compare_models`, ``kit.analysis.slices.slice_table``).
    budgets
        Metric name -> tolerated drop on the metric's own 0-1 scale (0.02 = 2 points).
    discordant_rate
        Expected share of items that flip either way, used where ``flips`` has no value.
    flips
        Optional :func:`flip_table` output; its right->wrong + wrong->right rate for the
        same model, metric and slice replaces ``discordant_rate``.

    Returns
    -------
    DataFrame
        ``model, slice, slice_value, metric, n, budget, discordant_rate, mde, underpowered,
        message`` for every budgeted row; ``underpowered`` when ``mde > budget``
        (:func:`minimum_detectable_effect`).
    """
    keys = ["model", "slice", "slice_value", "metric"]
    rows = table[table["metric"].isin(list(budgets))][[*keys, "n"]].copy()
    rows["budget"] = rows["metric"].map(budgets).astype(float)
    rows["discordant_rate"] = float(discordant_rate)
    if flips is not None and len(flips):
        disc = flips[flips["flip"].isin(["right_to_wrong", "wrong_to_right"])]
        disc = disc.groupby(keys, as_index=False)["rate"].sum()
        rows = rows.merge(disc, on=keys, how="left")
        rows["discordant_rate"] = rows["rate"].where(rows["rate"] > 0, rows["discordant_rate"])
        rows = rows.drop(columns="rate")
    rows["mde"] = [
        minimum_detectable_effect(int(n), p=min(float(q), 1.0), alpha=alpha, power=power)
        for n, q in zip(rows["n"], rows["discordant_rate"], strict=True)
    ]
    rows["underpowered"] = rows["mde"] > rows["budget"]
    rows["message"] = [
        (f"{s}={v}: n={n} detects drops of {m:.3f} or more (budget {b:.3f})" if u else "")
        for s, v, n, m, b, u in zip(
            rows["slice"],
            rows["slice_value"],
            rows["n"],
            rows["mde"],
            rows["budget"],
            rows["underpowered"],
            strict=True,
        )
    ]
    return rows.reset_index(drop=True)
