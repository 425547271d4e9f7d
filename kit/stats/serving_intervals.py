"""Intervals the serving stage needs beyond :mod:`kit.stats.intervals` (to be folded in there).

=============================  ================================================================
method                         used for
=============================  ================================================================
``garwood_poisson``            a request rate (requests/s): the exact Poisson interval of the
                               count of completed requests over the measured seconds
``poisson_ratio_conditional``  the ratio of two independent request rates (candidate /
                               baseline): Clopper–Pearson on the conditional binomial share
``order_statistic_union``      the difference and ratio of a quantile (p95 TTFT) between two
                               independent samples: each sample's order-statistic interval at
                               ``1 - alpha/2``, combined by a union bound
``clopper_pearson_union``      the difference of two independent proportions (error rates
                               measured on different requests): two Clopper–Pearson intervals
                               at ``1 - alpha/2``, combined by a union bound
``cluster_bootstrap``          a quantile of inter-token gaps: gaps within a request are not
                               independent, so requests are resampled whole (percentile
                               bootstrap of the pooled gaps)
``bca_bootstrap``              a mean per request (output tokens, cost): scipy's BCa bootstrap
``union_product``              a product or quotient of two independently estimated positive
                               quantities (tokens/s = requests/s x tokens per request, cost per
                               1,000 correct = cost per request / accuracy): each factor's
                               interval at ``1 - alpha/2``, bounds multiplied / divided
``single_measurement``         a figure measured once (peak memory, size on disk, cold start):
                               no sampling interval; the bounds are the value
=============================  ================================================================

Why these are valid
-------------------
*Rates.* A profile's completed requests over its measured window form a counting process.
For Poisson arrivals (an open-loop ``poisson`` profile below saturation) the count is
Poisson and Garwood's interval is exact. Closed-loop profiles (synchronous, N users) and
``constant`` arrivals complete requests more regularly than a Poisson process (the count's
variance is below its mean), so the Poisson interval is conservative for them. It is not
for bursty, over-dispersed traffic (a server that stalls for seconds); the per-request
timelines are stored so a batch-means interval can be computed where that matters.

*Ratio of rates.* For independent Poisson counts ``x_a ~ Poi(r_a t_a)`` and
``x_b ~ Poi(r_b t_b)``, ``x_a`` given ``x_a + x_b`` is binomial with share
``r_a t_a / (r_a t_a + r_b t_b)``, a monotone function of ``r_a / r_b``; an exact
(Clopper–Pearson) interval for the share maps to an exact interval for the ratio
(Przyborowski & Wilenski 1940). The same caveat on over-dispersion applies.

*Union bounds.* If interval A covers its quantity with probability >= 1 - alpha/2 and
interval B covers its own with >= 1 - alpha/2, both cover with >= 1 - alpha (Bonferroni),
and then every function monotone in each argument lies between the function's values at the
bounds. This holds whatever the dependence between the two estimates, so it needs no
independence; it is conservative.

*Order statistics.* :func:`kit.stats.intervals.quantile_ci` covers a quantile for any
continuous distribution of independent requests. Requests of one profile are close to
independent given the load; inter-token gaps inside one request are not, hence the cluster
bootstrap for ITL.

Examples
--------
>>> lo, hi = poisson_rate_ci(20, 10.0)
>>> round(lo, 3), round(hi, 3)
(1.222, 3.089)
>>> est, lo, hi = poisson_rate_ratio_ci(40, 10.0, 20, 10.0)
>>> round(est, 2), round(lo, 2), round(hi, 2)
(2.0, 1.14, 3.61)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from kit.errors import CompkitError
from kit.stats.intervals import check_confidence, proportion_ci, quantile_ci

#: Method name -> one line the memo quotes (to be merged into kit.stats.intervals.METHODS).
# The methods here are named in kit.stats.intervals.METHODS (one list for the memo).


def _half(confidence: float) -> float:
    """The confidence of each of two intervals whose union bound has ``confidence``."""
    check_confidence(confidence)
    return 1 - (1 - confidence) / 2


def poisson_rate_ci(
    count: int, exposure_s: float, *, confidence: float = 0.95
) -> tuple[float, float]:
    """Garwood's exact interval of a rate from ``count`` events in ``exposure_s`` seconds.

    ``count == 0`` gives a lower bound of 0; ``exposure_s <= 0`` gives ``(0, inf)``.
    """
    from scipy.stats import chi2

    check_confidence(confidence)
    if count < 0:
        raise CompkitError(f"an event count must be >= 0, got {count}")
    if exposure_s <= 0:
        return 0.0, math.inf
    alpha = 1 - confidence
    low = chi2.ppf(alpha / 2, 2 * count) / 2 if count > 0 else 0.0
    high = chi2.ppf(1 - alpha / 2, 2 * count + 2) / 2
    return float(low / exposure_s), float(high / exposure_s)


def poisson_rate_ratio_ci(
    count_a: int,
    exposure_a: float,
    count_b: int,
    exposure_b: float,
    *,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of the ratio of rate a to rate b (conditional binomial).

    ``count_b == 0`` gives an infinite estimate and upper bound; both zero: ``(nan, 0, inf)``.
    """
    if exposure_a <= 0 or exposure_b <= 0:
        return math.nan, 0.0, math.inf
    total = count_a + count_b
    if total == 0:
        return math.nan, 0.0, math.inf
    scale = exposure_b / exposure_a
    lo_p, hi_p = proportion_ci(count_a, total, confidence=confidence)

    def odds(p: float) -> float:
        return math.inf if p >= 1 else p / (1 - p) * scale

    estimate = math.inf if count_b == 0 else (count_a / exposure_a) / (count_b / exposure_b)
    return estimate, odds(float(lo_p)), odds(float(hi_p))


