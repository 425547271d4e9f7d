"""Slice tables, CI-aware worst slices, and discovery of slices where flips concentrate.

All statistics come from :mod:`kit.analysis.compare`; this module only decides which items form a
slice and how slices are ranked.

Example
-------
>>> table = slice_table(outcomes, slices, baseline="base")                # doctest: +SKIP
>>> worst_slices(table, metric="accuracy", k=5)                           # doctest: +SKIP
>>> flags = item_flips(outcomes, baseline="base", candidates="q4")        # doctest: +SKIP
>>> discover_slices(flags, slices, columns=["language", "channel"])       # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.analysis.compare import OVERALL, compare_models, metric_info
from kit.errors import CompkitError

#: Columns of a slices frame (``kit.evalset.derive_slices``) that are not slice columns.
NOT_SLICES = ("id", "item_id", "prompt_tokens", "label")

DISCOVERY_COLUMNS = [
    "slice",
    "order",
    "n",
    "support",
    "flips",
    "flip_rate",
    "overall_flip_rate",
    "lift",
    "score",
]


def default_slice_columns(slices_frame: pd.DataFrame) -> list[str]:
    """Every column of ``slices_frame`` except the item id, token counts and raw labels."""
    return [c for c in slices_frame.columns if c not in NOT_SLICES]


def attach_slices(
    outcomes: pd.DataFrame, slices_frame: pd.DataFrame, columns: Sequence[str]
) -> pd.DataFrame:
    if "id" not in slices_frame.columns:
        raise CompkitError("the slices frame needs an 'id' column (see kit.evalset.derive_slices)")
    missing = [c for c in columns if c not in slices_frame.columns]
    if missing:
        raise CompkitError(
            f"slice column(s) {missing} are not in the slices frame; columns: "
            f"{list(slices_frame.columns)}"
        )
    dup = slices_frame["id"][slices_frame["id"].duplicated()]
    if len(dup):
        raise CompkitError(f"the slices frame repeats item id(s), e.g. {dup.iloc[:3].tolist()}")
    absent = sorted(set(outcomes["item_id"]) - set(slices_frame["id"]))
    if absent:
        raise CompkitError(
            f"{len(absent)} outcome item(s) have no row in the slices frame, e.g. {absent[:3]}; "
            "were the slices derived from the same eval set?"
        )
    table = slices_frame.set_index("id")[list(columns)]
    return outcomes.drop(columns=[c for c in columns if c in outcomes.columns]).join(
        table, on="item_id"
    )


def slice_table(
    outcomes: pd.DataFrame,
    slices_frame: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    slice_columns: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    repeats: str = "mean",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "auto",
) -> pd.DataFrame:
    """Every metric for every value of every slice column, in the long result shape.

    Parameters
    ----------
    outcomes
        Per-item outcome table (``model, item_id, repeat, ...``).
    slices_frame
        Item table with ``id`` and slice columns, e.g. :func:`kit.evalset.derive_slices`.
    slice_columns
        Default: :func:`default_slice_columns` (``task, language, length_bucket,
        label_rarity`` and the user columns). Items with a missing value (``label_rarity``
        of a non-classification item) belong to no value of that column.
    Others
        As in :func:`kit.analysis.compare.compare_models`, which computes every number here.

    Returns
    -------
    DataFrame
        :data:`kit.analysis.compare.RESULT_COLUMNS`: the overall rows, then one row per model,
        slice column, slice value and metric. One set of bootstrap resamples serves every
        slice (see :func:`kit.analysis.compare.paired_bootstrap`).
    """
    columns = (
        list(slice_columns) if slice_columns is not None else default_slice_columns(slices_frame)
    )
    merged = attach_slices(outcomes, slices_frame, columns)
    return compare_models(
        merged,
        baseline=baseline,
        candidates=candidates,
        by=columns,
        metrics=metrics,
        repeats=repeats,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        method=method,
    )


def worst_slices(
    table: pd.DataFrame,
    *,
    metric: str = "accuracy",
    k: int = 10,
    min_n: int = 30,
) -> pd.DataFrame:
    """The ``k`` slices per model with the clearest drop, judged by the CI bound nearest zero.

    A slice is ranked by ``harm_bound``: the optimistic end of its delta's CI turned into
    a drop (for a higher-is-better metric ``-ci_high``, for a lower-is-better one
    ``ci_low``; the direction comes from :data:`kit.scoring.METRICS`). A positive
    ``harm_bound`` means even the optimistic bound is a drop (``clear_drop``). Ties are
    broken by the point drop. Overall rows and slices with ``n < min_n`` are left out.

    Returns
    -------
    DataFrame
        The table's rows for ``metric`` plus ``drop`` (point drop, positive = worse),
        ``harm_bound`` and ``clear_drop``, worst first within each model.
    """
    higher = metric_info(metric).higher_is_better
    rows = table[
        (table["metric"] == metric) & (table["slice"] != OVERALL[0]) & (table["n"] >= min_n)
    ]
    rows = rows.copy()
    rows["drop"] = -rows["delta"] if higher else rows["delta"]
    rows["harm_bound"] = -rows["ci_high"] if higher else rows["ci_low"]
    rows["clear_drop"] = rows["harm_bound"] > 0
    models = {m: i for i, m in enumerate(dict.fromkeys(table["model"]))}
    rows = rows.assign(_model=rows["model"].map(models)).sort_values(
        ["_model", "harm_bound", "drop"], ascending=[True, False, False], kind="stable"
    )
    return rows.groupby("model", sort=False).head(k).drop(columns="_model").reset_index(drop=True)


# --------------------------------------------------------------------------- discovery


def _flags(item_flags: pd.DataFrame | pd.Series, flag: str) -> pd.Series:
    """0/1 per item id from a flag Series, a flag column, or an item_flips ``flip`` column."""
    if isinstance(item_flags, pd.Series):
        series = item_flags
    else:
        if "item_id" not in item_flags.columns:
            raise CompkitError(
                "item flags need an 'item_id' column (e.g. from kit.analysis.compare.item_flips)"
            )
        if "model" in item_flags.columns and item_flags["model"].nunique() > 1:
            raise CompkitError(
                f"item flags hold models {sorted(item_flags['model'].unique())}; pass one "
                "model's rows (item_flips(..., candidates=NAME))"
            )
        if flag in item_flags.columns:
            values = item_flags[flag]
        elif "flip" in item_flags.columns:
            values = item_flags["flip"] == flag
        else:
            raise CompkitError(f"item flags have neither a {flag!r} column nor a 'flip' column")
        series = pd.Series(values.to_numpy(), index=item_flags["item_id"].to_numpy())
    if series.index.duplicated().any():
        raise CompkitError("item flags repeat item ids; give one flag per item")
    return series.dropna().astype(float)


def _slice_score(errors, sizes, *, n_total: int, avg: float, alpha: float):
    """SliceLine score: alpha * (err_rate / avg - 1) - (1 - alpha) * (n / size - 1)."""
    return alpha * (errors / sizes / avg - 1) - (1 - alpha) * (n_total / sizes - 1)


def _score_upper_bound(errors, sizes, *, sigma: int, n_total: int, avg: float, alpha: float):
    """Best score any sub-slice (size in [sigma, size], errors <= min(errors, size)) can reach.

    The score of a sub-slice of size s with e' <= min(errors, s) errors is largest with
    e' = min(errors, s); as a function of s it peaks at s = sigma, s = errors or s = size.
    """
    best = np.full(np.shape(sizes), -np.inf)
    for s in (np.full(np.shape(sizes), sigma), np.clip(errors, sigma, sizes), sizes):
        s = np.maximum(np.minimum(s, sizes), 1)
        score = _slice_score(np.minimum(errors, s), s, n_total=n_total, avg=avg, alpha=alpha)
        best = np.maximum(best, np.where(s >= sigma, score, -np.inf))
    return best


def _keys(codes: dict[str, np.ndarray], cards: dict[str, int], cols: tuple[str, ...]) -> np.ndarray:
    key = np.zeros(len(next(iter(codes.values()))), dtype=np.int64)
    radix = 1
    for c in cols:
        if radix > 2**62 // max(cards[c], 1):
            raise CompkitError(f"too many value combinations for slice columns {list(cols)}")
        key += codes[c] * radix
        radix *= max(cards[c], 1)
    return key


def discover_slices(
    item_flags: pd.DataFrame | pd.Series,
    slices_frame: pd.DataFrame,
    *,
    columns: Sequence[str],
    flag: str = "right_to_wrong",
    max_order: int = 2,
    min_support: int | float = 0.01,
    alpha: float = 0.95,
    k: int = 20,
) -> pd.DataFrame:
    """Conjunctions of slice values where flips concentrate (SliceLine-style).

    Scores follow SliceLine (Sagadeeva & Boehm, SIGMOD 2021):
    ``score = alpha * (flip_rate / overall_flip_rate - 1) - (1 - alpha) * (N / n - 1)``,
    trading a slice's flip concentration against its size. Enumeration is level-wise up
    to ``max_order`` predicates: a slice is kept when it has at least ``min_support``
    items and a flip; a slice is expanded only if all its parents were kept and their
    score upper bound beats the current k-th best score (the paper's size and score
    pruning), so sparse and hopeless branches are never enumerated.

    Parameters
    ----------
    item_flags
        One model's :func:`kit.analysis.compare.item_flips` rows (``flip == flag`` is the event), a
        frame with ``item_id`` and a 0/1 column named ``flag``, or a 0/1 Series by item id.
    slices_frame
        Item table with ``id`` and the slice ``columns``; missing values form no slice.
    columns
        Slice columns whose values make predicates ("language=de").
    max_order
        Largest number of predicates in a conjunction (2 or 3 is plenty).
    min_support
        Minimum slice size: a count (int >= 1) or a share of the items (float < 1).
    alpha
        Weight of flip concentration vs slice size in (0, 1].

    Returns
    -------
    DataFrame
        ``slice, order, n, support, flips, flip_rate, overall_flip_rate, lift, score`` for
        the ``k`` best slices with a positive score, best first; ``slice`` reads
        ``"channel=email & language=de"`` (columns in the given order).
    """
    if not 0 < alpha <= 1:
        raise CompkitError(f"alpha must be in (0, 1], got {alpha}")
    flags = _flags(item_flags, flag)
    frame = _items_with_slices(flags, slices_frame, columns)
    errors = flags.to_numpy()
    n_total, total = errors.size, float(errors.sum())
    if n_total == 0 or total == 0:
        return pd.DataFrame(columns=DISCOVERY_COLUMNS)
    sigma = max(1, int(min_support) if min_support >= 1 else math.ceil(min_support * n_total))
    ctx = {"n_total": n_total, "avg": total / n_total, "alpha": alpha}
    codes, cards = {}, {}
    for c in columns:
        codes[c], uniques = pd.factorize(frame[c], sort=True)
        cards[c] = len(uniques)
    found: list[dict] = []
    alive: dict[tuple[str, ...], np.ndarray] = {}
    for order in range(1, max_order + 1):
        level = []
        for cols in itertools.combinations(columns, order):
            parents = [tuple(c for c in cols if c != drop) for drop in cols] if order > 1 else []
            if any(p not in alive for p in parents):
                continue
            mask = np.all([codes[c] >= 0 for c in cols], axis=0)
            for p in parents:
                mask &= np.isin(_keys(codes, cards, p), alive[p])
            if not mask.any():
                continue
            rows = np.flatnonzero(mask)
            keys, first, inverse, sizes = np.unique(
                _keys(codes, cards, cols)[rows],
                return_index=True,
                return_inverse=True,
                return_counts=True,
            )
            errs = np.bincount(inverse, weights=errors[rows], minlength=keys.size)
            keep = (sizes >= sigma) & (errs > 0)
            scores = _slice_score(errs, sizes, **ctx)
            bound = _score_upper_bound(errs, sizes, sigma=sigma, **ctx)
            level.append((cols, keys[keep], bound[keep]))
            for i in np.flatnonzero(keep):
                found.append(
                    _describe(frame, cols, rows[first[i]], sizes[i], errs[i], scores[i], order)
                )
        threshold = _kth_best([f["score"] for f in found], k)
        alive = {
            cols: keys[bound > threshold]
            for cols, keys, bound in level
            if (bound > threshold).any()
        }
    return _discovery_frame(found, n_total=n_total, avg=total / n_total, k=k)


def _items_with_slices(
    flags: pd.Series, slices_frame: pd.DataFrame, columns: Sequence[str]
) -> pd.DataFrame:
    if "id" not in slices_frame.columns:
        raise CompkitError("the slices frame needs an 'id' column (see kit.evalset.derive_slices)")
    missing = [c for c in columns if c not in slices_frame.columns]
    if missing:
        raise CompkitError(f"slice column(s) {missing} are not in the slices frame")
    table = slices_frame.drop_duplicates("id").set_index("id")
    absent = [i for i in flags.index if i not in table.index]
    if absent:
        raise CompkitError(
            f"{len(absent)} flagged item(s) have no row in the slices frame, e.g. {absent[:3]}"
        )
    return table.loc[flags.index, list(columns)].reset_index(drop=True)


def _describe(frame, cols, row, size, errs, score, order) -> dict:
    text = " & ".join(f"{c}={frame.at[row, c]}" for c in cols)
    return {
        "slice": text,
        "order": order,
        "n": int(size),
        "flips": int(errs),
        "score": float(score),
    }


def _kth_best(scores: list[float], k: int) -> float:
    """Pruning threshold: the k-th best score so far (never below 0)."""
    if len(scores) < k:
        return 0.0
    return max(0.0, float(np.sort(scores)[-k]))


def _discovery_frame(found: list[dict], *, n_total: int, avg: float, k: int) -> pd.DataFrame:
    if not found:
        return pd.DataFrame(columns=DISCOVERY_COLUMNS)
    out = pd.DataFrame(found)
    out = out[out["score"] > 0]
    out["support"] = out["n"] / n_total
    out["flip_rate"] = out["flips"] / out["n"]
    out["overall_flip_rate"] = avg
    out["lift"] = out["flip_rate"] / avg
    out = out.sort_values(["score", "order", "slice"], ascending=[False, True, True], kind="stable")
    return out.head(k)[DISCOVERY_COLUMNS].reset_index(drop=True)
