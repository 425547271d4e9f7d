"""Stage 4: calibration metrics, selective prediction, abstention, charts and notebook 04."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kit.analysis import calibration as cal
from kit.analysis.compare import RESULT_COLUMNS
from kit.errors import CompkitError
from kit.evalset import EvalItem
from kit.stats.bootstrap import paired_bootstrap

# --------------------------------------------------------------------------- reference
# An independent, plain-Python implementation of the documented binning: bin b holds
# edges[b] < p <= edges[b+1] (the first bin also p == edges[0]); uniform edges k/B,
# quantile edges = linear-interpolation quantiles at k/B.


def ref_edges(p: list[float], n_bins: int, strategy: str) -> list[float]:
    if strategy == "uniform":
        return [k / n_bins for k in range(n_bins + 1)]
    xs = sorted(p)
    edges = []
    for k in range(n_bins + 1):
        h = (len(xs) - 1) * (k / n_bins)
        lo = math.floor(h)
        hi = min(lo + 1, len(xs) - 1)
        edges.append(xs[lo] + (h - lo) * (xs[hi] - xs[lo]))
    return edges


def ref_bins(y: list[float], p: list[float], n_bins: int, strategy: str) -> list[tuple]:
    edges = ref_edges(p, n_bins, strategy)
    members: dict[int, list[int]] = {}
    for i, value in enumerate(p):
        b = 0
        while b < n_bins - 1 and value > edges[b + 1]:
            b += 1
        members.setdefault(b, []).append(i)
    out = []
    for b in sorted(members):
        idx = members[b]
        conf = sum(p[i] for i in idx) / len(idx)
        acc = sum(y[i] for i in idx) / len(idx)
        out.append((b, len(idx), conf, acc))
    return out


def ref_ece(y, p, n_bins, strategy) -> float:
    return sum(n * abs(c - a) for _, n, c, a in ref_bins(y, p, n_bins, strategy)) / len(p)


def ref_mce(y, p, n_bins, strategy) -> float:
    return max(abs(c - a) for _, _, c, a in ref_bins(y, p, n_bins, strategy))


# --------------------------------------------------------------------------- metrics


def test_hand_computed_values():
    y, p = [1, 0, 1, 1], [0.9, 0.9, 0.2, 0.6]
    table = cal.reliability_table(y, p, n_bins=2)
    assert table["n"].tolist() == [1, 3]
    assert table["gap"].tolist() == pytest.approx([-0.8, 0.8 - 2 / 3])
    # ECE = (1 * 0.8 + 3 * (0.8 - 2/3)) / 4 = 0.3; MCE = 0.8
    assert cal.ece(y, p, n_bins=2) == pytest.approx(0.3)
    assert cal.mce(y, p, n_bins=2) == pytest.approx(0.8)
    # Brier = (0.1^2 + 0.9^2 + 0.8^2 + 0.4^2) / 4
    assert cal.brier(y, p) == pytest.approx(1.62 / 4)
    # edge convention: 0.5 -> first bin, 0 -> first, 1 -> last
    assert cal.reliability_table([1, 1, 1], [0.0, 0.5, 1.0], n_bins=2)["n"].tolist() == [2, 1]
    # quantile edges for [.1 .2 .3 .4] with 2 bins: [.1, .25, .4]
    q = cal.reliability_table([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], n_bins=2, strategy="quantile")
    assert q["upper"].tolist() == pytest.approx([0.25, 0.4]) and q["n"].tolist() == [2, 2]
    assert q["accuracy"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [5, 10, 15])
@pytest.mark.parametrize("ties", [False, True])
def test_agrees_with_reference_implementation(strategy, n_bins, ties):
    rng = np.random.default_rng(n_bins + 100 * ties)
    p = rng.uniform(0, 1, 997)
    if ties:  # many predictions exactly on the uniform edges and tied quantiles
        p = np.round(p, 1)
    y = (rng.uniform(size=p.size) < p).astype(float)
    table = cal.reliability_table(y, p, n_bins=n_bins, strategy=strategy)
    ref = ref_bins(y.tolist(), p.tolist(), n_bins, strategy)
    assert table["bin"].tolist() == [b for b, *_ in ref]
    assert table["n"].tolist() == [n for _, n, *_ in ref]
    np.testing.assert_allclose(table["mean_confidence"], [c for *_, c, _ in ref], atol=1e-12)
    np.testing.assert_allclose(table["accuracy"], [a for *_, a in ref], atol=1e-12)
    assert (
        abs(cal.ece(y, p, n_bins=n_bins, strategy=strategy) - ref_ece(y, p, n_bins, strategy))
        < 1e-9
    )
    assert (
        abs(cal.mce(y, p, n_bins=n_bins, strategy=strategy) - ref_mce(y, p, n_bins, strategy))
        < 1e-9
    )
    assert (
        abs(cal.brier(y, p) - sum((a - b) ** 2 for a, b in zip(p, y, strict=True)) / p.size) < 1e-9
    )


def test_calibrated_model_has_ece_near_zero_and_overconfident_the_gap():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    assert cal.ece(y, p) < 0.02
    assert cal.ece(y, p, strategy="quantile") < 0.02
    over_p = np.full(20_000, 0.9)
    over_y = (rng.uniform(size=over_p.size) < 0.6).astype(float)
    assert cal.ece(over_y, over_p) == pytest.approx(0.3, abs=0.015)
    assert cal.mce(over_y, over_p) == pytest.approx(0.3, abs=0.015)
    table = cal.reliability_table(over_y, over_p)
    assert len(table) == 1 and table["gap"].iloc[0] > 0  # over-confident: positive gap


def test_empty_bins_are_omitted_and_never_averaged_in():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.61, 0.69, 500)
    y = (rng.uniform(size=p.size) < 0.5).astype(float)
    table = cal.reliability_table(y, p, n_bins=10)
    assert table["bin"].tolist() == [6] and table["n"].sum() == 500
    # one populated bin: ECE is that bin's |gap|, not diluted by 9 empty bins
    assert cal.ece(y, p) == pytest.approx(abs(p.mean() - y.mean()))
    assert cal.reliability_table([], [], n_bins=10).empty and math.isnan(cal.ece([], []))


@pytest.mark.parametrize("n", [1000, 1003])
def test_quantile_bins_have_equal_mass(n):
    p = np.random.default_rng(2).uniform(0, 1, n)
    table = cal.reliability_table(np.zeros(n), p, n_bins=10, strategy="quantile")
    assert len(table) == 10 and table["n"].sum() == n
    assert table["n"].max() - table["n"].min() <= 1


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(
        CompkitError, match=r"p \(confidence\) must be finite and in \[0, 1\]; position 1"
    ):
        cal.reliability_table([1, 0], [0.5, np.nan])
    with pytest.raises(CompkitError, match="strategy='equal' is not one of"):
        cal.ece([1], [0.5], strategy="equal")
    with pytest.raises(CompkitError, match="y has 2 values and p 1"):
        cal.brier([1, 0], [0.5])


# --------------------------------------------------------------------------- selective prediction

Y = [1, 1, 0, 1, 0]
P = [0.9, 0.8, 0.8, 0.6, 0.3]


def test_risk_coverage_on_a_crafted_example():
    curve = cal.risk_coverage(Y, P)
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.6, 0.3]
    assert curve["n"].tolist() == [1, 3, 4, 5]  # the tie at 0.8 is kept together
    assert curve["coverage"].tolist() == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 2 / 3, 0.75, 0.6])
    assert curve["risk"].tolist() == pytest.approx([0.0, 1 / 3, 0.25, 0.4])
    assert cal.accuracy_at_coverage(Y, P, coverage=0.8) == pytest.approx(0.75)
    assert cal.accuracy_at_coverage(Y, P, coverage=0.5) == pytest.approx(2 / 3)  # 3 kept >= 2.5
    assert cal.accuracy_at_coverage(Y, P, coverage=0.2) == 1.0
    assert cal.accuracy_at_coverage(Y, P, coverage=1.0) == pytest.approx(0.6)
    with pytest.raises(CompkitError, match="coverage must be in"):
        cal.accuracy_at_coverage(Y, P, coverage=0)


def test_threshold_for_accuracy():
    pick = cal.threshold_for_accuracy(Y, P, target=0.75)
    assert (pick.threshold, pick.coverage, pick.accuracy, pick.n) == (0.6, 0.8, 0.75, 4)
    assert cal.threshold_for_accuracy(Y, P, target=0.9).threshold == 0.9
    assert cal.threshold_for_accuracy(Y, P, target=0.5).coverage == 1.0
    never = cal.threshold_for_accuracy([0, 0], [0.9, 0.8], target=0.5)
    assert math.isnan(never.threshold) and never.coverage == 0.0 and math.isnan(never.accuracy)


# --------------------------------------------------------------------------- confidence sources


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: B\nConfidence: 80%", 0.8),
        ("confidence: 0.8", 0.8),
        ("Confidence level = 65 %", 0.65),
        ("I am 90% confident it is Paris.", 0.9),
        ("Konfidenz: 75 Prozent", 0.75),
        ("confianza: 0,7", 0.7),
        ("Confidence: 40%. On reflection, confidence: 30%", 0.3),
        ("Confidence: 70", 0.7),
        ("The answer is B.", math.nan),
        ("Confidence: 250%", math.nan),
        (None, math.nan),
    ],
)
def test_verbalized_confidence_parsing(text, expected):
    got = cal.parse_verbalized_confidence(text)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def _toy_run() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two models, 2 choice items and 2 generation items (one stating a confidence)."""
    outputs, outcomes = [], []
    for model in ("base", "q4"):
        for item, task, choice_conf, choice_correct, mean_tok, text, correct in [
            ("c1", "classification", 0.9, 1.0, 0.5, "refund", 0.0),
            ("c2", "multiple_choice", 0.6, 0.0, 0.4, "B", 0.0),
            ("g1", "generation", None, None, 0.7, "Sure. Confidence: 80%", 1.0),
            ("g2", "generation", None, None, None, "timeout", 0.0),
        ]:
            outputs.append(
                {"model": model, "item_id": item, "repeat": 0, "output": text,
                 "mean_token_prob": mean_tok, "min_token_prob": None if mean_tok is None else mean_tok / 2,
                 "choice_confidence": choice_conf, "confidence": None}
            )  # fmt: skip
            outcomes.append(
                {"model": model, "item_id": item, "repeat": 0, "task": task, "correct": correct,
                 "choice_correct": choice_correct}
            )  # fmt: skip
    return pd.DataFrame(outputs), pd.DataFrame(outcomes)


