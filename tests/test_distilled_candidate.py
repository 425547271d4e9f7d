"""A distilled candidate (another model: its own tokenizer and chat template) goes through
stages 1-4 like a compressed one; structured output constrains its JSON with its own
tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kit.run import Run
from kit.stages.calibration import write_calibration_tables
from kit.stages.candidates import candidate_summary, run_candidates
from kit.stages.drilldown import write_drilldown_tables
from kit.stages.freeze import freeze_baseline

STUDENT_CHAT_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] | capitalize }}:\n"
    "{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

ITEMS = [
    {"id": f"c{i}", "task": "classification", "input": text, "label": label}
    for i, (text, label) in enumerate(
        [
            ("book a table for two", "book a table"),
            ("is it raining in Paris", "weather"),
            ("table for four tonight", "book a table"),
            ("how cold is it today", "weather"),
            ("someone used my card", "report fraud"),
        ]
    )
] + [
    {
        "id": f"e{i}",
        "task": "extraction",
        "input": text,
        "fields": fields,
    }
    for i, (text, fields) in enumerate(
        [
            ("table for 2 at 7pm", {"people": "2", "time": "7pm"}),
            ("I am Ann", {"people": None, "time": None}),
            ("5 of us", {"people": "5", "time": None}),
        ]
    )
]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A tiny Llama with its own byte-level BPE (another vocabulary, other special tokens)
    and a '### Role:' chat template: nothing is shared with the baseline's tokenizer."""
    from conftest import save_tiny_llama
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("student")
    corpus = [it["input"] for it in ITEMS] + ["### User: hello ### Assistant: hi there"] * 3
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus * 4, vocab_size=320, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = STUDENT_CHAT_TEMPLATE
    return save_tiny_llama(folder, tok, layers=1, hidden=32, seed=1)


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, tiny_model_dir, student_dir) -> Path:
    d = tmp_path_factory.mktemp("distilled-study")
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (d / "prompt.jinja").write_text(
        "{% if labels %}Intents: {{ labels | join(', ') }}. {% endif %}"
        "{% if fields %}JSON with {{ fields | join(', ') }}: {% endif %}{{ input }}"
    )
    study = {
        "name": "distilled",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 48, "seed": 3},
        "tasks": {
            "classification": {"answer": "choice"},
            "extraction": {"structured_output": "json_schema"},
        },
        "baseline": {"name": "teacher", "runtime": "transformers", "model": str(tiny_model_dir)},
        "candidates": [
            {
                "name": "student",
                "kind": "distilled",
                "runtime": "transformers",
                "model": str(student_dir),
                "batch_size": 4,
            },
            {
                "name": "student-free",
                "kind": "distilled",
                "runtime": "transformers",
                "model": str(student_dir),
                "structured_output": False,
                "batch_size": 4,
            },
        ],
    }
    (d / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    out = d / "runs" / "r"
    freeze_baseline(d / "study.yaml", out, progress=False)
    run_candidates(out, progress=False)
    return out


def test_stages_1_to_4_accept_a_model_with_its_own_tokenizer(distilled_run, student_dir):
    from transformers import AutoTokenizer

    base_vocab = AutoTokenizer.from_pretrained(Run.open(distilled_run).study.baseline.model)
    assert len(AutoTokenizer.from_pretrained(student_dir)) != len(base_vocab)
    summary = candidate_summary(distilled_run).set_index("candidate")
    assert summary.loc["student", "kind"] == "distilled"
    assert summary.loc["student", "errors"] == 0
    outcomes = Run.open(distilled_run).outcomes()
    assert set(outcomes["model"]) == {"teacher", "student", "student-free"}
    # the student's choices were scored over its own tokens: every classification row has one
    cls = outcomes[outcomes["task"] == "classification"]
    assert cls["choice_correct"].notna().all()
    assert (cls["correct"] == cls["choice_correct"]).all()  # answer: choice
    drill = write_drilldown_tables(distilled_run, n_resamples=200, min_n=1)
    assert drill is not None
    calib = write_calibration_tables(distilled_run, n_resamples=200)
    assert calib is not None
    assert (distilled_run / "tables" / "drilldown.json").exists()


def test_structured_output_constrains_the_student_and_free_decoding_is_measured(distilled_run):
    outcomes = Run.open(distilled_run).outcomes()
    ext = outcomes[outcomes["task"] == "extraction"].groupby("model")["json_parse_failure"].mean()
    # a random tiny model never writes JSON unaided; the trained teacher under its schema
    # always does; the random student under its schema fails only where it ran out of tokens
    # inside a string (finish_reason "length"), never with text the schema forbids
    assert ext["student-free"] == 1.0
    assert ext["teacher"] == 0.0
    outputs = Run.open(distilled_run).outputs().set_index(["model", "item_id"])
    student = outcomes[(outcomes["model"] == "student") & (outcomes["task"] == "extraction")]
    for item_id, failed in zip(student["item_id"], student["json_parse_failure"], strict=True):
        row = outputs.loc[("student", item_id)]
        assert row["output"].startswith("{")
        assert bool(failed) == (row["finish_reason"] == "length")


def test_memo_lists_parse_failures_with_and_without_structured_output(distilled_run):
    from kit.report.memo import structured_output_rows

    rows = {r["model"]: r for r in structured_output_rows(Run.open(distilled_run))}
    assert rows["student"]["structured"] == "json_schema"
    assert rows["student-free"]["structured"] == "free decoding"
    assert rows["student-free"]["failures"].startswith("100")
