"""Budget rules: the grammar, file errors, the frozen copy, verdicts at the CI boundaries."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kit.budget import grammar as B
from kit.budget.grammar import (
    AbsoluteBound,
    ChangeBound,
    SliceRef,
    budget_status,
    compare_budgets,
    decide,
    evaluate_rules,
    flip_rate_evidence,
    judge,
    load_budget,
    load_frozen_budget,
    parse_rule,
    stage_evidence,
)
from kit.errors import CompkitError
from kit.scoring import METRICS

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "budget.yaml"
Z = 1.959963984540054


# --------------------------------------------------------------------------- grammar


DEMO_EXPECTED = [
    ("json_parse_failure", None, AbsoluteBound("<", 0.005)),
    ("recall", SliceRef("label_rarity", "rare"), ChangeBound("points", ">=", -0.01)),
    ("ttft_p95_ms", None, AbsoluteBound("<", 400.0)),
    ("fallback_rate", None, AbsoluteBound("<", 0.10)),
    ("accuracy", None, ChangeBound("relative", ">=", -0.02)),
    ("unsafe_compliance", None, ChangeBound("no_increase", "<=", 0.0)),
    ("flip_rate", None, AbsoluteBound("<", 0.05)),
]


def _same_bound(a, b) -> bool:
    return (
        type(a) is type(b)
        and a.op == b.op
        and math.isclose(a.threshold, b.threshold)
        and (getattr(a, "kind", None) == getattr(b, "kind", None))
    )


def test_every_demo_sentence_parses_as_written():
    budget = load_budget(DEMO)
    assert budget.sha256 == hashlib.sha256(DEMO.read_bytes()).hexdigest()
    assert budget.source == DEMO
    assert len(budget) == len(DEMO_EXPECTED)
    for i, (rule, (metric, slice_, bound)) in enumerate(zip(budget, DEMO_EXPECTED, strict=True)):
        assert rule.id == f"R{i + 1}"
        assert rule.metric == metric, rule.text
        assert rule.slice == slice_, rule.text
        assert _same_bound(rule.bound, bound), (rule.text, rule.bound)
        assert rule.why and rule.text in DEMO.read_text()  # quoted as written
    table = budget.frame()
    assert table["limit"].tolist()[:2] == ["< 0.5%", "change ≥ -1 point"]
    assert table["slice"].tolist()[1] == "label_rarity=rare"


VARIANTS = [
    ("flip rate at most 5%", "flip_rate", None, AbsoluteBound("<=", 0.05)),
    ("error rate no more than 2 percent", "error_rate", None, AbsoluteBound("<=", 0.02)),
    ("fallback rate less than 0.1", "fallback_rate", None, AbsoluteBound("<", 0.1)),
    ("accuracy must be at least 80 percent", "accuracy", None, AbsoluteBound(">=", 0.8)),
    ("accuracy must stay above 75%", "accuracy", None, AbsoluteBound(">", 0.75)),
    ("accuracy must be 70% or more", "accuracy", None, AbsoluteBound(">=", 0.7)),
    ("ECE must not exceed 0.05", "ece", None, AbsoluteBound("<=", 0.05)),
    ("accuracy must not fall below 60 percent", "accuracy", None, AbsoluteBound(">=", 0.6)),
    ("p99 TTFT must stay under 1.5 seconds", "ttft_p99_ms", None, AbsoluteBound("<", 1500.0)),
    ("median first-token latency below 120 ms", "ttft_p50_ms", None, AbsoluteBound("<", 120.0)),
    ("peak memory must not exceed 2 GB", "peak_memory_mb", None, AbsoluteBound("<=", 2048.0)),
    ("tokens per second must stay above 20", "tokens_per_s", None, AbsoluteBound(">", 20.0)),
    ("cost per 1k requests below $0.50", "cost_per_1k_requests", None, AbsoluteBound("<", 0.5)),
    ("flip rate ≤ 5%", "flip_rate", None, AbsoluteBound("<=", 0.05)),
    (
        "hallucinated fields must stay below 3 percent",
        "hallucinated_field_rate",
        None,
        AbsoluteBound("<", 0.03),
    ),
    ("accuracy may drop by at most 2 points", "accuracy", None, ChangeBound("points", ">=", -0.02)),
    ("accuracy may drop by 1 point at most", "accuracy", None, ChangeBound("points", ">=", -0.01)),
    (
        "accuracy cannot drop more than 0.5 pp",
        "accuracy",
        None,
        ChangeBound("points", ">=", -0.005),
    ),
    (
        "accuracy must not decrease by more than 3 percentage points",
        "accuracy",
        None,
        ChangeBound("points", ">=", -0.03),
    ),
    (
        "JSON parse failures may rise by less than 1 point",
        "json_parse_failure",
        None,
        ChangeBound("points", "<", 0.01),
    ),
    (
        "accuracy may drop at most 2% relative",
        "accuracy",
        None,
        ChangeBound("relative", ">=", -0.02),
    ),
    (
        "p95 first-token latency may rise at most 10 percent",
        "ttft_p95_ms",
        None,
        ChangeBound("relative", "<=", 0.10),
    ),
    (
        "p95 first-token latency may rise by up to 50 ms",
        "ttft_p95_ms",
        None,
        ChangeBound("absolute", "<=", 50.0),
    ),
    (
        "rare-label recall must not get worse by more than 2 points",
        "recall",
        SliceRef("label_rarity", "rare"),
        ChangeBound("points", ">=", -0.02),
    ),
    (
        "hallucinated fields must not increase",
        "hallucinated_field_rate",
        None,
        ChangeBound("no_increase", "<=", 0.0),
    ),
    ("accuracy must never decrease", "accuracy", None, ChangeBound("no_decrease", ">=", 0.0)),
    (
        "unsafe compliance must be no worse than the baseline",
        "unsafe_compliance",
        None,
        ChangeBound("no_increase", "<=", 0.0),
    ),
    # slices
    (
        "accuracy on the rare slice may drop at most 1 point",
        "accuracy",
        SliceRef("label_rarity", "rare"),
        ChangeBound("points", ">=", -0.01),
    ),
    (
        "accuracy for language=de cannot drop by more than 3 points",
        "accuracy",
        SliceRef("language", "de"),
        ChangeBound("points", ">=", -0.03),
    ),
    (
        "recall for rare labels cannot drop by more than 1 point",
        "recall",
        SliceRef("label_rarity", "rare"),
        ChangeBound("points", ">=", -0.01),
    ),
    (
        "accuracy on extraction items must stay above 60 percent",
        "accuracy",
        SliceRef("task", "extraction"),
        AbsoluteBound(">", 0.6),
    ),
    (
        "JSON parse failures on tool-call items must stay under 1 percent",
        "json_parse_failure",
        SliceRef("task", "tool_call"),
        AbsoluteBound("<", 0.01),
    ),
    (
        "extraction accuracy must stay above 0.6",
        "accuracy",
        SliceRef("task", "extraction"),
        AbsoluteBound(">", 0.6),
    ),
    (
        "accuracy in German must be at least 70%",
        "accuracy",
        SliceRef("language", "de"),
        AbsoluteBound(">=", 0.7),
    ),
    (
        "accuracy on the de slice may drop at most 5 points",
        "accuracy",
        SliceRef("language", "de"),
        ChangeBound("points", ">=", -0.05),
    ),
]


@pytest.mark.parametrize(
    ("text", "metric", "slice_", "bound"), VARIANTS, ids=[v[0] for v in VARIANTS]
)
def test_variants_parse(text, metric, slice_, bound):
    rule = parse_rule(text)
    assert rule.metric == metric
    assert rule.slice == slice_
    assert _same_bound(rule.bound, bound), rule.bound
    assert rule.text == text


def test_directions_and_stages_come_from_registries():
    assert B.metric_spec("accuracy").higher_is_better is METRICS["accuracy"].higher_is_better
    assert B.metric_spec("json_parse_failure").higher_is_better is False
    assert B.metric_spec("ttft_p95_ms").stage == "serving"
    assert B.metric_spec("fallback_rate").stage == "routing"
    assert B.metric_spec("ece").stage == "calibration"
    assert B.metric_spec("flip_rate").stage == "comparison"
    # "get worse" follows the metric's direction: up for a lower-is-better metric
    assert parse_rule("JSON parse failures must not get worse").bound.kind == "no_increase"
    assert parse_rule("accuracy must not get worse").bound.kind == "no_decrease"


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(CompkitError, match="unknown metric 'p95 first-token latncy'") as err:
        parse_rule("p95 first-token latncy must stay below 400 ms")
    for name in ("json_parse_failure", "accuracy", "ttft_p95_ms", "fallback_rate", "flip_rate"):
        assert name in str(err.value)


def test_unknown_slice_lists_the_valid_values():
    with pytest.raises(CompkitError, match="unknown slice value task=summaries") as err:
        parse_rule("accuracy for task=summaries cannot drop by more than 1 point")
    assert "extraction" in str(err.value) and "classification" in str(err.value)
    with pytest.raises(CompkitError, match="unknown slice 'gold'") as err:
        parse_rule("accuracy on the gold slice must stay above 50%")
    assert "label_rarity (rare, common)" in str(err.value)
    with pytest.raises(CompkitError, match="unknown slice column 'tier'"):
        parse_rule("accuracy for tier=gold must stay above 50%")


def test_slices_from_the_data_restrict_and_extend_the_vocabulary():
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "task": ["classification", "extraction", "classification"],
            "language": ["en", "de", "en"],
            "label_rarity": ["rare", None, "common"],
            "channel": ["email", "chat", "email"],
        }
    )
    rule = parse_rule("accuracy for channel=email must stay above 50%", slices=frame)
    assert rule.slice == SliceRef("channel", "email")
    assert parse_rule("accuracy on email items must stay above 50%", slices=frame).slice == (
        SliceRef("channel", "email")
    )
    with pytest.raises(CompkitError, match="valid values of language: de, en"):
        parse_rule("accuracy for language=fr must stay above 50%", slices=frame)


def test_unparseable_and_ambiguous_sentences_are_refused_with_a_hint():
    with pytest.raises(CompkitError, match=r"cannot read this sentence; write e\.g\."):
        parse_rule("accuracy should be good")
    with pytest.raises(CompkitError, match=r"ambiguous .* '2 points' .* '2 percent relative'"):
        parse_rule("accuracy may drop at most 2 percent")
    with pytest.raises(CompkitError, match=r"write 5 percent or 0\.05"):
        parse_rule("flip rate below 5")
    with pytest.raises(CompkitError, match="points describe a change"):
        parse_rule("accuracy must stay above 80 points")
    with pytest.raises(CompkitError, match="measured in ms"):
        parse_rule("p95 first-token latency must stay below 40 percent")
    with pytest.raises(CompkitError, match="recall needs a label slice"):
        parse_rule("recall cannot drop by more than 1 point")
    with pytest.raises(CompkitError, match="must be forbidden"):
        parse_rule("accuracy must increase")


def test_budget_file_errors_name_file_rule_number_and_text(tmp_path):
    path = tmp_path / "budget.yaml"
    path.write_text(
        "rules:\n"
        "  - rule: JSON parse failures must stay under 0.5 percent\n"
        "  - rule: p95 first-token latncy must stay below 400 ms\n"
        "  - rule: accuracy should be good\n"
    )
    with pytest.raises(CompkitError) as err:
        load_budget(path)
    text = str(err.value)
    assert "2 problem(s)" in text
    assert f'{path}, rule 2 "p95 first-token latncy must stay below 400 ms": unknown metric' in text
    assert f'{path}, rule 3 "accuracy should be good": cannot read this sentence' in text
    assert "rule 1" not in text


def test_budget_file_schema_errors(tmp_path):
    path = tmp_path / "budget.yaml"
    path.write_text("rules:\n  - rule: flip rate below 5 percent\n    wy: typo\n")
    with pytest.raises(CompkitError, match=r'rule 1 "flip rate below 5 percent" \(wy\): Extra'):
        load_budget(path)
    path.write_text("rules: []\n")
    with pytest.raises(CompkitError, match=r"\(rules\): List should have at least 1 item"):
        load_budget(path)
    path.write_text(
        "rules:\n  - rule: flip rate below 5 percent\n    id: a\n"
        "  - rule: accuracy must not decrease\n    id: a\n"
    )
    with pytest.raises(CompkitError, match="rule id 'a' is used twice"):
        load_budget(path)
    with pytest.raises(CompkitError, match="does not exist"):
        load_budget(tmp_path / "missing.yaml")


def test_structured_form_for_what_the_grammar_cannot_say(tmp_path):
    path = tmp_path / "budget.yaml"
    path.write_text(
        "rules:\n"
        "  - rule: macro rare-label recall stays within budget\n"
        "    id: rare-macro\n"
        "    metric: rare_label_recall\n"
        "    bound: {change: points, op: '>=', limit: -0.02}\n"
        "  - rule: German accuracy at least 70%\n"
        "    metric: accuracy\n"
        "    slice: language=de\n"
        "    bound: {op: '>=', value: 0.7}\n"
        "  - rule: no more refusals\n"
        "    metric: refusal_rate\n"
        "    bound: {change: no_increase}\n"
    )
    rules = list(load_budget(path))
    assert (rules[0].id, rules[0].metric, rules[0].bound) == (
        "rare-macro",
        "rare_label_recall",
        ChangeBound("points", ">=", -0.02),
    )
    assert rules[1].slice == SliceRef("language", "de") and rules[1].bound == AbsoluteBound(
        ">=", 0.7
    )
    assert rules[2].bound == ChangeBound("no_increase", "<=", 0.0)
    path.write_text("rules:\n  - rule: x\n    metric: accuracy\n")
    with pytest.raises(CompkitError, match="needs 'bound'"):
        load_budget(path)
    path.write_text("rules:\n  - rule: x\n    metric: acuracy\n    bound: {op: '<', value: 1}\n")
    with pytest.raises(CompkitError, match="unknown metric 'acuracy'; valid metrics: accuracy"):
        load_budget(path)


# --------------------------------------------------------------------------- verdicts


def _row(metric="accuracy", *, model="q4", slice_=("overall", "all"), **values):
    return {
        "model": model,
        "slice": slice_[0],
        "slice_value": slice_[1],
        "metric": metric,
        **values,
    }


def _one(rule_text, row, **kw):
    rule = parse_rule(rule_text) if isinstance(rule_text, str) else rule_text
    return evaluate_rules([rule], evidence=pd.DataFrame([row]), **kw).iloc[0]


@pytest.mark.parametrize(
    ("low", "high", "op", "expected"),
    [
        (0.001, 0.004, "<", "pass"),  # entirely inside
        (0.006, 0.009, "<", "fail"),  # entirely outside
        (0.002, 0.008, "<", "inconclusive"),  # straddling
        (0.002, 0.005, "<", "inconclusive"),  # upper end on a strict limit: not inside
        (0.002, 0.005, "<=", "pass"),  # upper end on an inclusive limit: inside
        (0.005, 0.009, "<", "fail"),  # lower end on a strict limit: all outside
        (0.005, 0.009, "<=", "inconclusive"),  # lower end on an inclusive limit: one point in
        (0.005 + 1e-13, 0.009, "<=", "inconclusive"),  # float noise counts as on the limit
        (-0.01, 0.02, ">=", "pass"),
        (-0.03, -0.01, ">=", "inconclusive"),
        (-0.03, -0.01, ">", "fail"),
    ],
)
def test_judge_at_the_ci_boundaries(low, high, op, expected):
    threshold = 0.005 if op in ("<", "<=") else -0.01
    assert judge(low, high, op, threshold) == expected


def test_absolute_bound_uses_the_value_ci_and_reads_naturally():
    row = _row(
        "json_parse_failure",
        value=0.008,
        value_ci_low=0.006,
        value_ci_high=0.016,
        baseline_value=0.001,
        delta=0.007,
        ci_low=0.001,
        ci_high=0.012,
        n=800,
    )
    v = _one("JSON parse failures must stay under 0.5 percent", row)
    assert v["verdict"] == "fail"
    assert v["reason"] == (
        "observed 0.8% (95% CI 0.6–1.6%) vs limit < 0.5%: the whole CI is above the limit"
    )
    assert (v["observed"], v["ci_low"], v["ci_high"], v["threshold"]) == (
        0.008,
        0.006,
        0.016,
        0.005,
    )
    assert (v["quantity"], v["op"], v["unit"], v["baseline"]) == ("value", "<", "share", 0.001)
    ok = _one(
        "JSON parse failures must stay under 0.5 percent",
        {**row, "value": 0.001, "value_ci_low": 0.0, "value_ci_high": 0.004},
    )
    assert ok["verdict"] == "pass" and ok["reason"].endswith("the whole CI is below the limit")


def test_inclusive_touch_passes_and_says_so():
    row = _row("flip_rate", value=0.03, value_ci_low=0.01, value_ci_high=0.05, n=300)
    assert _one("flip rate at most 5 percent", row)["reason"].endswith(
        "the whole CI is below or on the limit"
    )
    assert _one("flip rate below 5 percent", row)["verdict"] == "inconclusive"


def test_wilson_ci_for_shares_and_n_needed_decides_a_rerun():
    """Without an explicit value CI a share gets a Wilson interval from value and n."""
    rule = parse_rule("JSON parse failures must stay under 0.5 percent")
    row = _row(
        "json_parse_failure",
        value=0.008,
        baseline_value=0.008,
        delta=0.0,
        ci_low=0.0,
        ci_high=0.0,
        n=500,
    )  # a zero-width delta CI must not make the value exact
    v = _one(rule, row)
    lo, hi = B._wilson(0.008, 500, Z)
    assert v["verdict"] == "inconclusive"
    assert (v["ci_low"], v["ci_high"]) == pytest.approx((lo, hi))
    n_needed = int(v["n_needed"])
    assert n_needed > 500 and f"about {n_needed:,} items (now 500) would decide it" in v["reason"]
    assert _one(rule, {**row, "n": n_needed})["verdict"] == "fail"
    assert _one(rule, {**row, "n": n_needed - 1})["verdict"] == "inconclusive"


def _normal_row(delta, sd, n, **extra):
    half = Z * sd / math.sqrt(n)
    return _row(
        value=0.7 + delta,
        baseline_value=0.7,
        delta=delta,
        ci_low=delta - half,
        ci_high=delta + half,
        n=n,
        **extra,
    )


@pytest.mark.parametrize(("delta", "expected"), [(-0.004, "pass"), (-0.016, "fail")])
def test_change_rule_n_needed_decides_a_rerun(delta, expected):
    rule = parse_rule("accuracy cannot drop by more than 1 point")
    first = _one(rule, _normal_row(delta, 0.3, 400))
    assert first["verdict"] == "inconclusive" and first["quantity"] == "change"
    n_needed = first["n_needed"]
    assert np.isfinite(n_needed) and n_needed > 400
    assert _one(rule, _normal_row(delta, 0.3, int(n_needed)))["verdict"] == expected
    assert _one(rule, _normal_row(delta, 0.3, int(n_needed * 0.9)))["verdict"] == "inconclusive"


def test_observed_on_the_limit_has_no_n_needed():
    v = _one("accuracy cannot drop by more than 1 point", _normal_row(-0.01, 0.3, 400))
    assert v["verdict"] == "inconclusive" and np.isnan(v["n_needed"])
    assert "sits on the limit" in v["reason"]


def test_relative_change_rules():
    rule = parse_rule("accuracy may drop at most 2 percent relative")
    row = _row(
        value=0.49,
        baseline_value=0.5,
        delta=-0.01,
        ci_low=-0.009 - 0.0005,
        ci_high=-0.009 + 0.0005,
        n=1000,
    )
    v = _one(rule, row)  # relative: -0.0095/0.5 .. -0.0085/0.5 = -1.9% .. -1.7%
    assert v["verdict"] == "pass" and v["quantity"] == "relative change"
    assert v["observed"] == pytest.approx(-0.02)  # the point is -2% exactly, the CI is inside
    assert (v["ci_low"], v["ci_high"]) == pytest.approx((-0.019, -0.017))
    assert v["reason"].startswith("relative change -2.0% (95% CI -1.9% to -1.7%) vs limit ≥ -2%")
    fail = _one(rule, {**row, "ci_low": -0.03, "ci_high": -0.015})
    assert fail["verdict"] == "fail"
    zero = _one(rule, {**row, "baseline_value": 0.0, "value": 0.0, "delta": 0.0})
    assert zero["verdict"] == "inconclusive" and "baseline's value is 0" in zero["reason"]


def test_no_increase_rules():
    rule = parse_rule("unsafe compliance must not increase")
    base = _row("unsafe_compliance", value=0.1, baseline_value=0.1, delta=0.0, n=60)
    # nothing changed on 60 items: a rise of up to z^2/(60+z^2) = 6% is not excluded
    assert _one(rule, {**base, "ci_low": 0.0, "ci_high": 0.0})["verdict"] == "inconclusive"
    assert _one(rule, {**base, "ci_low": -0.05, "ci_high": 0.0})["verdict"] == "pass"
    assert _one(rule, {**base, "ci_low": 0.01, "ci_high": 0.05})["verdict"] == "fail"
    mixed = _one(rule, {**base, "ci_low": -0.02, "ci_high": 0.03})
    assert mixed["verdict"] == "inconclusive"
    assert "vs limit no increase (≤ 0)" in mixed["reason"]


def test_not_measured_and_missing_ci():
    budget = load_budget(DEMO)
    evidence = pd.DataFrame([_normal_row(0.0, 0.05, 400)])
    v = evaluate_rules(budget, evidence=evidence, candidates=["q4", "absent"])
    assert len(v) == 14 and list(v.columns) == B.VERDICT_COLUMNS
    q4 = v[v["candidate"] == "q4"].set_index("rule_id")
    assert q4.loc["R5", "verdict"] == "pass"  # accuracy relative: the only rule with evidence
    latency = q4.loc["R3"]
    assert latency["verdict"] == "not measured"
    assert "the serving stage has not reported it" in latency["reason"]
    assert "routing stage" in q4.loc["R4", "reason"]
    assert (v[v["candidate"] == "absent"]["verdict"] == "not measured").all()
    no_ci = _one(
        "p95 first-token latency must stay below 400 ms", _row("ttft_p95_ms", value=320.0, n=200)
    )
    assert no_ci["verdict"] == "inconclusive" and "no CI was supplied" in no_ci["reason"]
    exact = _one(
        "p95 first-token latency must stay below 400 ms",
        _row("ttft_p95_ms", value=320.0, value_ci_low=320.0, value_ci_high=320.0),
    )
    assert exact["verdict"] == "pass"
    assert exact["reason"].startswith("observed 320 ms (95% CI 320–320 ms) vs limit < 400 ms")
    no_base = _one("accuracy must not decrease", _row(value=0.5, n=10))
    assert no_base["verdict"] == "not measured" and "no baseline value" in no_base["reason"]


def test_recall_reads_the_label_slice_accuracy_rows():
    row = _normal_row(-0.002, 0.05, 300, slice_=("label_rarity", "rare"))
    v = _one("rare-label recall cannot drop by more than 1 point", row)
    assert v["verdict"] == "pass" and v["slice"] == "label_rarity=rare"
    overall = _one(
        "rare-label recall cannot drop by more than 1 point", _normal_row(-0.002, 0.05, 300)
    )
    assert overall["verdict"] == "not measured"


def test_stage_and_flip_evidence_rows():
    rows = stage_evidence(
        [
            {
                "model": "q4",
                "metric": "ttft_p95_ms",
                "value": 380.0,
                "ci_low": 350.0,
                "ci_high": 395.0,
            },
            {
                "model": "q4",
                "metric": "fallback_rate",
                "value": 0.12,
                "baseline_value": 0.0,
                "ci_low": 0.09,
                "ci_high": 0.15,
                "value_ci_low": 0.09,
                "value_ci_high": 0.15,
                "n": 400,
            },
        ]
    )
    assert rows.loc[1, "delta"] == pytest.approx(0.12)
    with pytest.raises(CompkitError, match="not a stage metric"):
        stage_evidence([{"model": "q4", "metric": "accuracy", "value": 1.0}])
    flips = pd.DataFrame(
        [
            {
                "model": "q4",
                "metric": "accuracy",
                "slice": "overall",
                "slice_value": "all",
                "flip": kind,
                "count": count,
                "n": 200,
                "rate": count / 200,
            }
            for kind, count in [
                ("right_to_wrong", 6),
                ("wrong_to_right", 2),
                ("wrong_to_other_wrong", 4),
                ("unchanged_right", 150),
                ("unchanged_wrong", 38),
            ]
        ]
    )
    flip_rows = flip_rate_evidence(flips)
    assert flip_rows.loc[0, "value"] == pytest.approx(0.04)
    assert (flip_rows.loc[0, "value_ci_low"], flip_rows.loc[0, "value_ci_high"]) == pytest.approx(
        B._wilson(0.04, 200, Z)
    )
    evidence = pd.concat([rows, flip_rows], ignore_index=True)
    v = evaluate_rules(load_budget(DEMO), evidence=evidence).set_index("rule_id")
    assert v.loc["R3", "verdict"] == "pass"
    assert v.loc["R4", "verdict"] == "inconclusive"  # fallback 9-15% vs < 10%
    assert v.loc["R7", "verdict"] == "inconclusive"  # flips 4% (Wilson 2.0-7.7%) vs < 5%


def test_evidence_is_validated():
    rule = parse_rule("flip rate below 5 percent")
    with pytest.raises(CompkitError, match=r"lacks column\(s\) \['value'\]"):
        evaluate_rules(
            [rule],
            evidence=pd.DataFrame(
                [{"model": "a", "slice": "overall", "slice_value": "all", "metric": "x"}]
            ),
        )
    dup = pd.DataFrame([_row("flip_rate", value=0.01), _row("flip_rate", value=0.02)])
    with pytest.raises(CompkitError, match="duplicated rows"):
        evaluate_rules([rule], evidence=dup)


def test_with_compare_models_output():
    """The real comparison frame is valid evidence (shape compatibility)."""
    from kit.analysis.compare import compare_models

    rng = np.random.default_rng(0)
    n = 120
    base = rng.random(n) < 0.7
    cand = np.where(rng.random(n) < 0.05, ~base, base)
    outcomes = pd.DataFrame(
        {
            "model": ["base"] * n + ["q4"] * n,
            "item_id": [f"i{i}" for i in range(n)] * 2,
            "repeat": 0,
            "task": "classification",
            "correct": np.concatenate([base, cand]).astype(float),
        }
    )
    table = compare_models(outcomes, baseline="base", n_resamples=200)
    v = evaluate_rules([parse_rule("accuracy may drop by at most 20 points")], evidence=table)
    assert v.loc[0, "verdict"] == "pass" and v.loc[0, "candidate"] == "q4"


# --------------------------------------------------------------------------- decide


def test_decide_aggregates_per_candidate():
    def verdict(candidate, rule, outcome):
        return {"candidate": candidate, "rule": rule, "verdict": outcome}

    verdicts = pd.DataFrame(
        [
            verdict("good", "r1", "pass"),
            verdict("good", "r2", "pass"),
            verdict("bad", "r1", "fail"),
            verdict("bad", "r2", "inconclusive"),
            verdict("bad", "r3", "not measured"),
            verdict("unsure", "r1", "pass"),
            verdict("unsure", "r2", "inconclusive"),
            verdict("unmeasured", "r1", "pass"),
            verdict("unmeasured", "r2", "not measured"),
        ]
    )
    d = decide(verdicts).set_index("candidate")
    assert list(d.index) == ["good", "bad", "unsure", "unmeasured"]
    assert d["decision"].tolist() == ["accepted", "rejected", "inconclusive", "inconclusive"]
    assert d.loc["good", "reason"] == "passes all 2 rule(s)"
    assert d.loc["bad", "reason"] == "fails: 'r1'; undecided: 'r2'; not measured: 'r3'"
    assert d.loc["unmeasured", "reason"] == "not measured: 'r2'"
    assert d.loc["bad", ["n_pass", "n_fail", "n_inconclusive", "n_not_measured"]].tolist() == [
        0,
        1,
        1,
        1,
    ]


# --------------------------------------------------------------------------- frozen copy


def test_compare_budgets_reports_an_edit_with_a_diff(tmp_path):
    frozen, current = tmp_path / "frozen.yaml", tmp_path / "budget.yaml"
    frozen.write_text(DEMO.read_text())
    current.write_text(DEMO.read_text())
    same = compare_budgets(frozen, current)
    assert not same.changed and same.diff == "" and "unchanged" in same.message
    current.write_text(DEMO.read_text().replace("under 0.5 percent", "under 2 percent"))
    edited = compare_budgets(frozen, current)
    assert edited.changed and edited.frozen_sha256 != edited.current_sha256
    assert "-  - rule: JSON parse failures must stay under 0.5 percent" in edited.diff
    assert "+  - rule: JSON parse failures must stay under 2 percent" in edited.diff
    assert "verdicts use the frozen copy" in edited.message
    current.unlink()
    gone = compare_budgets(frozen, current)
    assert gone.changed and "no longer exists" in gone.message


def _fake_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder with a manifest and a frozen budget copy (no model run)."""
    from kit.environment import Hardware, KitInfo
    from kit.stages.freeze import BaselineManifest, FrozenInputs, OutputsSummary

    study_budget = tmp_path / "study" / "budget.yaml"
    study_budget.parent.mkdir()
    study_budget.write_text(DEMO.read_text())
    run = tmp_path / "runs" / "demo"
    (run / "frozen").mkdir(parents=True)
    (run / "frozen" / "budget.yaml").write_text(DEMO.read_text())
    sha = hashlib.sha256(study_budget.read_bytes()).hexdigest()
    inputs = FrozenInputs(
        study_file="study.yaml",
        study_sha256="0",
        eval_set_path="e.jsonl",
        eval_set_sha256="0",
        eval_set_rows=0,
        eval_set_config={},
        template_path="t",
        template_sha256="0",
        prompt={},
        sampling={},
        repeats=1,
        baseline={},
        baseline_fingerprint="0",
        budget_path=str(study_budget),
        budget_sha256=sha,
    )
    manifest = BaselineManifest(
        study="demo",
        created_at="2025-01-01T00:00:00Z",
        inputs=inputs,
        model={},
        hardware=Hardware(
            cpu="x",
            cores=1,
            memory_gb=1.0,
            gpu=None,
            gpu_memory_gb=None,
            platform="linux",
            python="3.11",
        ),
        libraries={},
        kit=KitInfo(version="0", git_sha=None, git_dirty=None),
        outputs=OutputsSummary(
            model="base", path="outputs/base", rows=0, items=0, repeats=1, errors=0
        ),
        slice_columns=[],
        scores=[],
        timings={},
    )
    (run / "manifest.json").write_text(manifest.model_dump_json())
    return run, study_budget