def test_confidence_sources_and_missing_confidences_are_counted():
    outputs, outcomes = _toy_run()
    auto = cal.confidence_frame(outputs, outcomes, source="auto")
    assert list(auto.columns) == cal.CONFIDENCE_COLUMNS and len(auto) == len(outcomes)
    base = auto[auto["model"] == "base"].set_index("item_id")
    assert base.loc["c1", ["source", "confidence", "correct"]].tolist() == ["choice", 0.9, 1.0]
    assert base.loc["g1", ["source", "confidence", "correct"]].tolist() == ["mean_token", 0.7, 1.0]
    assert base.loc["g2", "source"] == "none" and math.isnan(base.loc["g2", "confidence"])

    choice = cal.confidence_frame(outputs, outcomes, source="choice")
    missing = cal.missing_confidence(choice, by=("model",)).set_index("model")
    assert missing.loc["base", ["n", "with_confidence", "missing"]].tolist() == [4, 2, 2]
    assert missing.loc["base", "missing_share"] == 0.5
    metrics = cal.calibration_metrics(choice)
    assert set(metrics["n"]) == {2}  # the metrics say how many predictions they used
    assert list(metrics["metric"].unique()) == [*cal.BINNED_METRICS, "accuracy_at_coverage"]

    verbal = cal.confidence_frame(outputs, outcomes, source="verbalized")
    assert verbal.set_index(["model", "item_id"])["confidence"].notna().sum() == 2  # g1 per model
    low = cal.confidence_frame(outputs, outcomes, source="min_token")
    assert low.set_index(["model", "item_id"]).loc[("q4", "c1"), "confidence"] == 0.25
    with pytest.raises(CompkitError, match="confidence source 'logits' is not one of"):
        cal.confidence_frame(outputs, outcomes, source="logits")
    outputs.loc[0, "confidence"] = 80.0  # a reported 0-100 score
    with pytest.raises(
        CompkitError, match=r"1 reported confidence\(s\) outside \[0, 1\], e.g. 80.0"
    ):
        cal.confidence_frame(outputs, outcomes, source="reported")


