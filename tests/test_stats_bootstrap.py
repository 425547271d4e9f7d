"""The vectorised paired bootstrap: draws, methods, BCa intervals, coverage and memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from kit.stats.bootstrap import paired_bootstrap


def naive_bootstrap(base, cands, groups, *, n_resamples, seed, confidence=0.95):
    """Per-resample loop with the same draws as method='indices': positions into the items
    ordered stably by the (first) slice column."""
    rng = np.random.default_rng(seed)
    n = base.size
    order = np.argsort(groups, kind="stable")
    labels = sorted(set(groups))
    reps = np.full((n_resamples, 1 + len(labels), len(cands)), np.nan)
    for r in range(n_resamples):
        idx = order[rng.integers(0, n, size=n, dtype=np.int32)]
        for k, cand in enumerate(cands):
            b, c, g = base[idx], cand[idx], groups[idx]
            ok = ~np.isnan(b) & ~np.isnan(c)
            reps[r, 0, k] = np.mean(c[ok] - b[ok])
            for j, label in enumerate(labels):
                sel = ok & (g == label)
                if sel.any():
                    reps[r, 1 + j, k] = np.mean(c[sel] - b[sel])
    tail = (1 - confidence) / 2
    return np.nanquantile(reps, [tail, 1 - tail], axis=0)  # (2, 1 + G, k)


def test_bootstrap_matches_naive_loop_with_same_indices():
    rng = np.random.default_rng(3)
    n = 60
    base = rng.random(n)
    base[rng.random(n) < 0.1] = np.nan
    cands = [base - 0.1 + 0.2 * rng.random(n), rng.random(n)]
    cands[1][:5] = np.nan
    groups = rng.choice(["x", "y", "z"], n)
    out = paired_bootstrap(
        base,
        {"c0": cands[0], "c1": cands[1]},
        groups={"g": groups},
        n_resamples=300,
        seed=11,
        method="indices",
        interval="percentile",
        max_cells=7 * n,
    )
    expected = naive_bootstrap(base, cands, groups, n_resamples=300, seed=11)
    for k, name in enumerate(["c0", "c1"]):
        rows = out[out["candidate"] == name]
        np.testing.assert_allclose(rows["ci_low"], expected[0, :, k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rows["ci_high"], expected[1, :, k], rtol=1e-10, atol=1e-12)
    bigger_blocks = paired_bootstrap(
        base,
        {"c0": cands[0], "c1": cands[1]},
        groups={"g": groups},
        n_resamples=300,
        seed=11,
        method="indices",
        interval="percentile",
    )
    pd.testing.assert_frame_equal(out, bigger_blocks)


def test_bootstrap_point_estimates_exclude_nan_pairs():
    base = np.array([1.0, 0.0, np.nan, 1.0, 0.5])
    cand = np.array([0.0, 0.0, 1.0, np.nan, 1.0])
    row = paired_bootstrap(base, {"c": cand}, n_resamples=50).iloc[0]
    assert row["n"] == 3  # items 0, 1, 4
    assert row["value"] == pytest.approx(1 / 3) and row["baseline_value"] == pytest.approx(0.5)
    assert row["delta"] == pytest.approx(1 / 3 - 0.5)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]


def test_counts_method_agrees_with_indices_in_distribution():
    rng = np.random.default_rng(5)
    n = 4000
    base = (rng.random(n) < 0.75).astype(float)
    cand = np.where(rng.random(n) < 0.12, 1 - base, base)
    groups = {"g": rng.integers(0, 4, n)}
    kwargs = {"groups": groups, "n_resamples": 1000, "seed": 1}
    counts = paired_bootstrap(base, {"c": cand}, method="counts", **kwargs)
    indices = paired_bootstrap(base, {"c": cand}, method="indices", **kwargs)
    poisson = paired_bootstrap(base, {"c": cand}, method="poisson", **kwargs)
    auto = paired_bootstrap(base, {"c": cand}, method="auto", **kwargs)
    pd.testing.assert_frame_equal(auto, counts)  # binary data compresses
    width = (indices["ci_high"] - indices["ci_low"]).to_numpy()
    for other in (counts, poisson):
        for col in ("ci_low", "ci_high"):
            assert np.all(np.abs(other[col] - indices[col]).to_numpy() < 0.12 * width)


def coverage(draw, *, studies=400, n_resamples=400, method="auto"):
    hits = 0
    for s in range(studies):
        base, cand, truth = draw(np.random.default_rng(1000 + s))
        row = paired_bootstrap(
            base, {"c": cand}, n_resamples=n_resamples, seed=s, method=method
        ).iloc[0]
        hits += row["ci_low"] <= truth <= row["ci_high"]
    return hits / studies


def binary_study(rng):
    # per item: both right .70, right->wrong .08, wrong->right .03, both wrong .19 -> delta -0.05
    n = 300
    u = rng.random(n)
    base = (u < 0.78).astype(float)
    cand = ((u < 0.70) | ((u >= 0.78) & (u < 0.81))).astype(float)
    return base, cand, -0.05


def continuous_study(rng):
    n = 120
    base = rng.beta(2, 2, n)
    cand = np.clip(base + rng.normal(-0.03, 0.1, n), 0, 1)
    truth = -0.03  # clipping at 0/1 shifts it slightly; measured below
    return base, cand, truth + continuous_clip_bias()


def continuous_clip_bias(cache={}):  # noqa: B006 - memo of a one-off Monte Carlo
    if "bias" not in cache:
        rng = np.random.default_rng(0)
        base = rng.beta(2, 2, 4_000_000)
        cand = np.clip(base + rng.normal(-0.03, 0.1, base.size), 0, 1)
        cache["bias"] = float(np.mean(cand - base)) + 0.03
    return cache["bias"]


def test_bootstrap_coverage_binary():
    rate = coverage(binary_study)
    assert 0.93 <= rate <= 0.97, rate


def test_bootstrap_coverage_continuous():
    rate = coverage(continuous_study, method="indices")
    assert 0.93 <= rate <= 0.97, rate


def peak_bytes(**kwargs) -> int:
    tracemalloc.start()
    paired_bootstrap(**kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_bootstrap_memory_is_bounded_by_blocks():
    rng = np.random.default_rng(2)
    n = 100_000
    data = {
        "baseline": rng.random(n),
        "candidates": {"c": rng.random(n)},
        "groups": {"g": rng.integers(0, 5, n)},
    }
    few = peak_bytes(**data, n_resamples=10, method="indices", max_cells=2**18)
    many = peak_bytes(**data, n_resamples=200, method="indices", max_cells=2**18)
    # 200 x 100k float weights would be 160 MB; blocks of 2**18 cells keep the peak flat
    assert many < 1.1 * few + 1e6, (few, many)
    assert many < 200 * n * 8 / 8


def test_poisson_weights_have_poisson_moments():
    from scipy.stats import poisson

    from kit.stats.bootstrap import _poisson_weights

    weights = _poisson_weights(np.arange(2**16, dtype=np.uint16))  # every 16-bit draw once
    assert weights.mean() == pytest.approx(1.0, abs=1e-4)
    assert weights.var() == pytest.approx(1.0, abs=1e-3)
    shares = np.bincount(weights.astype(int)) / weights.size
    np.testing.assert_allclose(shares, poisson.pmf(np.arange(shares.size), 1.0), atol=2**-16)
