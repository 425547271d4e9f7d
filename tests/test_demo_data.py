"""The demo eval set: real public rows copied into data/demo/sources, converted reproducibly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kit.evalset import load_eval_set
from kit.study import load_study

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SCRIPT = ROOT / "scripts" / "make_demo_data.py"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_committed_eval_set_equals_a_fresh_conversion(tmp_path):
    out = tmp_path / "demo_eval.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, timeout=60)
    assert out.read_bytes() == (DEMO / "demo_eval.jsonl").read_bytes(), (
        "data/demo/demo_eval.jsonl differs from a fresh conversion: run "
        "python scripts/make_demo_data.py instead of editing it"
    )


def test_every_source_ships_its_provenance_and_licence():
    for name, licence in (("clinc150", "CC BY 3.0"), ("restaurant8k", "CC BY 4.0")):
        source = (DEMO / "sources" / name / "SOURCE.md").read_text(encoding="utf-8")
        assert licence in source and "commit" in source


def test_fewshot_rows_never_enter_the_eval_set_and_rare_intents_are_declared():
    eval_ids = {r["id"] for r in _rows(DEMO / "demo_eval.jsonl")}
    for name in ("clinc150/clinc150_demo.jsonl", "restaurant8k/restaurant8k_demo.jsonl"):
        rows = _rows(DEMO / "sources" / name)
        fewshot = {r["id"] for r in rows if r["role"] == "fewshot"}
        assert fewshot and not fewshot & eval_ids, name
        assert {r["id"] for r in rows if r["role"] == "eval"} <= eval_ids, name
    study = load_study(DEMO / "study.yaml")
    es = load_eval_set(
        study.resolve(study.eval_set.path), slice_columns=study.eval_set.slice_columns
    )
    assert set(study.eval_set.rare_labels) == {"cancel a booking", "report fraud"}
    cls = [it for it in es.items if it.task == "classification"]
    per_label = {lab: sum(it.label == lab for it in cls) for lab in es.all_labels}
    assert set(per_label.values()) == {7}  # rare ones oversampled: recall on 14 items, not 2
    slots = {k for it in es.items if it.task == "extraction" for k in it.fields}
    assert slots == {"date", "time"}


def test_demo_study_asks_for_structured_output_and_labels_the_runtime_change():
    study = load_study(DEMO / "study.yaml")
    assert study.task("extraction").structured_output == "json_schema"
    assert study.task("classification").answer == "choice"
    kinds = {c.name: c.kind for c in study.candidates}
    assert kinds["smollm2-q4_1-gguf"] == "runtime_change"
    # every other candidate is a real compression of the baseline's weights
    assert all(c.recipe is not None for c in study.candidates if c.kind == "compressed")


def test_the_prompt_shows_exactly_the_reserved_fewshot_rows():
    template = (DEMO / "prompts" / "demo.jinja").read_text(encoding="utf-8")
    clinc = _rows(DEMO / "sources" / "clinc150" / "clinc150_demo.jsonl")
    for row in clinc:
        shown = f"Message: {row['text']}\n" in template
        assert shown == (row["role"] == "fewshot"), row["id"]
    for row in _rows(DEMO / "sources" / "restaurant8k" / "restaurant8k_demo.jsonl"):
        asked = sorted(row["requested_slots"])
        example = (
            f"asked the customer for: {', '.join(asked)}.\nCustomer: {json.dumps(row['text'])}\n"
            "JSON with the customer's exact words for each detail (null if not given):\n"
            + json.dumps({k: row["fields"][k] for k in asked})
        )
        assert (example in template) == (row["role"] == "fewshot"), row["id"]