def requests_to_bound(q: float, *, confidence: float = 0.95) -> int:
    """Fewest observations whose order-statistic interval of the ``q`` quantile has a finite
    upper bound: the largest of n values exceeds the quantile with probability
    ``1 - q**n``, which must reach ``1 - alpha/2`` (p95: 72, p99: 368 at 95%).

    Examples
    --------
    >>> requests_to_bound(0.95), requests_to_bound(0.99), requests_to_bound(0.5)
    (72, 368, 6)
    """
    check_confidence(confidence)
    if not 0 < q < 1:
        raise CompkitError(f"quantile must be in (0, 1), got {q}")
    return math.ceil(math.log((1 - confidence) / 2) / math.log(q))


def union_difference(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Bounds of ``A - B`` from intervals of A and B (each at ``1 - alpha/2``)."""
    return a[0] - b[1], a[1] - b[0]


def union_ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Bounds of ``A / B`` for positive A and B from their intervals (each at ``1 - alpha/2``)."""
    low = a[0] / b[1] if b[1] > 0 else 0.0
    high = a[1] / b[0] if b[0] > 0 else math.inf
    return max(0.0, low), high


def union_product_bounds(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Bounds of ``A * B`` for non-negative A and B from their intervals (each at
    ``1 - alpha/2``): ``(a_low * b_low, a_high * b_high)``."""
    return max(0.0, a[0]) * max(0.0, b[0]), a[1] * b[1]


def two_sample_quantile_ci(
    a: ArrayLike, b: ArrayLike, q: float, *, confidence: float = 0.95
) -> dict[str, float]:
    """Difference and relative change of the ``q`` quantile of ``a`` against ``b``.

    Returns ``delta, ci_low, ci_high`` (a - b) and ``rel, rel_ci_low, rel_ci_high``
    ((a - b) / b), from :func:`~kit.stats.intervals.quantile_ci` of each sample at
    ``1 - alpha/2`` (``order_statistic_union``). Infinite bounds stay infinite: with 20
    requests nothing bounds a p99.
    """
    half = _half(confidence)
    est_a, lo_a, hi_a = quantile_ci(a, q, confidence=half)
    est_b, lo_b, hi_b = quantile_ci(b, q, confidence=half)
    d_lo, d_hi = union_difference((lo_a, hi_a), (lo_b, hi_b))
    r_lo, r_hi = union_ratio((max(lo_a, 0.0), hi_a), (max(lo_b, 0.0), hi_b))
    rel = (est_a - est_b) / est_b if est_b > 0 else math.nan
    return {
        "delta": est_a - est_b,
        "ci_low": d_lo,
        "ci_high": d_hi,
        "rel": rel,
        "rel_ci_low": r_lo - 1,
        "rel_ci_high": r_hi - 1,
    }


def independent_proportion_difference_ci(
    x_a: int, n_a: int, x_b: int, n_b: int, *, confidence: float = 0.95
) -> tuple[float, float]:
    """Union bound of two Clopper–Pearson intervals for ``x_a/n_a - x_b/n_b``."""
    half = _half(confidence)
    a = proportion_ci(x_a, n_a, confidence=half)
    b = proportion_ci(x_b, n_b, confidence=half)
    return union_difference((float(a[0]), float(a[1])), (float(b[0]), float(b[1])))


def cluster_quantile_ci(
    groups: Sequence[ArrayLike],
    q: float | Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float] | list[tuple[float, float, float]]:
    """``(estimate, low, high)`` of the ``q`` quantile of the values of all ``groups``
    (a list of such triples when ``q`` is a sequence; the resamples are shared).

    The estimate is ``numpy.quantile`` of the pooled values (linear interpolation); the
    interval resamples groups (requests) with replacement and takes the weighted quantile
    of their pooled values, ``n_resamples`` times (percentile interval). Fewer than two
    non-empty groups give infinite bounds.
    """
    check_confidence(confidence)
    qs = [float(q)] if np.ndim(q) == 0 else [float(x) for x in q]  # type: ignore[union-attr]
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    arrays = [g[np.isfinite(g)] for g in arrays]
    arrays = [g for g in arrays if g.size]
    out = _cluster_quantiles(arrays, qs, confidence, n_resamples, seed)
    return out[0] if np.ndim(q) == 0 else out


def _cluster_quantiles(arrays, qs, confidence, n_resamples, seed):
    if not arrays:
        return [(math.nan, -math.inf, math.inf) for _ in qs]
    pooled = np.concatenate(arrays)
    estimates = [float(np.quantile(pooled, x)) for x in qs]
    if len(arrays) < 2:
        return [(e, -math.inf, math.inf) for e in estimates]
    owner = np.concatenate([np.full(g.size, i) for i, g in enumerate(arrays)])
    order = np.argsort(pooled, kind="stable")
    values, owner = pooled[order], owner[order]
    rng = np.random.default_rng(seed)
    draws = np.empty((n_resamples, len(qs)))
    targets = np.asarray(qs)
    for k in range(n_resamples):
        counts = np.bincount(rng.integers(0, len(arrays), len(arrays)), minlength=len(arrays))
        weights = np.cumsum(counts[owner])
        at = np.searchsorted(weights, targets * weights[-1], side="left")
        draws[k] = values[at.clip(0, values.size - 1)]
    alpha = 1 - confidence
    bounds = np.quantile(draws, [alpha / 2, 1 - alpha / 2], axis=0)
    return [(e, float(lo), float(hi)) for e, lo, hi in zip(estimates, *bounds, strict=True)]


def mean_ci(
    values: ArrayLike, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` by scipy's BCa bootstrap; one value or no spread gives the
    mean as both bounds (nothing to resample)."""
    from scipy.stats import bootstrap

    check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, -math.inf, math.inf
    mean = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return mean, mean, mean
    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="BCa",
        random_state=np.random.default_rng(seed),
    )
    low, high = res.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa can fail on tiny samples
        low, high = np.quantile(
            res.bootstrap_distribution, [(1 - confidence) / 2, (1 + confidence) / 2]
        )
    return mean, float(low), float(high)