def test_buckets_line_up_models_and_keep_empty_buckets():
    outputs, outcomes = _toy_run()
    buckets = cal.confidence_buckets(cal.confidence_frame(outputs, outcomes))
    assert buckets.groupby("model").size().tolist() == [6, 6]
    assert (
        buckets["bucket"].iloc[-1] == "[0.90, 1.00]" and buckets["bucket"].iloc[0] == "[0.00, 0.50)"
    )
    top = buckets[(buckets["model"] == "base") & (buckets["bucket"] == "[0.90, 1.00]")].iloc[0]
    assert (top["n"], top["accuracy"], top["mean_confidence"]) == (1, 1.0, 0.9)
    empty = buckets[(buckets["model"] == "base") & (buckets["bucket"] == "[0.80, 0.90)")].iloc[0]
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])
    assert buckets.groupby("model")["n"].sum().tolist() == [3, 3]  # g2 has no confidence


# --------------------------------------------------------------------------- bootstrap


def _synthetic_pair(n: int, seed: int = 0, *, base_shift=0.05, cand_shift=0.15) -> pd.DataFrame:
    """y ~ Bernoulli(q); the baseline states q + 0.05, the candidate q + 0.15."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.3, 0.8, n)
    y = (rng.uniform(size=n) < q).astype(float)
    ids = [f"i{i:05d}" for i in range(n)]
    frames = [
        pd.DataFrame({"model": m, "item_id": ids, "repeat": 0, "task": "classification",
                      "source": "choice", "confidence": q + shift, "correct": y})
        for m, shift in (("base", base_shift), ("cand", cand_shift))
    ]  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def test_bootstrap_ci_of_ece_delta_contains_the_true_delta():
    conf = _synthetic_pair(10_000)
    table = cal.calibration_comparison(conf, baseline="base", n_resamples=300, seed=1)
    assert list(table.columns) == RESULT_COLUMNS
    rows = table.set_index("metric")
    # population values: ECE 0.05 -> 0.15 (delta 0.10) with any binning; Brier rises by
    # 0.15^2 - 0.05^2 = 0.02 because E[q - y] = 0
    for metric, truth in (("ece", 0.10), ("ece_adaptive", 0.10), ("brier", 0.02)):
        low, high = rows.loc[metric, ["ci_low", "ci_high"]]
        # every bin is over-confident, so ECE is mean(p - y) and its change exactly 0.10 in
        # every resample: the interval is (numerically) that point
        assert low - 1e-9 < truth < high + 1e-9, (metric, low, high)
        assert high - low < 0.03
    assert rows.loc["ece", "p_value"] < 0.01 and rows.loc["ece", "n"] == 10_000
    assert rows.loc["ece", "value"] == pytest.approx(
        cal.ece(conf["correct"][10_000:], conf["confidence"][10_000:])
    )


def test_bootstrap_uses_the_paired_bootstrap_resamples():
    """Brier is a per-item mean: the same resamples as kit.stats.bootstrap.paired_bootstrap, so
    the same estimate and (up to the jackknife's grouping in the acceleration) the same BCa
    interval."""
    conf = _synthetic_pair(300, seed=3)
    table = cal.calibration_comparison(conf, baseline="base", n_resamples=200, seed=7)
    sq = {m: ((g["confidence"] - g["correct"]) ** 2).to_numpy() for m, g in conf.groupby("model")}
    ref = paired_bootstrap(
        sq["base"], {"cand": sq["cand"]}, n_resamples=200, seed=7, method="indices"
    )
    brier = table.set_index("metric").loc["brier"]
    assert brier["delta"] == pytest.approx(ref["delta"].iloc[0], abs=1e-12)
    width = ref["ci_high"].iloc[0] - ref["ci_low"].iloc[0]
    assert brier["ci_low"] == pytest.approx(ref["ci_low"].iloc[0], abs=0.05 * width)
    assert brier["ci_high"] == pytest.approx(ref["ci_high"].iloc[0], abs=0.05 * width)
    assert brier["delta_method"] == "bca_bootstrap"


def test_resampled_statistics_equal_the_plain_ones_on_the_expanded_sample():
    """Each resample recomputes the binned statistics (quantile edges included)."""
    rng = np.random.default_rng(4)
    n = 400
    p = np.round(rng.uniform(0, 1, n), 2)  # ties and values on edges
    y = (rng.uniform(size=n) < p).astype(float)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=25).astype(float)
    weights[0] = 0
    weights[0, :3] = 1  # a tiny resample
    s = cal._Sorted.build(p, y, np.arange(n))
    got = cal._weighted_metrics(s, weights, n_bins=10, coverage=0.8)
    for r, w in enumerate(weights.astype(int)):
        yy, pp = np.repeat(y, w), np.repeat(p, w)
        assert got["ece"][r] == pytest.approx(cal.ece(yy, pp), abs=1e-12)
        assert got["ece_adaptive"][r] == pytest.approx(
            cal.ece(yy, pp, strategy="quantile"), abs=1e-12
        )
        assert got["mce"][r] == pytest.approx(cal.mce(yy, pp), abs=1e-12)
        assert got["brier"][r] == pytest.approx(cal.brier(yy, pp), abs=1e-12)
        assert got["accuracy_at_coverage"][r] == pytest.approx(
            cal.accuracy_at_coverage(yy, pp, coverage=0.8), abs=1e-12
        )


def test_comparison_per_slice_and_repeats():
    conf = _synthetic_pair(600, seed=5)
    conf = pd.concat([conf, conf.assign(repeat=1)], ignore_index=True)  # two repeats
    items = conf["item_id"].drop_duplicates()
    slices = pd.DataFrame(
        {"id": items, "language": np.where(np.arange(len(items)) % 3, "en", "de")}
    )
    table = cal.calibration_comparison(
        conf, baseline="base", slices_frame=slices, slice_columns=["language"], n_resamples=50
    )
    assert set(zip(table["slice"], table["slice_value"], strict=True)) == {
        ("overall", "all"),
        ("language", "de"),
        ("language", "en"),
    }
    ece = table[table["metric"] == "ece"].set_index("slice_value")
    assert ece.loc["all", "n"] == 1200 and ece.loc["de", "n"] + ece.loc["en", "n"] == 1200
    de = conf[conf["item_id"].isin(slices.loc[slices["language"] == "de", "id"])]
    cand = de[de["model"] == "cand"]
    assert ece.loc["de", "value"] == pytest.approx(cal.ece(cand["correct"], cand["confidence"]))
    with pytest.raises(CompkitError, match="baseline 'nope' has no predictions"):
        cal.calibration_comparison(conf, baseline="nope", n_resamples=10)


# --------------------------------------------------------------------------- abstention


@pytest.mark.parametrize(
    "text",
    [
        "I don't know.",
        "The policy does not say whether students get a discount.",
        "That is not in the provided text.",
        "I cannot determine that from the context.",
        "There is no information about gift wrapping.",
        "No lo sé, el texto no lo menciona.",
        "Ich weiß es nicht.",
        "Das ist im Text nicht erwähnt.",
        "Je ne sais pas.",
        "Le document ne précise pas ce point.",
    ],
)
def test_admits_uncertainty_phrases(text):
    assert cal.admits_uncertainty(text)


@pytest.mark.parametrize(
    "text", ["Yes, students get 10% off.", "Returns are free within 30 days.", "", None]
)
def test_confident_answers_do_not_admit_uncertainty(text):
    assert not cal.admits_uncertainty(text)


def test_abstention_metrics():
    items = [
        EvalItem(id="m1", task="multiple_choice", input="Trade-in?", choices=["Yes", "The policy does not say"],
                 answer=1, admits_uncertainty=True),
        EvalItem(id="g1", task="generation", input="Student discount?", reference="It does not say.",
                 admits_uncertainty=True),
        EvalItem(id="x1", task="extraction", input="Order 12", fields={"order": "12", "email": None}),
    ]  # fmt: skip
    outcomes = pd.DataFrame(
        [
            {"model": m, "item_id": i, "repeat": 0, "task": t, "correct": c,
             "not_found_correct": nf, "hallucinated_field_rate": h}
            for m, rows in {
                "base": [("m1", "multiple_choice", 1.0, None, None), ("g1", "generation", 0.0, None, None),
                         ("x1", "extraction", 1.0, 1.0, 0.0)],
                "q4": [("m1", "multiple_choice", 0.0, None, None), ("g1", "generation", 0.0, None, None),
                       ("x1", "extraction", 0.0, 0.0, 1.0)],
            }.items()
            for i, t, c, nf, h in rows
        ]
    )  # fmt: skip
    outputs = pd.DataFrame(
        [{"model": "base", "item_id": "g1", "repeat": 0, "output": "Sorry, the policy doesn't say."},
         {"model": "q4", "item_id": "g1", "repeat": 0, "output": "Yes, 10% off for students."}]
    )  # fmt: skip
    with pytest.raises(CompkitError, match="pass outputs="):
        cal.abstention_metrics(outcomes, items)
    table = cal.abstention_metrics(outcomes, items, outputs=outputs)
    got = table.set_index(["model", "metric"])["value"]
    assert (
        got[("base", "admits_uncertainty_rate")] == 1.0
        and got[("q4", "admits_uncertainty_rate")] == 0.0
    )
    assert (
        got[("base", "hallucinated_field_rate")] == 0.0
        and got[("q4", "hallucinated_field_rate")] == 1.0
    )
    assert got[("q4", "not_found_correct")] == 0.0
    assert set(table["metric"]) == set(cal.ABSTENTION_METRICS)
    assert table.set_index(["model", "metric"]).loc[("base", "admits_uncertainty_rate"), "n"] == 2
    per_item = cal.abstention_items(outcomes, items, outputs=outputs)
    comparison = cal.abstention_comparison(per_item, baseline="base", n_resamples=50)
    assert list(comparison.columns) == RESULT_COLUMNS
    # hallucinated fields / not found are item metrics of stage 3's slice table: one source
    assert set(comparison["metric"]) == {"admits_uncertainty_rate"}
    assert comparison["delta"].iloc[0] == -1.0


def test_registry_has_direction_for_every_new_metric():
    from kit.metrics import METRICS

    assert not any(METRICS[m].higher_is_better for m in cal.BINNED_METRICS)
    assert all(METRICS[m].stage == "calibration" for m in cal.BINNED_METRICS)
    assert METRICS[cal.COVERAGE_METRIC].higher_is_better
    assert METRICS["admits_uncertainty_rate"].higher_is_better
    assert METRICS["hallucinated_field_rate"].stage == "scoring"


# --------------------------------------------------------------------------- charts


def test_charts_draw_the_frames_they_are_given():
    alt = pytest.importorskip("altair")
    from kit.report.charts.calibration import (
        confidence_bucket_chart,
        reliability_chart,
        risk_coverage_chart,
    )

    conf = _synthetic_pair(300, seed=6)
    items = conf["item_id"].drop_duplicates()
    slices = pd.DataFrame(
        {"id": items, "language": np.where(np.arange(len(items)) % 2, "en", "de")}
    )
    bins = cal.reliability_bins(conf, slices_frame=slices, slice_columns=["language"])
    assert set(bins["strategy"]) == {"uniform", "quantile"} and (bins["n"] > 0).all()
    buckets = cal.confidence_buckets(conf)
    curve = cal.risk_coverage_curves(conf)
    charts = [
        (reliability_chart(bins), bins, alt.LayerChart),
        (reliability_chart(bins, strategy="quantile", slice="language"), bins, alt.ConcatChart),
        (confidence_bucket_chart(buckets), buckets, alt.LayerChart),
        (risk_coverage_chart(curve, coverage=0.8), curve, alt.LayerChart),
    ]
    for chart, frame, kind in charts:
        assert isinstance(chart, kind)
        assert chart.data is frame  # unchanged input: charts never compute
        chart.to_dict()  # a valid Vega-Lite spec
    single = reliability_chart(cal.reliability_table([1, 0, 1], [0.9, 0.4, 0.7]).assign(model="m"))
    assert isinstance(single, alt.LayerChart)
    with pytest.raises(CompkitError, match=r"no rows with .*slice='channel'"):
        reliability_chart(bins, slice="channel")
    with pytest.raises(CompkitError, match="needs column"):
        confidence_bucket_chart(bins)


# --------------------------------------------------------------------------- notebook

NB_ITEMS = [
    {"id": f"c{i}", "task": "classification", "input": text, "label": label, "language": lang}
    for i, (text, label, lang) in enumerate([
        ("where is my parcel", "order_status", "en"), ("someone stole my card", "fraud_report", "en"),
        ("cancel it please", "cancel_order", "en"), ("has my order shipped", "order_status", "de"),
        ("stop my order now", "cancel_order", "de"), ("my refund never came", "refund", "en"),
    ])
] + [
    {"id": "m1", "task": "multiple_choice", "input": "Trade-in programme?", "language": "en",
     "choices": ["Yes", "The policy does not say"], "answer": 1, "admits_uncertainty": True},
    {"id": "g1", "task": "generation", "input": "Student discount?", "language": "en",
     "reference": "The policy does not say.", "admits_uncertainty": True},
]  # fmt: skip


@pytest.mark.notebooks
def test_notebook_04_runs_under_papermill(tmp_path, tiny_llama_dir):
    import papermill as pm

    from kit.stages.candidates import run_candidates
    from kit.stages.freeze import freeze_baseline

    d = tmp_path / "study"
    d.mkdir()
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in NB_ITEMS))
    (d / "prompt.jinja").write_text(
        "{% if labels %}Intents: {{ labels | join(', ') }}. {% endif %}{{ input }}"
    )
    study = {
        "name": "cal", "eval_set": {"path": "eval.jsonl"}, "prompt": {"template": "prompt.jinja"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 4, "seed": 3}, "repeats": 1,
        "baseline": {"name": "base", "runtime": "transformers", "model": str(tiny_llama_dir), "batch_size": 4},
        "candidates": [{"name": "pruned", "runtime": "transformers", "model": str(tiny_llama_dir),
                        "batch_size": 4, "recipe": {"name": "prune_magnitude", "params": {"sparsity": 0.5}}}],
    }  # fmt: skip
    (d / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    run = tmp_path / "runs" / "r"
    freeze_baseline(d / "study.yaml", run, progress=False)
    run_candidates(run, progress=False)

    root = Path(__file__).resolve().parent.parent
    pm.execute_notebook(
        str(root / "notebooks" / "04_calibration.ipynb"), str(tmp_path / "04.ipynb"),
        parameters={"run": str(run), "n_resamples": 50, "n_bins": 5}, cwd=str(root / "notebooks"),
        progress_bar=False, kernel_name="python3",
    )  # fmt: skip
    tables = run / "tables"
    metrics = pd.read_parquet(tables / "calibration_metrics.parquet")
    assert set(metrics["model"]) == {"base", "pruned"}
    assert {
        "ece",
        "ece_adaptive",
        "mce",
        "brier",
        "accuracy_at_coverage",
        "admits_uncertainty_rate",
    } <= set(metrics["metric"])
    comparison = pd.read_parquet(tables / "calibration_comparison.parquet")
    assert list(comparison.columns) == RESULT_COLUMNS and set(comparison["model"]) == {"pruned"}
    assert {"overall", "task", "language"} <= set(comparison["slice"])
    reliability = pd.read_parquet(tables / "reliability.parquet")
    assert set(reliability["strategy"]) == {"uniform", "quantile"} and (reliability["n"] > 0).all()
    missing = pd.read_parquet(tables / "missing_confidence.parquet")
    assert missing["n"].sum() == 2 * len(NB_ITEMS)
    for name in ("confidence_buckets", "risk_coverage", "selective", "abstention"):
        assert len(pd.read_parquet(tables / f"{name}.parquet")) > 0, name
    provenance = json.loads((tables / "calibration.json").read_text())
    assert provenance["parameters"]["n_resamples"] == 50 and provenance["baseline"] == "base"