def test_budget_status_of_a_run_and_verdicts_use_the_frozen_copy(tmp_path):
    run, study_budget = _fake_run(tmp_path)
    assert not budget_status(run).changed
    study_budget.write_text(DEMO.read_text().replace("under 0.5 percent", "under 2 percent"))
    status = budget_status(run)
    assert status.changed and status.frozen_intact
    assert status.frozen_path == run / "frozen" / "budget.yaml"
    assert "+  - rule: JSON parse failures must stay under 2 percent" in status.diff
    frozen_rules = load_frozen_budget(run)
    assert frozen_rules.rules[0].bound == AbsoluteBound("<", 0.005)  # not the edited 2 percent
    assert frozen_rules.source == run / "frozen" / "budget.yaml"
    (run / "frozen" / "budget.yaml").write_text(study_budget.read_text())  # hand-edited copy
    tampered = budget_status(run)
    assert not tampered.frozen_intact and "edited by hand" in tampered.message
    with pytest.raises(CompkitError, match="edited by hand"):
        load_frozen_budget(run)


@pytest.mark.parametrize(
    ("n", "expected"), [(2, "inconclusive"), (90, "inconclusive"), (2000, "pass")]
)
def test_no_item_changed_is_not_proof_on_few_items(n, expected):
    # both models agree on every item: the paired bootstrap CI collapses to [0, 0]; the
    # zero-event bound z^2/(n+z^2) (0.66 at n=2, 0.041 at n=90, 0.0019 at n=2000) replaces it
    row = _row("accuracy", value=0.5, baseline_value=0.5, delta=0.0, ci_low=0.0, ci_high=0.0, n=n)
    out = _one("accuracy cannot drop by more than 1 point", row)
    assert out["verdict"] == expected
    z2 = 1.959963984540054**2
    assert out["ci_low"] == pytest.approx(-z2 / (n + z2), rel=1e-6)
