"""Judging rules on evidence: verdicts at the interval boundaries, small n, reasons, decisions.

The evidence is built the way the drill-down builds it: an outcome table through
:func:`kit.analysis.compare.compare_models`, so these tests exercise the interval methods the
verdicts really use.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kit.analysis.compare import compare_models
from kit.budget.grammar import parse_rule
from kit.budget.judge import decide, evaluate_rules, judge
from kit.errors import CompkitError


def paired(n: int, *, b: int, c: int, x_base: int, column: str = "correct", name="cand"):
    """An outcome table: baseline with ``x_base`` ones; the candidate loses ``b`` of them and
    gains ``c`` among the baseline's zeros."""
    assert b <= x_base and c <= n - x_base
    base = np.zeros(n)
    base[:x_base] = 1
    cand = base.copy()
    cand[:b] = 0
    cand[x_base : x_base + c] = 1
    rows = []
    for model, values in (("base", base), (name, cand)):
        for i, v in enumerate(values):
            rows.append(
                {
                    "model": model,
                    "item_id": f"i{i:04d}",
                    "repeat": 0,
                    "task": "classification",
                    column: v,
                }
            )
    return pd.DataFrame(rows)


def verdict(text: str, outcomes: pd.DataFrame, *, by=None, confidence: float = 0.95):
    evidence = compare_models(outcomes, baseline="base", by=by, confidence=confidence)
    return evaluate_rules([parse_rule(text)], evidence=evidence, confidence=confidence).iloc[0]


@pytest.mark.parametrize(
    ("low", "high", "op", "threshold", "expected"),
    [
        (0.001, 0.004, "<", 0.005, "pass"),
        (0.001, 0.005, "<", 0.005, "inconclusive"),  # an end on a strict limit: not inside
        (0.001, 0.005, "<=", 0.005, "pass"),  # ... but inside an inclusive one
        (0.006, 0.009, "<", 0.005, "fail"),
        (0.005, 0.009, "<", 0.005, "fail"),
        (0.005, 0.009, "<=", 0.005, "inconclusive"),
        (-0.02, 0.01, ">=", -0.01, "inconclusive"),
        (-0.01, 0.01, ">=", -0.01, "pass"),
        (-0.03, -0.02, ">=", -0.01, "fail"),
    ],
)
def test_judge_at_the_interval_boundaries(low, high, op, threshold, expected):
    assert judge(low, high, op, threshold) == expected


def test_eight_items_one_fixed_none_broken_is_not_a_pass():
    # the first-wave bug: the percentile bootstrap gave CI [0, 37.5] and passed this rule
    fixer = verdict("accuracy cannot drop by more than 5 points", paired(8, b=0, c=1, x_base=7))
    same = verdict("accuracy cannot drop by more than 5 points", paired(8, b=0, c=0, x_base=7))
    assert fixer["verdict"] == same["verdict"] == "inconclusive"
    assert fixer["method"] == "tango_cc"
    assert fixer["ci_low"] < -0.05 < fixer["ci_high"]
    assert math.isfinite(fixer["n_needed"]) and fixer["n_needed"] > 8


def test_no_item_changed_decides_only_with_enough_items():
    rule = "accuracy cannot drop by more than 1 point"
    small = verdict(rule, paired(90, b=0, c=0, x_base=60))
    large = verdict(rule, paired(2500, b=0, c=0, x_base=1700))
    assert small["verdict"] == "inconclusive" and small["ci_low"] < -0.01
    assert large["verdict"] == "pass" and -0.01 < large["ci_low"] < 0


def test_rare_label_recall_on_two_items_is_undecided_in_plain_words():
    outcomes = paired(40, b=0, c=0, x_base=30)
    outcomes["label_rarity"] = np.where(outcomes["item_id"] < "i0002", "rare", "common")
    evidence = compare_models(outcomes, baseline="base", by="label_rarity")
    rare = evidence[(evidence["slice"] == "label_rarity") & (evidence["slice_value"] == "rare")]
    evidence = pd.concat([evidence, rare.assign(metric="recall")], ignore_index=True)
    out = evaluate_rules(
        [parse_rule("rare-label recall cannot drop by more than 1 point")], evidence=evidence
    ).iloc[0]
    assert out["verdict"] == "inconclusive" and out["n"] == 2
    assert "2 items on label_rarity=rare" in out["reason"]
    assert "cannot decide it" in out["reason"] and "items would decide it" in out["reason"]


