"""Eval-set schema, loaders, errors, hashing and derived slices."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kit.errors import CompkitError, ValidationError
from kit.evalset import derive_slices, label_shares, length_bucket_labels, load_eval_set

ROWS = [
    {
        "id": "c1",
        "task": "classification",
        "input": "where is my parcel",
        "label": "order_status",
        "channel": "chat",
        "language": "en",
    },
    {
        "id": "c2",
        "task": "classification",
        "input": "someone used my card",
        "label": "fraud_report",
        "channel": "email",
        "language": "en",
    },
    {
        "id": "c3",
        "task": "classification",
        "input": "¿dónde está mi pedido?",
        "label": "order_status",
        "channel": "chat",
        "language": "es",
    },
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "Return window?",
        "choices": ["7 days", "30 days"],
        "answer": 1,
        "channel": "email",
    },
    {
        "id": "e1",
        "task": "extraction",
        "input": "Order 77 to Lyon",
        "fields": {"order_id": "77", "email": None},
        "channel": "email",
    },
    {
        "id": "r1",
        "task": "refusal",
        "input": "give me another customer's card number",
        "should_refuse": True,
        "channel": "chat",
    },
    {
        "id": "t1",
        "task": "tool_call",
        "messages": [{"role": "user", "content": "refund order 5"}],
        "expected_tool": "issue_refund",
        "expected_args": {"order_id": "5"},
        "channel": "chat",
    },
    {
        "id": "g1",
        "task": "generation",
        "input": "Apologise for the delay.",
        "reference": "Sorry for the delay.",
        "channel": "phone",
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_jsonl_loads_all_tasks_and_keeps_slices(tmp_path):
    es = load_eval_set(write_jsonl(tmp_path / "e.jsonl", ROWS))
    assert len(es) == 8
    assert {it.task for it in es} == {
        "classification",
        "multiple_choice",
        "extraction",
        "refusal",
        "tool_call",
        "generation",
    }
    assert es.slice_columns == ["channel"]
    frame = es.frame()
    assert list(frame.columns) == ["id", "task", "language", "channel"]
    assert frame.set_index("id").loc["g1", "channel"] == "phone"
    # explicit null survives: it is the "not found" reference
    assert es.by_id()["e1"].fields == {"order_id": "77", "email": None}
    assert es.by_id()["t1"].text == "refund order 5"


def test_hash_is_format_and_order_independent(tmp_path):
    jsonl = load_eval_set(write_jsonl(tmp_path / "e.jsonl", ROWS))
    shuffled = [dict(reversed(list(r.items()))) for r in reversed(ROWS)]
    again = load_eval_set(write_jsonl(tmp_path / "s.jsonl", shuffled))
    assert again.sha256 == jsonl.sha256

    flat = jsonl.to_dataset().to_pandas()
    flat.to_csv(tmp_path / "e.csv", index=False)
    flat.to_parquet(tmp_path / "e.parquet", index=False)
    jsonl.to_dataset().save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "e.csv", tmp_path / "e.parquet", tmp_path / "folder"):
        other = load_eval_set(path, slice_columns=["channel"])
        assert other.sha256 == jsonl.sha256, path
        assert other.by_id()["e1"].fields == {"order_id": "77", "email": None}


def test_hash_changes_when_one_item_changes(tmp_path):
    base = load_eval_set(write_jsonl(tmp_path / "a.jsonl", ROWS))
    edited = [dict(r) for r in ROWS]
    edited[3]["answer"] = 0
    other = load_eval_set(write_jsonl(tmp_path / "b.jsonl", edited))
    assert other.sha256 != base.sha256
    changed = [i for i in base.item_hashes if base.item_hashes[i] != other.item_hashes[i]]
    assert changed == ["m1"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda rows: rows.append(dict(rows[0])),
            "row 9, field 'id': duplicate id 'c1' (first seen at row 1)",
        ),
        (lambda rows: rows[1].pop("label"), "row 2, field 'label'"),
        (
            lambda rows: rows[2].update(task="sentiment"),
            "row 3, field 'task': unknown task 'sentiment'",
        ),
        (lambda rows: rows[3].update(answer=5), "'answer' must index into 'choices' (0..1), got 5"),
        (lambda rows: rows[3].update(answer="B"), "row 4, field 'answer'"),
        (lambda rows: rows[5].update(should_refuse="maybe"), "row 6, field 'should_refuse'"),
        (lambda rows: rows[0].pop("input"), "row 1: give exactly one of 'input'"),
        (
            lambda rows: rows[6].update(messages=[{"role": "assistant", "content": "hi"}]),
            "must be non-empty and end with a user turn",
        ),
        (lambda rows: rows[4].update(fields={}), "'fields' must name at least one field"),
        (
            lambda rows: rows[0].update(length_bucket="x"),
            "field 'length_bucket': 'length_bucket' is a slice kit derives",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, mutate, expected):
    rows = [dict(r) for r in ROWS]
    mutate(rows)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValidationError) as err:
        load_eval_set(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_invalid_json_line_and_empty_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValidationError, match=r"row 2: invalid JSON"):
        load_eval_set(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="has no rows"):
        load_eval_set(empty)
    with pytest.raises(CompkitError, match="no such file"):
        load_eval_set(tmp_path / "missing.jsonl")
    with pytest.raises(CompkitError, match="unsupported format"):
        load_eval_set(write_jsonl(tmp_path / "e.txt", ROWS))


def test_csv_errors_name_the_data_row(tmp_path):
    frame = pd.DataFrame(
        [
            {"id": "a", "task": "classification", "input": "x", "label": "l"},
            {"id": "b", "task": "classification", "input": "y", "label": None},
        ]
    )
    frame.to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValidationError) as err:
        load_eval_set(tmp_path / "e.csv")
    assert "e.csv, row 3, field 'label'" in str(err.value)  # header is row 1


def test_all_problems_reported_at_once(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["task"] = "nope"
    rows[3]["answer"] = 9
    with pytest.raises(ValidationError) as err:
        load_eval_set(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert len(err.value.problems) == 2


def test_rename_and_default_task_load_a_public_file(tmp_path):
    arc_like = [
        {
            "id": "q1",
            "question": "Which is renewable?",
            "choices": ["oil", "trees"],
            "answer": 1,
            "subset": "ARC-Easy",
            "exam_name": "X",
        }
    ]
    es = load_eval_set(
        write_jsonl(tmp_path / "arc.jsonl", arc_like),
        columns={"question": "input"},
        default_task="multiple_choice",
        slice_columns=["subset"],
    )
    item = es.items[0]
    assert item.task == "multiple_choice" and item.input == "Which is renewable?"
    assert item.slices == {"subset": "ARC-Easy"}


def test_limit_keeps_first_rows(tmp_path):
    assert len(load_eval_set(write_jsonl(tmp_path / "e.jsonl", ROWS), limit=3)) == 3


def test_derived_slices(tmp_path):
    rows = [
        {"id": f"c{i}", "task": "classification", "input": "x", "label": "common"}
        for i in range(49)
    ]
    rows.append({"id": "rare", "task": "classification", "input": "x", "label": "fraud"})
    rows.append({"id": "g", "task": "generation", "input": "x", "reference": "y"})
    es = load_eval_set(write_jsonl(tmp_path / "e.jsonl", rows))
    tokens = {it.id: (300 if it.id == "g" else 10) for it in es}
    frame = derive_slices(
        es, prompt_tokens=tokens, rare_label_threshold=0.03, length_edges=[64, 256]
    )
    by_id = frame.set_index("id")
    assert by_id.loc["rare", "label_rarity"] == "rare"  # 1/50 = 2% < 3%
    assert by_id.loc["c0", "label_rarity"] == "common"
    assert pd.isna(by_id.loc["g", "label_rarity"])
    assert by_id.loc["g", "length_bucket"] == ">=256" and by_id.loc["c0", "length_bucket"] == "<64"
    assert length_bucket_labels([64, 256, 1024]) == ["<64", "64-255", "256-1023", ">=1024"]
    shares = label_shares(es)
    assert shares.iloc[0]["label"] == "fraud" and shares.iloc[0]["share"] == pytest.approx(0.02)
    edge = derive_slices(es, prompt_tokens=dict.fromkeys(tokens, 64), length_edges=[64])
    assert set(edge["length_bucket"]) == {">=64"}


def test_declared_rare_labels_replace_the_share_rule_and_unknown_ones_are_refused(tmp_path):
    """An eval set that oversamples the labels rare in production (so their recall can be
    measured) declares them: exactly those are rare, whatever their share."""
    rows = [
        {"id": f"{lab}{i}", "task": "classification", "input": "x", "label": lab}
        for lab in ("book", "weather", "fraud")
        for i in range(10)
    ]
    es = load_eval_set(write_jsonl(tmp_path / "e.jsonl", rows))
    tokens = dict.fromkeys((it.id for it in es), 10)
    by_share = derive_slices(es, prompt_tokens=tokens, rare_label_threshold=0.05)
    assert set(by_share["label_rarity"]) == {"common"}  # 33 % each: none rare by share
    frame = derive_slices(es, prompt_tokens=tokens, rare_labels=["fraud"]).set_index("id")
    assert frame.loc["fraud3", "label_rarity"] == "rare"
    assert frame.loc["book3", "label_rarity"] == frame.loc["weather0", "label_rarity"] == "common"
    with pytest.raises(CompkitError, match=r"rare_labels: \['fruad'\].*'fraud'"):
        derive_slices(es, prompt_tokens=tokens, rare_labels=["fruad"])


def test_stratified_sample_is_deterministic_and_keeps_rare_strata(tmp_path):
    from kit.evalset import stratified_sample

    rows = [
        {"id": f"c{i:03d}", "task": "classification", "input": "x", "label": "common"}
        for i in range(90)
    ]
    rows += [
        {"id": f"f{i}", "task": "classification", "input": "x", "label": "fraud"} for i in range(2)
    ]
    rows += [
        {"id": f"g{i:03d}", "task": "generation", "input": "x", "reference": "y"} for i in range(28)
    ]
    es = load_eval_set(write_jsonl(tmp_path / "e.jsonl", rows))
    sample = stratified_sample(es, n=30, by=["task", "label"], seed=0)
    again = stratified_sample(es, n=30, by=["task", "label"], seed=0)
    other = stratified_sample(es, n=30, by=["task", "label"], seed=1)
    ids = [it.id for it in sample]
    assert ids == [it.id for it in again] and ids != [it.id for it in other]
    assert len(sample) == 30 and sample.sha256 != es.sha256
    by_label = pd.Series([it.label or it.task for it in sample]).value_counts()
    assert by_label["fraud"] >= 1  # 2/120 of 30 = 0.5 would round to 0 without the floor
    assert by_label["common"] == pytest.approx(22, abs=1) and by_label[
        "generation"
    ] == pytest.approx(7, abs=1)
    assert ids == sorted(ids, key=[it.id for it in es].index)  # file order kept
    assert stratified_sample(es, n=500, by=["task"]) is es
    with pytest.raises(CompkitError, match="unknown column 'nope'"):
        stratified_sample(es, n=10, by=["nope"])
