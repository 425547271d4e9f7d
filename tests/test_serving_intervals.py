"""The serving intervals hold their nominal coverage by simulation, at small n and zero events."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2

from kit.stats.serving_intervals import (
    cluster_quantile_ci,
    independent_proportion_difference_ci,
    mean_ci,
    poisson_rate_ci,
    poisson_rate_ratio_ci,
    two_sample_quantile_ci,
    union_difference,
    union_product_bounds,
    union_ratio,
)

RNG = np.random.default_rng(20240611)


def test_garwood_matches_the_chi_square_formula_and_zero_events():
    lo, hi = poisson_rate_ci(7, 2.0)
    assert lo == pytest.approx(chi2.ppf(0.025, 14) / 2 / 2.0)
    assert hi == pytest.approx(chi2.ppf(0.975, 16) / 2 / 2.0)
    lo, hi = poisson_rate_ci(0, 10.0)
    assert lo == 0.0 and hi == pytest.approx(-math.log(0.025) / 10.0, rel=1e-6)  # 3.689 / 10
    assert poisson_rate_ci(3, 0.0) == (0.0, math.inf)


@pytest.mark.parametrize("rate", [0.3, 2.0, 12.0])
def test_garwood_covers_at_least_nominally(rate):
    exposure = 5.0
    counts = RNG.poisson(rate * exposure, size=3000)
    bounds = np.array([poisson_rate_ci(int(k), exposure) for k in counts])
    covered = (bounds[:, 0] <= rate) & (rate <= bounds[:, 1])
    assert covered.mean() >= 0.945


@pytest.mark.parametrize(("ra", "rb"), [(1.0, 1.0), (3.0, 1.0), (0.4, 2.0)])
def test_rate_ratio_covers_at_least_nominally(ra, rb):
    ta, tb = 6.0, 4.0
    xa, xb = RNG.poisson(ra * ta, 2000), RNG.poisson(rb * tb, 2000)
    truth = ra / rb
    hits = []
    for a, b in zip(xa, xb, strict=True):
        _, lo, hi = poisson_rate_ratio_ci(int(a), ta, int(b), tb)
        hits.append(lo <= truth <= hi)
    assert np.mean(hits) >= 0.945


def test_rate_ratio_edges():
    est, lo, hi = poisson_rate_ratio_ci(5, 1.0, 0, 1.0)
    assert est == math.inf and hi == math.inf and lo > 0
    est, lo, hi = poisson_rate_ratio_ci(0, 1.0, 0, 1.0)
    assert math.isnan(est) and (lo, hi) == (0.0, math.inf)


def test_quantile_difference_covers_at_small_n():
    q, n = 0.5, 25
    truth = np.log(2) * (2.0 - 1.0)  # medians of exponentials with means 2 and 1
    hits = []
    for _ in range(800):
        a, b = RNG.exponential(2.0, n), RNG.exponential(1.0, n)
        res = two_sample_quantile_ci(a, b, q)
        hits.append(res["ci_low"] <= truth <= res["ci_high"])
        assert res["rel_ci_low"] <= res["rel"] <= res["rel_ci_high"]
    assert np.mean(hits) >= 0.95


def test_quantile_difference_is_open_where_the_sample_cannot_bound_it():
    res = two_sample_quantile_ci(np.arange(10.0), np.arange(10.0), 0.99)
    assert math.isinf(res["ci_high"]) or math.isinf(res["ci_low"])


def test_cluster_bootstrap_covers_where_pooled_order_statistics_fail():
    """Gaps within a request share a request-level speed: the pooled sample is not i.i.d.
    A pooled order-statistic interval is far too narrow; resampling requests is not."""
    from kit.stats.intervals import quantile_ci

    truth_draws = np.concatenate([RNG.lognormal(RNG.normal(0, 0.5), 0.1, 30) for _ in range(20000)])
    truth = np.quantile(truth_draws, 0.5)
    boot, naive = [], []
    for k in range(120):
        groups = [RNG.lognormal(RNG.normal(0, 0.5), 0.1, 30) for _ in range(25)]
        _, lo, hi = cluster_quantile_ci(groups, 0.5, n_resamples=300, seed=k)
        boot.append(lo <= truth <= hi)
        _, nlo, nhi = quantile_ci(np.concatenate(groups), 0.5)
        naive.append(nlo <= truth <= nhi)
    assert np.mean(boot) >= 0.85 and np.mean(naive) < 0.6


def test_cluster_bootstrap_shapes_and_degenerate_input():
    est, lo, hi = cluster_quantile_ci([[1.0, 2.0, 3.0]], 0.5)
    assert est == 2.0 and (lo, hi) == (-math.inf, math.inf)  # one request: no interval
    many = cluster_quantile_ci([[1.0, 2.0], [3.0], [4.0, 5.0]], [0.5, 0.9], n_resamples=50)
    assert len(many) == 2 and all(lo <= est <= hi for est, lo, hi in many)
    assert math.isnan(cluster_quantile_ci([], 0.5)[0])


def test_union_bounds_and_independent_proportions():
    assert union_difference((1.0, 2.0), (0.5, 0.7)) == pytest.approx((0.3, 1.5))
    assert union_ratio((1.0, 2.0), (0.5, 1.0)) == (1.0, 4.0)
    assert union_ratio((1.0, 2.0), (0.0, 1.0))[1] == math.inf
    assert union_product_bounds((2.0, 3.0), (10.0, 20.0)) == (20.0, 60.0)
    lo, hi = independent_proportion_difference_ci(0, 30, 0, 30)
    assert lo < 0 < hi and hi > 0.1  # zero events in both: no collapse to [0, 0]
    hits = []
    for _ in range(1500):
        a, b = RNG.binomial(40, 0.1), RNG.binomial(40, 0.3)
        lo, hi = independent_proportion_difference_ci(int(a), 40, int(b), 40)
        hits.append(lo <= -0.2 <= hi)
    assert np.mean(hits) >= 0.95


def test_mean_ci_is_bca_and_says_nothing_without_spread():
    x = RNG.exponential(1.0, 40)
    mean, lo, hi = mean_ci(x)
    assert lo < mean < hi and mean == pytest.approx(x.mean())
    assert mean_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    assert math.isnan(mean_ci([])[0])


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_requests_to_bound_is_where_the_order_statistic_interval_closes(q):
    from kit.stats.intervals import quantile_ci
    from kit.stats.serving_intervals import requests_to_bound

    n = requests_to_bound(q)
    assert math.isinf(quantile_ci(np.arange(n - 1.0), q)[2])
    assert math.isfinite(quantile_ci(np.arange(float(n)), q)[2])
