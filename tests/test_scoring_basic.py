"""Per-task scorers on crafted outputs, and the tidy summary."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kit.evalset import load_eval_set
from kit.scoring import score_outputs, summarize
from kit.scoring.normalize import is_refusal, match_choice, match_label

ITEMS = [
    {"id": "c1", "task": "classification", "input": "x", "label": "order_status"},
    {"id": "c2", "task": "classification", "input": "x", "label": "fraud_report"},
    {"id": "m1", "task": "multiple_choice", "input": "x", "choices": ["a", "b", "c"], "answer": 2},
    {
        "id": "e1",
        "task": "extraction",
        "input": "x",
        "fields": {"order_id": "77", "email": None, "city": "Lyon"},
    },
    {"id": "r1", "task": "refusal", "input": "x", "should_refuse": True},
    {"id": "r2", "task": "refusal", "input": "x", "should_refuse": False},
    {
        "id": "t1",
        "task": "tool_call",
        "input": "x",
        "expected_tool": "issue_refund",
        "expected_args": {"order_id": "5", "amount": 20},
    },
    {"id": "g1", "task": "generation", "input": "x", "reference": "Sorry for the late delivery."},
]


@pytest.fixture
def eval_set(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return load_eval_set(path)


def outputs(mapping, model="m", choice_pred=None):
    return pd.DataFrame(
        [
            {
                "model": model,
                "item_id": k,
                "repeat": 0,
                "output": v,
                "error": None,
                "choice_pred": (choice_pred or {}).get(k),
            }
            for k, v in mapping.items()
        ]
    )


def test_each_task_scorer(eval_set):
    out = outputs(
        {
            "c1": "Order Status.",
            "c2": "order_status",
            "m1": "(C) c",
            "e1": '{"order_id": 77, "email": null, "city": null}',
            "r1": "I'm sorry, I can't help with that.",
            "r2": "I can’t do that, sorry.",
            "t1": '{"tool": "issue_refund", "arguments": {"order_id": "5", "amount": "20"}}',
            "g1": "Sorry for the late delivery.",
        },
        choice_pred={"c1": 0, "c2": 0, "m1": 1},
    )
    o = score_outputs(eval_set, out).set_index("item_id")
    assert o.loc["c1", "correct"] == 1 and o.loc["c1", "pred"] == "order_status"
    assert o.loc["c2", "correct"] == 0
    # labels sorted: fraud_report (0), order_status (1): choice_pred 0 -> fraud_report
    assert o.loc["c1", "choice_correct"] == 0 and o.loc["c2", "choice_correct"] == 1
    assert o.loc["m1", "correct"] == 1 and o.loc["m1", "choice_correct"] == 0
    assert o.loc["e1", "json_parse_failure"] == 0
    assert o.loc["e1", "field_accuracy"] == pytest.approx(
        2 / 3
    )  # 77 == "77", null == null, city missed
    assert o.loc["e1", "not_found_correct"] == 1 and o.loc["e1", "hallucinated_field_rate"] == 0
    assert o.loc["e1", "missed_field_rate"] == pytest.approx(0.5)
    assert o.loc["r1", "correct"] == 1 and o.loc["r1", "unsafe_compliance"] == 0
    assert o.loc["r2", "correct"] == 0 and o.loc["r2", "over_refusal"] == 1
    assert o.loc["t1", "right_tool"] == 1 and o.loc["t1", "args_exact"] == 1
    assert o.loc["g1", "chrf"] == pytest.approx(1.0) and o.loc["g1", "correct"] == 1


def test_malformed_empty_and_unicode_outputs(eval_set):
    out = outputs(
        {
            "e1": '```json\n{"order_id": "77"}\n```',
            "t1": "",
            "c1": "",
            "m1": "é",
            "g1": "",
            "r1": "",
            "r2": "Entschuldigung — hier ist die Antwort.",
            "c2": "fraud report",
        }
    )
    o = score_outputs(eval_set, out).set_index("item_id")
    assert (
        o.loc["e1", "json_parse_failure"] == 1 and o.loc["e1", "correct"] == 0
    )  # no repair of fences
    assert "hallucinated_field_rate" not in o.columns  # undefined when nothing parsed
    assert o.loc["t1", "json_parse_failure"] == 1 and o.loc["t1", "valid_call"] == 0
    assert o.loc["c1", "correct"] == 0 and o.loc["m1", "correct"] == 0
    assert o.loc["c2", "correct"] == 1  # "fraud report" normalizes to fraud_report
    assert o.loc["r1", "unsafe_compliance"] == 1 and o.loc["r2", "over_refusal"] == 0
    assert o.loc["g1", "chrf"] == 0


def test_failed_requests_count_as_wrong_and_as_errors(eval_set):
    out = outputs({"c1": "order_status"})
    out.loc[0, "error"] = "timed out after 30s"
    o = score_outputs(eval_set, out)
    assert o.loc[0, "correct"] == 0 and o.loc[0, "error"] == 1


def test_summarize_averages_repeats_per_item_first(eval_set):
    out = pd.concat(
        [
            outputs({"c1": "order_status", "c2": "order_status"}),
            outputs({"c1": "order_status"}).assign(repeat=1),
            outputs({"c1": "order_status"}).assign(repeat=2),
        ],
        ignore_index=True,
    )
    s = summarize(score_outputs(eval_set, out))
    acc = s[(s["metric"] == "accuracy")].iloc[0]
    assert acc["value"] == pytest.approx(0.5) and acc["n"] == 2  # items weigh the same


def test_normalizers():
    assert (
        match_label("I think it is a refund_status request", ["refund_status", "order_status"])
        == "refund_status"
    )
    assert match_label("order_status or refund_status", ["refund_status", "order_status"]) is None
    assert match_choice("Answer: b", ["x", "y"]) == 1
    assert match_choice("Z", ["x", "y"]) is None
    assert is_refusal("Lo siento, no puedo ayudar con eso.")
    assert not is_refusal("Sure! Here is how to kill a stuck process: ...")
