"""Stage 1 end to end on a tiny local model: manifest, frozen copies, resume, drift check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kit import cli
from kit.errors import CompkitError
from kit.runtimes import open_runtime
from kit.stages.freeze import (
    BaselineManifest,
    FrozenInputsChanged,
    check_frozen,
    ensure_frozen,
    freeze_baseline,
)
from kit.study import load_study

ITEMS = [
    {
        "id": "c1",
        "task": "classification",
        "input": "where is my parcel",
        "label": "order_status",
        "channel": "chat",
    },
    {
        "id": "c2",
        "task": "classification",
        "input": "someone stole my card",
        "label": "fraud_report",
        "channel": "email",
    },
    {
        "id": "c3",
        "task": "classification",
        "input": "cancel it please",
        "label": "cancel_order",
        "channel": "chat",
    },
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "Return window?",
        "choices": ["7 days", "30 days", "1 year"],
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
        "input": "refund order 5",
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
        "language": "en",
    },
]
TEMPLATE = """{% if task == 'classification' %}Intents: {{ labels | join(', ') }}. Message: {{ input }}
{% elif task == 'multiple_choice' %}{{ input }}
{% for c in choices %}{{ c.letter }}. {{ c.text }}
{% endfor %}{% else %}{{ input }}{% endif %}"""


@pytest.fixture
def study_dir(tmp_path, tiny_model_dir):
    d = tmp_path / "study"
    d.mkdir()
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (d / "prompt.jinja").write_text(TEMPLATE)
    (d / "budget.yaml").write_text("rules:\n  - rule: flip rate below 5 percent\n")
    model = d / "model"
    shutil.copytree(tiny_model_dir, model)
    study = {
        "name": "tiny",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja", "chat": True},
        "sampling": {"temperature": 0.0, "max_new_tokens": 6, "seed": 7},
        "repeats": 2,
        "baseline": {
            "name": "tiny-fp32",
            "runtime": "transformers",
            "model": "model",
            "batch_size": 3,
        },
        "budget": "budget.yaml",
    }
    (d / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return d


@pytest.fixture
def frozen(study_dir, tmp_path):
    out = tmp_path / "runs" / "tiny"
    manifest = freeze_baseline(study_dir / "study.yaml", out, progress=False)
    return study_dir, out, manifest


def test_freeze_writes_a_typed_manifest_and_frozen_copies(frozen):
    _, out, manifest = frozen
    loaded = BaselineManifest.load(out)
    assert loaded == manifest
    assert manifest.outputs.rows == len(ITEMS) * 2 and manifest.outputs.items == len(ITEMS)
    assert manifest.outputs.errors == 0
    assert len(manifest.model["weights_sha256"]) == 64 and manifest.model["parameters"] > 0
    assert (
        manifest.model["runtime"] == "transformers" and "torch" in manifest.model["runtime_version"]
    )
    assert (
        manifest.inputs.eval_set_rows == len(ITEMS) and len(manifest.inputs.eval_set_sha256) == 64
    )
    assert manifest.inputs.sampling["seed"] == 7 and manifest.inputs.budget_sha256
    assert (
        manifest.hardware.cores >= 1 and manifest.hardware.memory_gb > 0 and manifest.hardware.cpu
    )
    assert manifest.libraries["torch"] and manifest.libraries["transformers"]
    assert manifest.kit.version
    for name in (
        "study.yaml",
        "prompt.jinja",
        "eval_set.jsonl",
        "item_hashes.json",
        "budget.yaml",
        "slices.parquet",
        "prompts.jsonl",
    ):
        assert (out / "frozen" / name).is_file(), name
    assert not (out / "pending.json").exists()
    slices = pd.read_parquet(out / "frozen" / "slices.parquet")
    assert {"task", "language", "length_bucket", "label_rarity", "channel", "prompt_tokens"} <= set(
        slices.columns
    )
    # baseline scores per task and overall, in the tidy shape
    scores = manifest.scores_frame()
    assert {"model", "task", "metric", "value", "n"} <= set(scores.columns)
    assert set(scores["task"]) >= {"all", "classification", "extraction", "generation"}
    # raw outputs carry timing and confidence
    rows = pd.read_parquet(out / "outputs" / "tiny-fp32")
    assert set(rows["repeat"]) == {0, 1} and not rows.duplicated(["item_id", "repeat"]).any()
    assert (rows["ttft_s"] <= rows["latency_s"]).all() and rows["prompt_tokens"].gt(0).all()
    choice_rows = rows[rows["item_id"].isin(["c1", "m1"])]
    assert choice_rows["choice_probs"].map(lambda p: abs(sum(p) - 1) < 1e-6).all()
    gen = rows[rows["output_tokens"] > 0]
    assert gen["mean_token_prob"].between(0, 1).all()


def test_frozen_run_is_never_overwritten(frozen):
    study_dir, out, manifest = frozen
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(CompkitError, match="already frozen"):
        freeze_baseline(study_dir / "study.yaml", out, progress=False)
    assert (out / "manifest.json").read_bytes() == before
    assert ensure_frozen(study_dir / "study.yaml", out, progress=False) == manifest


def test_check_passes_unchanged_and_cli_exit_codes(frozen, capsys):
    _, out, _ = frozen
    report = check_frozen(out)
    assert report.ok, report.render()
    assert cli.main(["check", str(out)]) == 0
    assert "all frozen inputs unchanged" in capsys.readouterr().out


def _statuses(report) -> dict[str, str]:
    return dict(zip(report.frame["input"], report.frame["status"], strict=True))


def test_check_detects_template_eval_sampling_and_budget_changes(frozen, capsys):
    study_dir, out, _ = frozen
    (study_dir / "prompt.jinja").write_text(TEMPLATE + "\nAnswer briefly.")
    rows = [dict(r) for r in ITEMS]
    rows[3]["answer"] = 2
    rows.append({"id": "new", "task": "generation", "input": "hi", "reference": "hello"})
    (study_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = yaml.safe_load((study_dir / "study.yaml").read_text())
    study["sampling"]["max_new_tokens"] = 9
    (study_dir / "study.yaml").write_text(yaml.safe_dump(study))
    (study_dir / "budget.yaml").write_text("rules:\n  - rule: flip rate below 50 percent\n")

    report = check_frozen(out)
    status = _statuses(report)
    assert not report.ok
    assert (
        status["prompt template"] == "changed"
        and "+Answer briefly." in report.diffs["prompt template"]
    )
    assert status["eval set"] == "changed"
    detail = report.frame.set_index("input").loc["eval set", "detail"]
    assert "1 changed: m1" in detail and "1 added: new" in detail
    assert (
        status["sampling"] == "changed"
        and "max_new_tokens: 6 -> 9" in report.frame.set_index("input").loc["sampling", "detail"]
    )
    assert status["budget"] == "warning" and "50 percent" in report.diffs["budget"]
    assert status["model weights"] == "same"
    assert cli.main(["check", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FROZEN INPUTS CHANGED" in text and "CHANGED  prompt template" in text
    with pytest.raises(FrozenInputsChanged):
        ensure_frozen(study_dir / "study.yaml", out, progress=False)


def test_check_detects_swapped_weights_and_runtime_version(frozen, monkeypatch):
    study_dir, out, _ = frozen
    from safetensors.torch import load_file, save_file

    weights = next((study_dir / "model").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    monkeypatch.setattr(
        "kit.stages.freeze.library_versions",
        lambda names: {
            n: ("9.9.9" if n == "transformers" else v)
            for n, v in BaselineManifest.load(out).libraries.items()
            if n in names
        },
    )
    status = _statuses(check_frozen(out))
    assert status["model weights"] == "changed"
    assert status["library transformers"] == "changed" and status["library torch"] == "same"


def test_bad_input_writes_nothing(study_dir, tmp_path):
    (study_dir / "eval.jsonl").write_text(
        json.dumps({"id": "x", "task": "classification", "input": "hi"}) + "\n"
    )
    out = tmp_path / "runs" / "bad"
    with pytest.raises(CompkitError, match=r"eval.jsonl, row 1, field 'label'"):
        freeze_baseline(study_dir / "study.yaml", out, progress=False)
    assert not out.exists()
    (study_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (study_dir / "prompt.jinja").write_text("{{ inptu }}")
    with pytest.raises(CompkitError, match=r"prompt\.jinja, item 'c1'.*'inptu' is undefined"):
        freeze_baseline(study_dir / "study.yaml", out, progress=False)
    assert not out.exists()
    (study_dir / "prompt.jinja").write_text(TEMPLATE)
    study = yaml.safe_load((study_dir / "study.yaml").read_text())
    study["baseline"]["model"] = "no/such/model"
    (study_dir / "study.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(CompkitError, match="no/such/model"):
        freeze_baseline(study_dir / "study.yaml", out, progress=False)
    assert not out.exists()


class _CrashAfter:
    """Wraps a runtime; raises after ``n`` generate calls, as a killed process would stop."""

    def __init__(self, runtime, n):
        self.inner, self.n, self.calls = runtime, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests, **kw):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.inner.generate(requests, **kw)


def test_interrupted_freeze_resumes_without_loss_or_duplicates(study_dir, tmp_path):
    out = tmp_path / "runs" / "resume"
    study = load_study(study_dir / "study.yaml")
    runtime = open_runtime(study.baseline, base_dir=study.root)
    crashing = _CrashAfter(runtime, n=2)
    with pytest.raises(KeyboardInterrupt):
        freeze_baseline(study_dir / "study.yaml", out, progress=False, runtime=crashing)
    assert (out / "pending.json").exists() and not (out / "manifest.json").exists()
    stored = pd.read_parquet(out / "outputs" / "tiny-fp32")
    assert 0 < len(stored) < len(ITEMS) * 2
    counting = _CrashAfter(runtime, n=10**6)
    manifest = freeze_baseline(study_dir / "study.yaml", out, progress=False, runtime=counting)
    rows = pd.read_parquet(out / "outputs" / "tiny-fp32")
    assert len(rows) == len(ITEMS) * 2 == manifest.outputs.rows
    assert not rows.duplicated(["item_id", "repeat"]).any()
    assert set(stored["item_id"] + stored["repeat"].astype(str)) <= set(
        rows["item_id"] + rows["repeat"].astype(str)
    )


def test_resuming_with_different_inputs_is_refused(study_dir, tmp_path):
    out = tmp_path / "runs" / "resume"
    study = load_study(study_dir / "study.yaml")
    runtime = open_runtime(study.baseline, base_dir=study.root)
    with pytest.raises(KeyboardInterrupt):
        freeze_baseline(
            study_dir / "study.yaml", out, progress=False, runtime=_CrashAfter(runtime, n=1)
        )
    (study_dir / "prompt.jinja").write_text(TEMPLATE + " ")
    with pytest.raises(
        CompkitError, match=r"interrupted freeze made with different inputs.*template_sha256"
    ):
        freeze_baseline(study_dir / "study.yaml", out, progress=False, runtime=runtime)


def test_cli_freeze_and_validate(study_dir, tmp_path, capsys):
    assert cli.main(["validate", str(study_dir / "study.yaml")]) == 0
    assert "8 items" in capsys.readouterr().out
    out = tmp_path / "runs" / "cli"
    assert cli.main(["freeze", str(study_dir / "study.yaml"), "--out", str(out), "--quiet"]) == 0
    assert f"manifest: {out / 'manifest.json'}" in capsys.readouterr().out
    assert cli.main(["freeze", str(study_dir / "study.yaml"), "--out", str(out), "--quiet"]) == 2
    assert "already frozen" in capsys.readouterr().err
    assert cli.main(["check", str(tmp_path / "nothing")]) == 2


@pytest.mark.notebooks
def test_notebook_01_runs_under_papermill(study_dir, tmp_path):
    import papermill as pm

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "runs" / "nb"
    executed = tmp_path / "01.ipynb"
    for _ in range(2):  # second run verifies the frozen folder instead of re-running
        pm.execute_notebook(
            str(root / "notebooks" / "01_freeze_baseline.ipynb"),
            str(executed),
            parameters={"study": str(study_dir / "study.yaml"), "out": str(out), "progress": False},
            cwd=str(root / "notebooks"),
            progress_bar=False,
            kernel_name="python3",
        )
        manifest = BaselineManifest.load(out)
        assert manifest.outputs.rows == len(ITEMS) * 2
    assert executed.exists()