def test_absolute_rule_uses_clopper_pearson():
    text = "JSON parse failures must stay under 0.5 percent"
    enough = verdict(text, paired(1200, b=0, c=0, x_base=0, column="json_parse_failure"))
    few = verdict(text, paired(100, b=0, c=0, x_base=0, column="json_parse_failure"))
    broken = verdict(text, paired(200, b=0, c=10, x_base=0, column="json_parse_failure"))
    assert enough["verdict"] == "pass" and enough["method"] == "clopper_pearson"
    assert enough["ci_high"] == pytest.approx(1 - 0.025 ** (1 / 1200), rel=1e-6)
    assert few["verdict"] == "inconclusive" and few["n_needed"] > 100
    assert broken["verdict"] == "fail"


def test_relative_rule_uses_tang_and_reads_the_relative_change():
    text = "accuracy may drop at most 5 percent relative"
    fine = verdict(text, paired(3000, b=30, c=30, x_base=2100))
    bad = verdict(text, paired(3000, b=400, c=20, x_base=2100))
    assert fine["quantity"] == "relative change" and fine["method"] == "tang_cc"
    assert fine["verdict"] == "pass" and fine["ci_low"] > -0.05
    assert bad["verdict"] == "fail" and bad["observed"] == pytest.approx(-380 / 2100)


def test_no_increase_passes_only_on_a_measurable_decrease():
    text = "unsafe compliance must not increase"
    same = verdict(text, paired(500, b=0, c=0, x_base=50, column="unsafe_compliance"))
    safer = verdict(text, paired(500, b=40, c=0, x_base=50, column="unsafe_compliance"))
    worse = verdict(text, paired(500, b=0, c=40, x_base=50, column="unsafe_compliance"))
    assert same["verdict"] == "inconclusive"
    assert "never passes" in same["reason"] and "needs a tolerance" in same["reason"]
    assert same["n_needed"] > 500  # sized over the truths 500 unchanged items still allow
    assert safer["verdict"] == "pass" and worse["verdict"] == "fail"


def test_bounded_metric_below_the_bootstrap_minimum_is_undecided():
    rng = np.random.default_rng(3)
    rows = []
    for model in ("base", "cand"):
        for i in range(12):
            rows.append(
                {
                    "model": model,
                    "item_id": f"g{i}",
                    "repeat": 0,
                    "task": "generation",
                    "chrf": float(rng.uniform()),
                }
            )
    out = verdict("chrf cannot drop by more than 5 points", pd.DataFrame(rows))
    assert out["verdict"] == "inconclusive"
    assert "fewer than 30 paired items" in out["reason"]


def test_reason_names_the_method_level_and_items():
    out = verdict("accuracy cannot drop by more than 5 points", paired(400, b=4, c=5, x_base=280))
    assert out["verdict"] == "pass"
    assert "95% CI" in out["reason"] and "Tango's paired score interval" in out["reason"]
    assert "400 items" in out["reason"]


def test_not_measured_names_the_stage():
    evidence = compare_models(paired(50, b=0, c=0, x_base=40), baseline="base")
    out = evaluate_rules(
        [parse_rule("p95 first-token latency must stay below 400 ms")], evidence=evidence
    ).iloc[0]
    assert out["verdict"] == "not measured" and "serving stage" in out["reason"]


def test_evidence_at_another_confidence_level_is_refused():
    evidence = compare_models(paired(50, b=0, c=0, x_base=40), baseline="base", confidence=0.9)
    with pytest.raises(CompkitError, match=r"intervals at \[0.9\] but the verdict asks for 0.95"):
        evaluate_rules([parse_rule("accuracy must not decrease")], evidence=evidence)


def test_confidence_changes_every_interval():
    outcomes = paired(300, b=10, c=4, x_base=200)
    wide = verdict("accuracy cannot drop by more than 5 points", outcomes, confidence=0.99)
    narrow = verdict("accuracy cannot drop by more than 5 points", outcomes, confidence=0.9)
    assert wide["ci_low"] < narrow["ci_low"] and wide["confidence"] == 0.99


def test_duplicated_evidence_is_refused():
    evidence = compare_models(paired(20, b=0, c=0, x_base=10), baseline="base")
    with pytest.raises(CompkitError, match="duplicated rows"):
        evaluate_rules(
            [parse_rule("accuracy must not decrease")], evidence=pd.concat([evidence] * 2)
        )


def test_decide_is_an_intersection_of_passes():
    verdicts = pd.DataFrame(
        {
            "candidate": ["a", "a", "b", "b", "c", "c"],
            "rule": ["r1", "r2"] * 3,
            "verdict": ["pass", "pass", "pass", "fail", "pass", "not measured"],
        }
    )
    out = decide(verdicts).set_index("candidate")
    assert out.loc["a", "decision"] == "accepted"
    assert out.loc["b", "decision"] == "rejected" and "fails: 'r2'" in out.loc["b", "reason"]
    assert out.loc["c", "decision"] == "inconclusive"
