"""The demo and ARC data shipped in data/: generated reproducibly, valid, and usable."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kit.evalset import EvalSet, label_shares, load_eval_set
from kit.prompts import PromptBuilder
from kit.study import load_study

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_support_data.py"
DEMO = ROOT / "data" / "support"
DATA = DEMO / "support_eval.jsonl"
ARC = ROOT / "data" / "arc"

TASK_RANGES = {
    "classification": (110, 130),
    "multiple_choice": (40, 50),
    "extraction": (45, 55),
    "refusal": (35, 45),
    "tool_call": (35, 45),
    "generation": (20, 30),
}


def generate(out: Path, seed: int | None = None) -> bytes:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--quiet"]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return (out / "support_eval.jsonl").read_bytes()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return generate(tmp_path_factory.mktemp("gen1"))


@pytest.fixture(scope="module")
def es() -> EvalSet:
    return load_eval_set(DATA)


def test_generator_is_deterministic(fresh: bytes, tmp_path: Path) -> None:
    assert generate(tmp_path / "again") == fresh


def test_seed_changes_output(fresh: bytes, tmp_path: Path) -> None:
    assert generate(tmp_path / "other", seed=7) != fresh


def test_committed_file_matches_generator(fresh: bytes) -> None:
    assert DATA.read_bytes() == fresh, (
        "data/support/support_eval.jsonl differs from a fresh generation: edit "
        "scripts/make_support_data.py and rerun it instead of editing the file by hand"
    )


def test_loads_without_problems(es: EvalSet) -> None:
    assert len(es) == len(DATA.read_text(encoding="utf-8").splitlines())
    assert sorted(es.slice_columns) == ["channel", "customer_tier", "difficulty"]
    for it in es:
        assert set(it.slices) == {"channel", "customer_tier", "difficulty"}, it.id
        assert it.language in {"en", "es", "de", "fr"}, it.id
    assert {it.slices["channel"] for it in es} == {"email", "chat", "phone_transcript"}
    assert {it.slices["customer_tier"] for it in es} == {"free", "plus", "business"}
    assert {it.slices["difficulty"] for it in es} == {"easy", "hard"}


def test_ids_follow_pattern(es: EvalSet) -> None:
    prefix = {
        "classification": "cls",
        "multiple_choice": "mc",
        "extraction": "ext",
        "refusal": "ref",
        "tool_call": "tool",
        "generation": "gen",
    }
    for it in es:
        head, _, number = it.id.rpartition("-")
        assert head == f"sup-{prefix[it.task]}" and len(number) == 4 and number.isdigit(), it.id


def test_counts_per_task(es: EvalSet) -> None:
    counts = Counter(it.task for it in es)
    for task, (lo, hi) in TASK_RANGES.items():
        assert lo <= counts[task] <= hi, (task, counts[task])
    assert 300 <= len(es) <= 340


def test_rare_intents(es: EvalSet) -> None:
    shares = label_shares(es)
    assert len(shares) >= 12
    rare = shares[shares["share"] < 0.03]
    assert len(rare) >= 2, shares
    assert (rare["n"] >= 2).all(), rare
    assert {"fraud_report", "legal_request"} <= set(rare["label"])


def test_extraction_null_share(es: EvalSet) -> None:
    values = [v for it in es if it.task == "extraction" for v in it.fields.values()]
    share = sum(v is None for v in values) / len(values)
    assert 0.20 <= share <= 0.30, share
    for it in es:
        if it.task == "extraction":
            assert 3 <= len(it.fields) <= 5, it.id


def test_multilingual_slice(es: EvalSet) -> None:
    langs = Counter(it.language for it in es)
    assert {"es", "de", "fr"} <= set(langs)
    non_en = sum(n for lang, n in langs.items() if lang != "en")
    assert 0.10 <= non_en / len(es) <= 0.20
    ml_tasks = {it.task for it in es if it.language != "en"}
    assert {"classification", "refusal", "extraction"} <= ml_tasks
    cls = [it for it in es if it.task == "classification"]
    assert 0.15 <= sum(it.language != "en" for it in cls) / len(cls) <= 0.25


def test_long_context_slice(es: EvalSet) -> None:
    long_items = [it for it in es if it.context and len(it.context.split()) >= 600]
    assert 20 <= len(long_items) <= 30
    assert {it.task for it in long_items} == {"multiple_choice", "extraction", "generation"}


def test_refusal_has_both_classes(es: EvalSet) -> None:
    counts = Counter(it.should_refuse for it in es if it.task == "refusal")
    assert counts[True] >= 15 and counts[False] >= 15, counts


def test_multiple_choice_answers_spread(es: EvalSet) -> None:
    answers = Counter(it.answer for it in es if it.task == "multiple_choice")
    assert set(answers) == {0, 1, 2, 3}
    for it in es:
        if it.task == "multiple_choice":
            assert len(it.choices) == 4 and len(set(it.choices)) == 4, it.id


def test_tool_calls(es: EvalSet) -> None:
    for it in es:
        if it.task == "tool_call":
            names = [t["name"] for t in it.tools]
            assert 3 <= len(names) <= 4 and it.expected_tool in names, it.id
            spec = next(t for t in it.tools if t["name"] == it.expected_tool)
            assert set(it.expected_args) == set(spec["parameters"]["required"]), it.id


def test_admits_uncertainty(es: EvalSet) -> None:
    unsure = [it for it in es if it.admits_uncertainty]
    assert 10 <= len(unsure) <= 20
    assert {it.task for it in unsure} <= {"generation", "extraction", "multiple_choice"}


def test_template_renders_every_item(es: EvalSet) -> None:
    study = load_study(DEMO / "study.yaml")
    builder = PromptBuilder(
        study.resolve(study.prompt.template), es, chat=study.prompt.chat, system=study.prompt.system
    )
    for it in es:
        prompt = builder.render(it)
        text = prompt.messages[-1]["content"]
        assert it.text in text, it.id
        if it.context:
            assert it.context in text, it.id
        if it.task == "classification":
            assert "fraud_report" in text and "Answer with the intent name only." in text
        if it.task == "multiple_choice":
            assert "D. " in text and text.endswith("Answer with the letter only.")
        if it.task == "extraction":
            assert all(f'"{f}": ...' in text for f in it.fields) and "JSON only." in text
        if it.task == "tool_call":
            assert all(t["name"] in text for t in it.tools)


def test_demo_study_validates() -> None:
    study = load_study(DEMO / "study.yaml")
    assert study.name == "support-demo"
    assert study.eval_set.sample is not None and study.eval_set.sample.n == 90
    assert study.sampling.max_new_tokens == 48 and study.sampling.temperature == 0.0
    assert study.baseline.name == "smollm2-fp32"
    runtimes = {c.runtime for c in study.candidates}
    recipes = {c.recipe.name for c in study.candidates if c.recipe}
    assert len(study.candidates) >= 4 and runtimes == {"transformers", "llamacpp"}
    assert {"int8_dynamic", "prune_magnitude", "gguf_requant"} <= recipes
    assert study.resolve(study.budget).is_file()
    # the demo sample keeps every (task, label) stratum: both rare intents stay rare
    from kit.evalset import label_shares
    from kit.stages.freeze import load_study_eval_set

    sample = load_study_eval_set(study)
    shares = label_shares(sample).set_index("label")["share"]
    assert len(sample) == 90 and set(shares.index) == {
        it.label for it in load_eval_set(DEMO / "support_eval.jsonl") if it.task == "classification"
    }
    assert (shares[["fraud_report", "legal_request"]] < study.eval_set.rare_label_threshold).all()
    assert (
        shares.drop(["fraud_report", "legal_request"]) > study.eval_set.rare_label_threshold
    ).all()


def test_arc_study_validates_and_loads() -> None:
    study = load_study(ARC / "study.yaml")
    assert study.name == "arc-smollm2"
    from kit.stages.freeze import load_study_eval_set

    es = load_study_eval_set(study)
    assert len(es) == 300
    assert {it.slices["subset"] for it in es} == {"ARC-Easy", "ARC-Challenge"}
    assert es.slice_columns == ["subset", "school_grade"]
    assert all(it.task == "multiple_choice" and len(it.choices) == 4 for it in es)
    assert all(set(it.slices) == {"subset", "school_grade"} for it in es)
    builder = PromptBuilder(study.resolve(study.prompt.template), es, chat=study.prompt.chat)
    text = builder.render_text(es.items[0])
    assert text.startswith("Question: ") and text.endswith("Answer with the letter only.")
