"""kit.stats.intervals and the BCa bootstrap against published worked examples and references.

Expected values are the test file of the R package contingencytables (Fagerland, Lydersen &
Laake, *Statistical Analysis of Contingency Tables*, 2017; ``tests/testthat/test-ch8.R``,
``test-ch2.R``, ``test-ch4.R``). In the book's paired 2x2 table ``n[1,2]`` counts items with
value 1 in the first measurement only and the difference is ``(n12 - n21) / N``; here the
candidate is the first measurement, so ``c = n12`` (candidate only) and ``b = n21`` (baseline
only): Cavo et al. (2012) ``[[59, 6], [16, 80]]`` is ``both=59, c=6, b=16, n=161``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import brentq

from kit.errors import CompkitError
from kit.stats.bootstrap import bca_quantiles, paired_bootstrap
from kit.stats.intervals import (
    paired_difference_ci,
    paired_ratio_ci,
    proportion_ci,
    quantile_ci,
    tang_statistic,
    tango_statistic,
    z_value,
)

CAVO = {"both": 59, "c": 6, "b": 16, "n": 161}


def r4(x) -> float:
    return round(float(x), 4)


# --------------------------------------------------------------------------- published values


def test_tango_cavo_2012_matches_contingencytables():
    low, high = paired_difference_ci(CAVO["b"], CAVO["c"], CAVO["n"], cc=0)
    assert r4((CAVO["c"] - CAVO["b"]) / CAVO["n"]) == -0.0621
    assert (r4(low), r4(high)) == (-0.1240, -0.0054)


def test_tango_all_discordant_one_way_matches_contingencytables():
    # R: matrix(c(0, 0, 3, 0), 2) has n[1,2] = 3 -> estimate 1, CI -0.1230 to 1
    assert tuple(map(r4, paired_difference_ci(0, 3, 3, cc=0))) == (-0.1230, 1.0)
    # R: matrix(c(0, 3, 0, 0), 2) has n[2,1] = 3 -> estimate -1, CI -1 to 0.1230
    assert tuple(map(r4, paired_difference_ci(3, 0, 3, cc=0))) == (-1.0, 0.1230)


def test_tang_ratio_cavo_2012_matches_contingencytables():
    both, b, c, n = CAVO["both"], CAVO["b"], CAVO["c"], CAVO["n"]
    assert r4((both + c) / (both + b)) == 0.8667
    low, high = paired_ratio_ci(both, b, c, n, cc=0)
    assert (r4(1 + low), r4(1 + high)) == (0.7476, 0.9876)


@pytest.mark.parametrize(
    ("x", "n", "expected"),
    [
        (13, 16, (0.5435, 0.9595)),  # Ligarden et al. (2010), test-ch2.R
        (10, 10, (0.6915, 1.0)),  # test-ch4.R
        (0, 10, (0.0, 0.3085)),
        (0, 1, (0.0, 0.9750)),  # test-ch2.R
        (1, 1, (0.0250, 1.0)),
    ],
)
def test_clopper_pearson_matches_contingencytables(x, n, expected):
    assert tuple(map(r4, proportion_ci(x, n))) == expected


# --------------------------------------------------------------------------- independent reference
# Transcriptions of contingencytables' R code (Tango_asymptotic_score_CI_paired_2x2.R and
# Tang_asymptotic_score_CI_paired_2x2.R), scalar, solved with brentq like R's uniroot.


def _tango_r(n12: int, n21: int, n: int, z: float) -> tuple[float, float]:
    def stat(d0: float) -> float:
        a, b = 2 * n, -n12 - n21 + (2 * n - n12 + n21) * d0
        c = -n21 * d0 * (1 - d0)
        p21 = (math.sqrt(b * b - 4 * a * c) - b) / (2 * a)
        return (n12 - n21 - n * d0) / math.sqrt(n * (2 * p21 + d0 * (1 - d0)))

    est, tol = (n12 - n21) / n, 1e-7
    low = -1.0 if est == -1 else brentq(lambda d: stat(d) - z, -1 + tol, 1 - tol, xtol=1e-12)
    high = 1.0 if est == 1 else brentq(lambda d: stat(d) + z, -1 + tol, 1 - tol, xtol=1e-12)
    return low, high


def _tang_r(n11: int, n12: int, n21: int, n: int, z: float) -> tuple[float, float]:
    def stat(phi: float) -> float:
        a = n * (1 + phi)
        b = (n11 + n21) * phi**2 - (n11 + n12 + 2 * n21)
        c = n21 * (1 - phi) * (n11 + n12 + n21) / n
        p21 = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        var = n * (1 + phi) * p21 + (n11 + n12 + n21) * (phi - 1)
        return ((n11 + n12) - (n11 + n21) * phi) / math.sqrt(var)

    est = (n11 + n12) / (n11 + n21)
    low = 0.0 if est == 0 else brentq(lambda p: stat(p) - z, 1e-8, 1e6, xtol=1e-12)
    high = brentq(lambda p: stat(p) + z, 1e-8, 1e6, xtol=1e-12)
    return low, high


def test_tango_equals_the_published_algorithm_on_a_grid_vectorised():
    z = z_value(0.95)
    cases = [
        (b, c, n) for n in (5, 12, 40) for b in range(0, n + 1, 3) for c in range(0, n - b + 1, 2)
    ]
    cases = [(b, c, n) for b, c, n in cases if b + c > 0]
    b, c, n = (np.array(v, dtype=float) for v in zip(*cases, strict=True))
    low, high = paired_difference_ci(b, c, n, cc=0)
    expected = np.array([_tango_r(int(ci), int(bi), int(ni), z) for bi, ci, ni in cases])
    np.testing.assert_allclose(low, expected[:, 0], atol=1e-6)
    np.testing.assert_allclose(high, expected[:, 1], atol=1e-6)


def test_tang_equals_the_published_algorithm_on_a_grid_vectorised():
    z = z_value(0.95)
    cases = [
        (both, b, c, n)
        for n in (6, 20, 50)
        for both in range(1, n + 1, 5)
        for b in range(0, n - both + 1, 3)
        for c in range(0, n - both - b + 1, 4)
    ]
    both, b, c, n = (np.array(v, dtype=float) for v in zip(*cases, strict=True))
    low, high = paired_ratio_ci(both, b, c, n, cc=0)
    expected = np.array([_tang_r(int(x), int(ci), int(bi), int(m), z) for x, bi, ci, m in cases])
    np.testing.assert_allclose(1 + low, expected[:, 0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(1 + high, expected[:, 1], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- properties


def _paired_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    b, c = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = b + c <= n
    return b[keep].astype(float), c[keep].astype(float)


@pytest.mark.parametrize("n", [1, 7, 30])
def test_continuity_correction_only_widens_and_bounds_are_score_roots(n):
    b, c = _paired_grid(n)
    lo0, hi0 = paired_difference_ci(b, c, n, cc=0)
    lo, hi = paired_difference_ci(b, c, n)
    assert np.all(lo <= lo0 + 1e-9) and np.all(hi >= hi0 - 1e-9)
    est = (c - b) / n
    assert np.all(lo <= est) and np.all(est <= hi) and np.all(lo >= -1) and np.all(hi <= 1)
    z = z_value(0.95)
    inner = (lo > -1 + 1e-6) & (lo < est - 1e-6)
    np.testing.assert_allclose(tango_statistic(lo[inner], b[inner], c[inner], n), z, atol=1e-6)
    inner = (hi < 1 - 1e-6) & (hi > est + 1e-6)
    np.testing.assert_allclose(tango_statistic(hi[inner], b[inner], c[inner], n), -z, atol=1e-6)


def test_tango_statistic_decreases_in_the_hypothesised_difference():
    b, c = _paired_grid(20)
    grid = np.linspace(-0.999, 0.999, 401)
    values = np.stack([tango_statistic(d, b, c, 20.0) for d in grid])
    assert np.all(np.diff(values, axis=0) <= 1e-9)


def test_tang_statistic_decreases_in_the_hypothesised_ratio():
    both, b, c = np.meshgrid(np.arange(1, 13), np.arange(13), np.arange(13), indexing="ij")
    keep = both + b + c <= 12
    both, b, c = (v[keep].astype(float) for v in (both, b, c))
    values = np.stack([tang_statistic(r, both, b, c, 12.0) for r in np.geomspace(0.02, 50, 300)])
    assert np.all(np.diff(values, axis=0) <= 1e-9)


@pytest.mark.parametrize("cc", [0.0, 0.5, 1.0, 2.0])
def test_lower_bounds_never_sit_on_the_estimate(cc):
    """Regression: with cc >= 1 the corrected score can stay below z for every value below the
    estimate; the root search then returned the estimate itself as the lower bound (b = 9,
    c = 0, n = 10: [-0.9, -0.24]; Tang with 1 success each of 10: [0, 10.3]), an interval
    that passes "cannot drop" rules on no evidence. Nothing rejected down to -1 means -1."""
    b, c = _paired_grid(12)
    low, high = paired_difference_ci(b, c, 12, cc=cc)
    est = (c - b) / 12
    assert np.all((low < est) | (est == -1)) and np.all((high > est) | (est == 1))
    assert paired_difference_ci(9, 0, 10, cc=cc)[0] < -0.9
    both, bb, cc_ = np.meshgrid(np.arange(4), np.arange(6), np.arange(6), indexing="ij")
    keep = (both + cc_ > 0) & (both + bb > 0)
    both, bb, cc_ = (v[keep].astype(float) for v in (both, bb, cc_))
    rlow, rhigh = paired_ratio_ci(both, bb, cc_, 14, cc=cc)
    rel = (cc_ - bb) / (both + bb)
    assert np.all(rlow < rel) and np.all(rhigh > rel)
    assert paired_ratio_ci(0, 1, 1, 10, cc=cc)[0] < -0.85


def test_difference_is_antisymmetric_in_the_direction_of_change():
    b, c = _paired_grid(15)
    lo, hi = paired_difference_ci(b, c, 15)
    lo_r, hi_r = paired_difference_ci(c, b, 15)
    np.testing.assert_allclose(lo, -hi_r, atol=1e-9)
    np.testing.assert_allclose(hi, -lo_r, atol=1e-9)


def test_higher_confidence_gives_a_wider_interval():
    for fn, args in (
        (proportion_ci, (3, 20)),
        (paired_difference_ci, (4, 1, 25)),
        (paired_ratio_ci, (10, 4, 1, 25)),
    ):
        lo95, hi95 = fn(*args)
        lo99, hi99 = fn(*args, confidence=0.99)
        assert lo99 < lo95 and hi99 > hi95, fn.__name__


# --------------------------------------------------------------------------- edge cases


def test_no_items_means_nothing_is_known():
    assert proportion_ci(0, 0) == (0.0, 1.0)
    assert paired_difference_ci(0, 0, 0) == (-1.0, 1.0)
    low, high = paired_ratio_ci(0, 0, 0, 0)
    assert low == -math.inf and high == math.inf
    est, lo, hi = quantile_ci([], 0.5)
    assert math.isnan(est) and lo == -math.inf and hi == math.inf


def test_zero_and_all_events():
    low, high = proportion_ci(0, 50)
    assert low == 0 and 0 < high < 0.08
    low, high = proportion_ci(50, 50)
    assert high == 1 and 0.92 < low < 1
    # every pair discordant the same way
    assert paired_difference_ci(0, 20, 20)[1] == 1.0
    assert paired_difference_ci(20, 0, 20)[0] == -1.0
    # the candidate never has the value: relative change is -1 at worst and the bound is exact
    low, high = paired_ratio_ci(0, 9, 0, 20)
    assert low == -1.0 and -1 < high < 0


def test_identical_models_give_an_interval_around_zero_not_a_point():
    """No item changed: never [0, 0] (what the percentile bootstrap gave), shrinking with n."""
    widths = []
    for n in (2, 8, 30, 300):
        low, high = paired_difference_ci(0, 0, n)
        assert low == pytest.approx(-high) and low < 0 < high
        widths.append(high - low)
        rlow, rhigh = paired_ratio_ci(int(0.7 * n), 0, 0, n)
        assert rlow < 0 < rhigh
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.04  # +-1.9 pts at n = 300
    # the case: 8 items, none changed, is not enough for a 5-point limit
    assert paired_difference_ci(0, 0, 8)[0] < -0.05


def test_relative_change_with_no_baseline_events_is_unbounded():
    assert paired_ratio_ci(0, 0, 3, 10) == (-math.inf, math.inf)


def test_vectorised_input_equals_scalar_calls():
    b = np.array([[0, 1, 5], [2, 0, 7]])
    c = np.array([[0, 3, 0], [2, 9, 1]])
    n = np.array([10, 12, 40])
    low, high = paired_difference_ci(b, c, n)
    assert low.shape == high.shape == (2, 3)
    for i in np.ndindex(b.shape):
        assert (low[i], high[i]) == pytest.approx(paired_difference_ci(b[i], c[i], n[i[1]]))
    both = np.array([[5, 0, 20], [3, 1, 30]])
    rl, rh = paired_ratio_ci(both, b, c, n)
    for i in np.ndindex(b.shape):
        assert (rl[i], rh[i]) == pytest.approx(paired_ratio_ci(both[i], b[i], c[i], n[i[1]]))
    pl, ph = proportion_ci(c, n)
    assert isinstance(proportion_ci(1, 3)[0], float) and pl.shape == (2, 3)
    assert (pl[1, 2], ph[1, 2]) == pytest.approx(proportion_ci(1, 40))


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda: proportion_ci(5, 4), "count <= n"),
        (lambda: proportion_ci(-1, 4), "count <= n"),
        (lambda: paired_difference_ci(3, 3, 5), "b + c <= n"),
        (lambda: paired_ratio_ci(2, 2, 2, 5), "both + b + c <= n"),
        (lambda: proportion_ci(1, 5, confidence=1.0), "confidence"),
        (lambda: quantile_ci([1, 2, 3], 1.0), "quantile"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(call, what):
    with pytest.raises(CompkitError, match=what.replace("+", r"\+")):
        call()


# --------------------------------------------------------------------------- quantiles


def test_quantile_ci_hand_computed_median_of_ten():
    # #below the median ~ Binomial(10, 1/2): P(<= 1) = 11/1024 <= 2.5% < P(<= 2) = 56/1024,
    # so the ranks are 2 and 9, and the interval covers with 1 - 2 * 11/1024 = 97.85%.
    values = [7.0, 1.0, 9.0, 3.0, 10.0, 2.0, 8.0, 4.0, 6.0, 5.0]
    est, low, high = quantile_ci(values, 0.5)
    assert (est, low, high) == (5.5, 2.0, 9.0)
    assert quantile_ci(range(1, 101), 0.5) == (50.5, 40.0, 61.0)  # ranks 40 and 61


def test_quantile_ci_ignores_missing_values_and_says_when_it_cannot_bound():
    assert quantile_ci([7.0, np.nan, 1, 9, 3, 10, 2, 8, 4, 6, 5, np.inf], 0.5)[1:] == (2.0, 9.0)
    _, low, high = quantile_ci(np.arange(20.0), 0.99)
    assert high == math.inf and math.isfinite(low)
    assert quantile_ci(np.arange(3.0), 0.5)[1:] == (-math.inf, math.inf)


def _order_ranks(n: int, q: float) -> tuple[int, int]:
    """1-based ranks (l, u) of quantile_ci, found from its output on 1..n."""
    _, low, high = quantile_ci(np.arange(1.0, n + 1), q)
    return int(low) if math.isfinite(low) else 0, int(high) if math.isfinite(high) else n + 1


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95])
def test_quantile_ci_exact_coverage_is_at_least_nominal(q):
    for n in (10, 25, 60, 200, 1000):
        lo, hi = _order_ranks(n, q)
        # P(x_(l) <= Q < x_(u)) = P(l <= #below < u) for a continuous law
        coverage = stats.binom.cdf(hi - 1, n, q) - stats.binom.cdf(lo - 1, n, q)
        assert coverage >= 0.95 - 1e-12, (n, q, coverage)
        # each side alone errs at most 2.5%
        assert stats.binom.cdf(lo - 1, n, q) <= 0.025 and stats.binom.sf(hi - 1, n, q) <= 0.025


def test_quantile_ci_simulated_coverage_matches_the_exact_one():
    rng = np.random.default_rng(7)
    n, q, reps = 40, 0.9, 4000
    truth = stats.expon.ppf(q)
    samples = rng.exponential(size=(reps, n))
    hits = 0
    for row in samples:
        _, low, high = quantile_ci(row, q)
        hits += low <= truth <= high
    lo, hi = _order_ranks(n, q)
    exact = stats.binom.cdf(hi - 1, n, q) - stats.binom.cdf(lo - 1, n, q)
    assert abs(hits / reps - exact) < 4 * math.sqrt(exact * (1 - exact) / reps)


# --------------------------------------------------------------------------- BCa bootstrap


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    base = rng.beta(5, 2, size=60)  # chrF-like values in [0, 1], skewed
    cand = np.clip(base - rng.beta(1, 12, size=60) + rng.normal(0, 0.02, size=60), 0, 1)
    return base, cand


def _scipy(data, statistic, method, paired=False):
    res = stats.bootstrap(
        data, statistic, method=method, paired=paired, n_resamples=20000, rng=3, vectorized=True
    )
    return res.confidence_interval.low, res.confidence_interval.high


@pytest.mark.parametrize("interval", ["bca", "percentile"])
def test_paired_bootstrap_agrees_with_scipy_on_means_and_changes(scores, interval):
    base, cand = scores
    out = paired_bootstrap(
        base, {"cand": cand}, n_resamples=20000, seed=5, method="indices", interval=interval
    ).iloc[0]
    method = "BCa" if interval == "bca" else "percentile"
    value = _scipy((cand,), lambda x, axis: x.mean(axis=axis), method)
    delta = _scipy((cand - base,), lambda x, axis: x.mean(axis=axis), method)
    rel = _scipy(
        (cand, base),
        lambda c, b, axis: c.mean(axis=axis) / b.mean(axis=axis) - 1,
        method,
        paired=True,
    )
    # standard error of the mean is ~0.02; two Monte-Carlo bootstraps agree to ~0.001
    np.testing.assert_allclose([out["value_ci_low"], out["value_ci_high"]], value, atol=2e-3)
    np.testing.assert_allclose([out["ci_low"], out["ci_high"]], delta, atol=2e-3)
    np.testing.assert_allclose([out["rel_ci_low"], out["rel_ci_high"]], rel, atol=3e-3)


def test_bca_quantiles_reproduces_scipy_from_the_same_resamples(scores):
    """Same resampled means in, same BCa bounds out (no Monte-Carlo difference left)."""
    x = scores[1]
    rng = np.random.default_rng(2)
    reps = x[rng.integers(0, x.size, size=(5000, x.size))].mean(axis=1)
    u = x - x.mean()
    accel = np.array((u**3).sum() / (6 * (u**2).sum() ** 1.5))
    low, high = bca_quantiles(reps[:, None], np.array([x.mean()]), accel[None], 0.95)
    # scipy's formulas (scipy.stats._resampling._bca_interval) on the same resamples
    below = ((reps < x.mean()).sum() + (reps <= x.mean()).sum()) / (2 * reps.size)
    z0 = stats.norm.ppf(below)
    levels = []
    for z in stats.norm.ppf([0.025, 0.975]):
        levels.append(stats.norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    expected = np.percentile(reps, np.array(levels) * 100)
    np.testing.assert_allclose([low[0], high[0]], expected, rtol=1e-12)


def test_bca_quantiles_refuses_what_it_cannot_see():
    reps = np.full((100, 1), 0.5)
    low, high = bca_quantiles(reps, np.array([0.5]), np.array([0.0]), 0.95)
    assert np.isnan(low[0]) and np.isnan(high[0])
