"""Paired comparison: flips, McNemar, the evidence rows of compare_models, noise floor, divergence."""

from __future__ import annotations

import math

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
    noise_floor,
)
from kit.errors import CompkitError
from kit.scoring import summarize
from kit.stats.power import minimum_detectable_effect
from kit.stats.tests import mcnemar_test


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
    with pytest.raises(CompkitError, match=r"unknown metric .mystery.; valid metrics"):
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
    assert acc["flip_rate"] == 0 and acc["delta"] == 0 and acc["p_value"] == 1.0
    # no item changed: the score interval still has width (80 items cannot prove "no change")
    assert acc["delta_method"] == "tango_cc"
    assert acc["ci_low"] == pytest.approx(-acc["ci_high"]) and acc["ci_high"] > 0.03
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
