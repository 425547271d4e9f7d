"""Budget rules: the grammar, the registry it reads, file errors and impossible limits."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd
import pytest

from kit.budget import grammar as B
from kit.budget.grammar import AbsoluteBound, ChangeBound, SliceRef, load_budget, parse_rule
from kit.errors import CompkitError
from kit.metrics import METRICS

DEMO = Path(__file__).resolve().parents[1] / "data" / "support" / "budget.yaml"
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
    ("tokens per second must stay above 20", "output_tokens_per_s", None, AbsoluteBound(">", 20.0)),
    ("cost per request below $0.50", "cost_per_request_usd", None, AbsoluteBound("<", 0.5)),
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
        "  - rule: macro F1 stays within budget\n"
        "    id: macro\n"
        "    metric: macro_f1\n"
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
        "macro",
        "macro_f1",
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
    with pytest.raises(
        CompkitError,
        match="unknown metric 'acuracy' \\(did you mean 'accuracy'\\?\\); valid metrics: accuracy",
    ):
        load_budget(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("flip rate must stay under 150 percent", r"flip_rate lies between 0% and 100%"),
        ("accuracy cannot drop by more than 150 points", r"a change of 150 points is impossible"),
        ("accuracy may drop at most 120 percent relative", r"below -100% is impossible"),
        ("p95 first-token latency must stay below 0.5 percent", r"measured in ms"),
    ],
)
def test_impossible_limits_are_refused_naming_the_rule(text, message):
    with pytest.raises(CompkitError, match=message):
        parse_rule(text)


def test_negative_limits_in_the_structured_form_are_refused(tmp_path):
    path = tmp_path / "budget.yaml"
    path.write_text(
        "rules:\n  - rule: negative flips\n    metric: flip_rate\n    bound: {op: '<', value: -0.05}\n"
    )
    with pytest.raises(CompkitError, match=r'rule 1 "negative flips": .*can never be reached'):
        load_budget(path)


def test_impossible_limit_in_a_file_names_file_and_rule(tmp_path):
    path = tmp_path / "budget.yaml"
    path.write_text("rules:\n  - rule: flip rate must stay under 150 percent\n")
    with pytest.raises(
        CompkitError, match=r'rule 1 "flip rate must stay under 150 percent": flip_rate'
    ):
        load_budget(path)


@pytest.mark.parametrize(
    ("text", "metric", "slice_", "bound"),
    [
        ("p95 first-token latency must stay below 400 ms", "ttft_p95_ms", None,
         AbsoluteBound("<", 400.0)),
        ("throughput must be at least 2x the baseline", "throughput_rps", None,
         ChangeBound("relative", ">=", 1.0)),
        ("peak memory must stay under 1.5 GB", "peak_memory_mb", None, AbsoluteBound("<", 1536.0)),
        ("cost per 1,000 correct answers must drop by at least 30 percent",
         "cost_per_1k_correct_usd", None, ChangeBound("relative", "<=", -0.3)),
        ("error rate under load below 1 percent", "error_rate_under_load", None,
         AbsoluteBound("<", 0.01)),
        ("p99 end-to-end latency at 4 concurrent users below 3 s", "e2e_p99_ms",
         SliceRef("concurrency", "4"), AbsoluteBound("<", 3000.0)),
        ("goodput must not drop", "goodput_rps", None, ChangeBound("no_decrease", ">=", 0.0)),
        ("batch flip rate below 2 percent", "batch_flip_rate", None, AbsoluteBound("<", 0.02)),
        ("median time per output token at 2 requests per second must stay under 80 ms",
         "tpot_p50_ms", SliceRef("rate", "2"), AbsoluteBound("<", 80.0)),
        ("accuracy must rise by at least 2 points", "accuracy", None,
         ChangeBound("points", ">=", 0.02)),
    ],
)  # fmt: skip
def test_serving_sentences_parse(text, metric, slice_, bound):
    rule = parse_rule(text)
    assert (rule.metric, rule.slice) == (metric, slice_)
    assert _same_bound(rule.bound, bound), rule.bound


def test_load_slices_are_known_before_any_serving_run():
    """A frozen budget may name a load condition: the serving settings define its values."""
    frame = pd.DataFrame({"id": ["a", "b"], "task": ["classification", "classification"]})
    rule = parse_rule("p95 TTFT must stay under 800 ms for profile=sweep", slices=frame)
    assert (rule.slice.column, rule.slice.value) == ("profile", "sweep")


# --------------------------------------------------------------------------- perturbations

SUITE_VOCAB = {"task": ("classification", "extraction"), "perturbation": ("typos", "upper_case")}
TYPOS = SliceRef("perturbation", "typos")

PERTURBATION_RULES = [
    # the gap: the candidate's shift minus the baseline's
    (
        "accuracy under typos may drop at most 3 points more than the baseline's",
        "accuracy_shift",
        TYPOS,
        ChangeBound("points", ">=", -0.03),
    ),
    (
        "Accuracy under typos cannot drop by more than 3 points more than the baseline.",
        "accuracy_shift",
        TYPOS,
        ChangeBound("points", ">=", -0.03),
    ),
    (
        "JSON parse failures under upper case may rise by at most 2 points more than the "
        "baseline's",
        "json_parse_failure_shift",
        SliceRef("perturbation", "upper_case"),
        ChangeBound("points", "<=", 0.02),
    ),
    (
        "accuracy with typos must not drop more than the baseline's",
        "accuracy_shift",
        TYPOS,
        ChangeBound("no_decrease", ">=", 0.0),
    ),
    (
        "accuracy under perturbations may drop at most 4 points more than the baseline's",
        "accuracy_shift",
        None,
        ChangeBound("points", ">=", -0.04),
    ),
    # the candidate's own shift (no "than the baseline")
    (
        "accuracy under typos may drop at most 5 points",
        "accuracy_shift",
        TYPOS,
        AbsoluteBound(">=", -0.05),
    ),
    (
        "accuracy for perturbation=typos cannot drop by more than 5 points",
        "accuracy_shift",
        TYPOS,
        AbsoluteBound(">=", -0.05),
    ),
    (
        "unsafe compliance under any perturbation must not increase",
        "unsafe_compliance_shift",
        None,
        AbsoluteBound("<=", 0.0),
    ),
    # robustness-stage metrics keep their own meaning
    (
        "perturbation flip rate under typos must stay below 10 percent",
        "perturbation_flip_rate",
        TYPOS,
        AbsoluteBound("<", 0.10),
    ),
    ("mean token KL must stay below 0.05 nats", "mean_token_kl", None, AbsoluteBound("<", 0.05)),
    ("KLD must not exceed 0.1 nats", "mean_token_kl", None, AbsoluteBound("<=", 0.1)),
    (
        "same top token rate must be at least 95 percent",
        "same_top_token_rate",
        None,
        AbsoluteBound(">=", 0.95),
    ),
    (
        "NaN logits must stay under 0.1 percent",
        "nonfinite_logit_rate",
        None,
        AbsoluteBound("<", 0.001),
    ),
    (
        "truncated answers must not increase",
        "truncation_rate",
        None,
        ChangeBound("no_increase", "<=", 0.0),
    ),
    (
        "degenerate repetition may rise by at most 1 point",
        "repetition_rate",
        None,
        ChangeBound("points", "<=", 0.01),
    ),
]


@pytest.mark.parametrize(("text", "metric", "slice_", "bound"), PERTURBATION_RULES)
def test_perturbation_and_distribution_rules(text, metric, slice_, bound):
    rule = parse_rule(text, slices=SUITE_VOCAB)
    assert (rule.metric, rule.slice) == (metric, slice_), text
    assert _same_bound(rule.bound, bound), (text, rule.bound)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("accuracy under typos must stay above 80 percent", "a level of accuracy under a"),
        ("accuracy under typos may drop at most 2 percent relative", "relative change under"),
        (
            "accuracy under typos may drop at most 2 percent relative more than the baseline's",
            "bounded in points",
        ),
        ("chrf under typos may drop at most 3 points", "chrf is not measured under"),
        ("extraction accuracy under typos may drop at most 3 points", "a rule names one slice"),
    ],
)
def test_perturbation_rules_that_cannot_be_judged_are_refused(text, message):
    with pytest.raises(CompkitError, match=message):
        parse_rule(text, slices=SUITE_VOCAB)


def test_under_is_still_a_comparator_without_a_perturbation_name():
    rule = parse_rule("JSON parse failures must stay under 0.5 percent", slices=SUITE_VOCAB)
    assert rule.metric == "json_parse_failure" and rule.slice is None
    # a study without a suite: "under typos" is no slice it knows
    with pytest.raises(CompkitError):
        parse_rule("accuracy under typos may drop at most 3 points", slices={"task": ("x",)})


def test_the_booking_demo_budget_parses_as_written():
    demo = DEMO.parents[1] / "demo" / "budget.yaml"
    budget = load_budget(demo)
    assert [(r.metric, r.slice) for r in budget] == [
        ("accuracy", None),
        ("json_parse_failure", None),
        ("ttft_p90_ms", None),
    ]
    assert all(r.why and r.text in demo.read_text() for r in budget)
    # the rare-label rule a real sign-off adds (commented out: 14 items cannot decide it)
    assert parse_rule("rare-label recall cannot drop by more than 10 points").slice == SliceRef(
        "label_rarity", "rare"
    )
