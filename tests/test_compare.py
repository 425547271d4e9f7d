"""Paired comparison: flips, McNemar, paired bootstrap, noise floor, divergence, power."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, entropy, wilcoxon

from kit.analysis.compare import (
    FLIP_KINDS,
    RESULT_COLUMNS,
    agreement_rate,
    choice_divergence,
    compare_models,
    divergence_summary,
    flip_table,
    item_flips,
    mcnemar_test,
    mde_warnings,
    minimum_detectable_effect,
    noise_floor,
    paired_bootstrap,
)
from kit.errors import CompkitError
from kit.scoring import summarize


def table(
    rows: list[tuple], columns=("model", "item_id", "repeat", "pred", "correct")
) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    if "task" not in frame:
        frame["task"] = "classification"
    return frame


# baseline vs candidate "q4", one repeat, hand-labelled flips
FLIP_ROWS = [
    ("base", "i1", 0, "A", 1.0), ("q4", "i1", 0, "A", 1.0),  # unchanged_right
    ("base", "i2", 0, "A", 1.0), ("q4", "i2", 0, "B", 0.0),  # right_to_wrong
    ("base", "i3", 0, "B", 0.0), ("q4", "i3", 0, "A", 1.0),  # wrong_to_right
    ("base", "i4", 0, "B", 0.0), ("q4", "i4", 0, "C", 0.0),  # wrong_to_other_wrong
    ("base", "i5", 0, "B", 0.0), ("q4", "i5", 0, "B", 0.0),  # unchanged_wrong
    ("base", "i6", 0, "A", 1.0), ("q4", "i6", 0, "C", 0.0),  # right_to_wrong
    ("base", "i7", 0, "A", 1.0), ("q4", "i7", 0, None, np.nan),  # no candidate outcome: left out
]  # fmt: skip


# --------------------------------------------------------------------------- flips


def test_item_flips_classifies_each_kind():
    flips = item_flips(table(FLIP_ROWS), baseline="base").set_index("item_id")
    assert flips["flip"].to_dict() == {
        "i1": "unchanged_right",
        "i2": "right_to_wrong",
        "i3": "wrong_to_right",
        "i4": "wrong_to_other_wrong",
        "i5": "unchanged_wrong",
        "i6": "right_to_wrong",
    }
    assert flips.loc["i4", ["baseline_pred", "candidate_pred"]].tolist() == ["B", "C"]
    assert (flips["model"] == "q4").all() and (flips["metric"] == "accuracy").all()


def test_flip_table_counts_and_rates():
    flips = flip_table(table(FLIP_ROWS), baseline="base").set_index("flip")
    assert list(flips.index) == list(FLIP_KINDS)
    assert flips["count"].to_dict() == {
        "right_to_wrong": 2,
        "wrong_to_right": 1,
        "wrong_to_other_wrong": 1,
        "unchanged_right": 1,
        "unchanged_wrong": 1,
    }
    assert (flips["n"] == 6).all()
    assert flips.loc["right_to_wrong", "rate"] == pytest.approx(2 / 6)
    assert set(flips["slice"]) == {"overall"} and set(flips["slice_value"]) == {"all"}


def test_flip_table_by_slice_and_without_pred():
    rows = table(FLIP_ROWS)
    rows["task"] = np.where(rows["item_id"].isin(["i1", "i2", "i3"]), "a", "b")
    flips = flip_table(rows, baseline="base", by="task")
    per = flips[flips["slice"] == "task"].pivot(index="slice_value", columns="flip", values="count")
    assert per.loc["a", "right_to_wrong"] == 1 and per.loc["b", "right_to_wrong"] == 1
    assert per.loc["b", "wrong_to_other_wrong"] == 1
    no_pred = flip_table(rows.drop(columns="pred"), baseline="base").set_index("flip")["count"]
    assert no_pred["wrong_to_other_wrong"] == 0 and no_pred["unchanged_wrong"] == 2


def test_flips_with_repeats_majority_and_first():
    rows = table([
        ("base", "i1", 0, "A", 1.0), ("base", "i1", 1, "A", 1.0), ("base", "i1", 2, "A", 1.0),
        # candidate: 1 right, 2 wrong -> majority wrong; wrong preds B (r1), C (r2) tie -> B
        ("q4", "i1", 0, "A", 1.0), ("q4", "i1", 1, "B", 0.0), ("q4", "i1", 2, "C", 0.0),
        # tie (2 repeats): lowest repeat's outcome
        ("base", "i2", 0, "A", 0.0), ("base", "i2", 1, "B", 1.0),
        ("q4", "i2", 0, "A", 1.0), ("q4", "i2", 1, "C", 0.0),
    ])  # fmt: skip
    rows.loc[rows["item_id"] == "i2", "repeat"] = [0, 1, 0, 1]
    majority = item_flips(rows, baseline="base").set_index("item_id")
    assert majority.loc["i1", "flip"] == "right_to_wrong"
    assert majority.loc["i1", "candidate_pred"] == "B"
    assert (
        majority.loc["i2", "flip"] == "wrong_to_right"
    )  # base tie -> r0 wrong; q4 tie -> r0 right
    first = item_flips(rows, baseline="base", repeats="first").set_index("item_id")
    assert first.loc["i1", "flip"] == "unchanged_right"


def test_flips_follow_metric_direction():
    rows = table(
        [
            ("base", "e1", 0, None, 0.0, 0.0),
            ("q4", "e1", 0, None, 0.0, 1.0),
            ("base", "e2", 0, None, 0.0, 1.0),
            ("q4", "e2", 0, None, 0.0, 0.0),
        ],
        columns=("model", "item_id", "repeat", "pred", "correct", "json_parse_failure"),
    )
    flips = item_flips(rows, baseline="base", metric="json_parse_failure").set_index("item_id")
    assert flips.loc["e1", "flip"] == "right_to_wrong"  # 0 -> 1 failure is a loss
    assert flips.loc["e2", "flip"] == "wrong_to_right"
    with pytest.raises(CompkitError, match="not registered"):
        item_flips(rows.assign(mystery=0.0), baseline="base", metric="mystery")


def test_agreement_rate():
    agree = agreement_rate(table(FLIP_ROWS), baseline="base").iloc[0]
    # preds equal on i1, i5 of the 6 paired items
    assert agree["agreement"] == pytest.approx(2 / 6) and agree["n"] == 6


def test_bad_inputs_name_the_problem():
    with pytest.raises(CompkitError, match="baseline 'nope'"):
        flip_table(table(FLIP_ROWS), baseline="nope")
    with pytest.raises(CompkitError, match="candidate"):
        compare_models(table(FLIP_ROWS), baseline="base", candidates=["q9"])
    with pytest.raises(CompkitError, match="lacks column"):
        compare_models(table(FLIP_ROWS).drop(columns="repeat"), baseline="base")


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_known_value():
    result = mcnemar_test(10, 2)
    assert result.method == "exact" and result.statistic == 2
    assert result.p_value == pytest.approx(0.0386, abs=5e-5)
    assert result.p_value == pytest.approx(binomtest(2, 12, 0.5).pvalue, rel=1e-12)
    assert mcnemar_test(2, 10).p_value == pytest.approx(result.p_value)


def test_mcnemar_large_counts_use_corrected_chi2_close_to_exact():
    approx, exact = mcnemar_test(600, 520), mcnemar_test(600, 520, exact=True)
    assert approx.method == "chi2" and approx.statistic == pytest.approx((80 - 1) ** 2 / 1120)
    assert approx.p_value == pytest.approx(exact.p_value, rel=0.01)
    assert mcnemar_test(0, 0).p_value == 1.0
    with pytest.raises(CompkitError):
        mcnemar_test(-1, 3)


# --------------------------------------------------------------------------- bootstrap


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

    from kit.analysis.compare import _poisson_weights

    weights = _poisson_weights(np.arange(2**16, dtype=np.uint16))  # every 16-bit draw once
    assert weights.mean() == pytest.approx(1.0, abs=1e-4)
    assert weights.var() == pytest.approx(1.0, abs=1e-3)
    shares = np.bincount(weights.astype(int)) / weights.size
    np.testing.assert_allclose(shares, poisson.pmf(np.arange(shares.size), 1.0), atol=2**-16)


# --------------------------------------------------------------------------- compare_models


def model_table(seed=0, n=400, repeats=1):
    rng = np.random.default_rng(seed)
    rows = []
    for model, p_right in (("base", 0.8), ("q4", 0.7), ("q8", 0.8)):
        for i in range(n):
            task = "classification" if i % 2 else "extraction"
            for r in range(repeats):
                right = float(rng.random() < p_right)
                field = rng.random() if task == "extraction" else np.nan
                rows.append((model, f"i{i:04d}", r, task, str(int(right)), right, field))
    return pd.DataFrame(
        rows, columns=["model", "item_id", "repeat", "task", "pred", "correct", "field_accuracy"]
    )


def test_compare_models_shape_values_and_tests():
    outcomes = model_table()
    out = compare_models(outcomes, baseline="base", by="task", n_resamples=300)
    assert list(out.columns) == RESULT_COLUMNS
    overall = out[out["slice"] == "overall"]
    assert set(overall["slice_value"]) == {"all"}
    assert set(out["metric"]) == {"accuracy", "field_accuracy"}
    # field_accuracy is defined on extraction items only: no classification rows
    fa = out[out["metric"] == "field_accuracy"]
    assert set(fa["slice_value"]) == {"all", "extraction"}
    np.testing.assert_allclose(out["delta"], out["value"] - out["baseline_value"])
    assert (out["ci_low"] <= out["delta"]).all() and (out["delta"] <= out["ci_high"]).all()
    means = summarize(outcomes).set_index(["model", "task", "metric"])["value"]
    row = out[(out["model"] == "q4") & (out["slice_value"] == "classification")].iloc[0]
    assert row["value"] == pytest.approx(means[("q4", "classification", "accuracy")])
    assert row["baseline_value"] == pytest.approx(means[("base", "classification", "accuracy")])


def test_compare_models_p_values():
    outcomes = model_table()
    out = compare_models(outcomes, baseline="base", candidates="q4", n_resamples=100)
    wide = outcomes.pivot(index="item_id", columns="model")
    base, cand = wide[("correct", "base")], wide[("correct", "q4")]
    b, c = int(((base == 1) & (cand == 0)).sum()), int(((base == 0) & (cand == 1)).sum())
    acc = out[out["metric"] == "accuracy"].iloc[0]
    assert acc["p_value"] == pytest.approx(mcnemar_test(b, c).p_value)
    fb, fc = wide[("field_accuracy", "base")].dropna(), wide[("field_accuracy", "q4")].dropna()
    fa = out[out["metric"] == "field_accuracy"].iloc[0]
    assert fa["p_value"] == pytest.approx(wilcoxon(fc - fb).pvalue)


def test_compare_models_repeats_modes():
    outcomes = model_table(n=100, repeats=3)
    mean = compare_models(outcomes, baseline="base", metrics=["accuracy"], n_resamples=50)
    first = compare_models(
        outcomes, baseline="base", metrics=["accuracy"], repeats="first", n_resamples=50
    )
    r0 = outcomes[outcomes["repeat"] == 0]
    expected = summarize(r0).query("metric == 'accuracy'").groupby("model")["value"].mean()
    by_model = first.set_index("model")
    # tasks are balanced, so the per-task mean of means is the overall mean
    assert by_model.loc["q4", "value"] == pytest.approx(expected["q4"])
    overall_mean = summarize(outcomes.assign(task="all")).set_index(["model", "metric"])["value"]
    assert mean.set_index("model").loc["q4", "value"] == pytest.approx(
        overall_mean[("q4", "accuracy")]
    )


# --------------------------------------------------------------------------- divergence


def test_choice_divergence_known_values():
    div = choice_divergence(
        [[0.5, 0.5], [0.2, 0.3, 0.5], [1.0, 0.0]],
        [[0.9, 0.1], [0.2, 0.3, 0.5], [0.5, 0.5]],
        item_ids=["a", "b", "c"],
    )
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert div["kl"].tolist() == pytest.approx([kl, 0.0, math.log(2)], abs=1e-9)
    assert div["kl"].iloc[0] == pytest.approx(entropy([0.5, 0.5], [0.9, 0.1]))
    assert div["tv"].tolist() == pytest.approx([0.4, 0.0, 0.5])
    assert div["n_choices"].tolist() == [2, 3, 2]
    summary = divergence_summary(div).set_index("measure")
    assert summary.loc["tv", "mean"] == pytest.approx(0.3)
    assert summary.loc["kl", "p95"] == pytest.approx(np.quantile(div["kl"], 0.95))
    with pytest.raises(CompkitError, match="item 0"):
        choice_divergence([[0.5, 0.5]], [[0.2, 0.3, 0.5]])


# --------------------------------------------------------------------------- noise floor


def test_noise_floor_identical_repeats_is_zero():
    outcomes = model_table(n=80, repeats=1)
    again = outcomes[outcomes["model"] == "base"].assign(repeat=1)
    floor = noise_floor(pd.concat([outcomes, again]), baseline="base", n_resamples=100)
    acc = floor[floor["metric"] == "accuracy"].iloc[0]
    assert acc["model"] == "base" and acc["repeat"] == 1
    assert acc["flip_rate"] == 0 and acc["delta"] == 0
    assert acc["ci_low"] == 0 and acc["ci_high"] == 0 and acc["p_value"] == 1.0
    assert floor[floor["metric"] == "field_accuracy"]["flip_rate"].isna().all()


def test_noise_floor_counts_self_flips_and_single_repeat_note():
    rows = table([
        ("base", "i1", 0, "A", 1.0), ("base", "i1", 1, "B", 0.0),
        ("base", "i2", 0, "A", 1.0), ("base", "i2", 1, "A", 1.0),
        ("base", "i3", 0, "B", 0.0), ("base", "i3", 1, "A", 1.0),
        ("base", "i4", 0, "B", 0.0), ("base", "i4", 1, "B", 0.0),
    ])  # fmt: skip
    floor = noise_floor(rows, baseline="base", n_resamples=50).iloc[0]
    assert floor["flip_rate"] == pytest.approx(0.5)
    assert floor["right_to_wrong_rate"] == pytest.approx(0.25)
    single = noise_floor(rows[rows["repeat"] == 0], baseline="base")
    assert single.empty and "single repeat" in single.attrs["note"]
    assert {"repeat", "flip_rate", *RESULT_COLUMNS} <= set(single.columns)


# --------------------------------------------------------------------------- power


def test_minimum_detectable_effect_monotone_and_formula():
    sizes = np.array([20, 50, 100, 400, 1000, 10_000])
    mde = minimum_detectable_effect(sizes, p=0.1)
    assert np.all(np.diff(mde[np.isfinite(mde)]) < 0)
    assert minimum_detectable_effect(3, p=0.1) == np.inf
    # closed form with es = (z_{.975} + z_{.8}) / sqrt(n) (other tail negligible)
    es = (1.959964 + 0.841621) / math.sqrt(10_000)
    assert mde[-1] == pytest.approx(es * math.sqrt(0.1) / math.sqrt(1 + es**2), rel=1e-4)
    assert minimum_detectable_effect(1000, p=0.2) > minimum_detectable_effect(1000, p=0.1)


def test_mde_warnings_flags_small_slices():
    tab = pd.DataFrame(
        {
            "model": "q4",
            "slice": ["overall", "language", "language"],
            "slice_value": ["all", "de", "en"],
            "metric": "accuracy",
            "n": [20_000, 150, 5000],
        }
    )
    out = mde_warnings(tab, budgets={"accuracy": 0.02}).set_index("slice_value")
    assert out["underpowered"].to_dict() == {"all": False, "de": True, "en": False}
    assert "n=150" in out.loc["de", "message"]
    flips = pd.DataFrame(
        {
            "model": "q4",
            "metric": "accuracy",
            "slice": "language",
            "slice_value": "en",
            "flip": ["right_to_wrong", "wrong_to_right"],
            "rate": [0.2, 0.1],
        }
    )
    with_flips = mde_warnings(tab, budgets={"accuracy": 0.02}, flips=flips).set_index("slice_value")
    assert with_flips.loc["en", "discordant_rate"] == pytest.approx(0.3)
    assert with_flips.loc["en", "underpowered"]
