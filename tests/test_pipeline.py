"""The whole pipeline through papermill on a small study, resume, a failing stage, and the gate.

The study is real (stages 1-4, 4b and 7 run as notebooks) but uses the predictions runtime, so no
model loads. Eight item templates are repeated 30 times (240 items); the baseline answers 7 of
every 8 right. The candidates and the verdicts the statistics must give:

``same``    answers exactly like the baseline: accepted (240 unchanged items bound a drop to
            under 2 points, the flip rate to under 2%, and the ECE change to under 0.05);
``worse``   breaks every c1, m1 and g1 item (37.5% of the items): rejected;
``fixer``   fixes every c4 item, breaks none: accepted;
``edge``    breaks 12 c1 items (5.0 points, exactly the limit): inconclusive.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kit.cli import main
from kit.errors import CompkitError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = [
    {"id": "c1", "task": "classification", "input": "where is my parcel", "label": "order_status"},
    {"id": "c2", "task": "classification", "input": "has it shipped yet", "label": "order_status"},
    {"id": "c3", "task": "classification", "input": "my refund never came", "label": "refund"},
    {"id": "c4", "task": "classification", "input": "someone stole my card", "label": "fraud"},
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "Return window?",
        "choices": ["7 days", "thirty days"],
        "answer": 1,
    },
    {
        "id": "m2",
        "task": "multiple_choice",
        "input": "Capital of France?",
        "choices": ["Paris", "Lyon"],
        "answer": 0,
    },
    {
        "id": "g1",
        "task": "generation",
        "input": "Apologise for the delay.",
        "reference": "Sorry for the delay.",
    },
    {"id": "g2", "task": "generation", "input": "Say thanks.", "reference": "Thank you!"},
]
COPIES = 30


def _expand(templates: list[dict], copies: int = COPIES) -> list[dict]:
    items = []
    for k in range(copies):
        for t in templates:
            item = {**t, "id": f"{t['id']}-{k:02d}", "input": f"{t['input']} (#{k})"}
            item["channel"] = "email" if len(items) % 2 == 0 else "chat"
            items.append(item)
    return items


ITEMS = _expand(TEMPLATES)
BASE_TEMPLATE = {
    "c1": "order_status",
    "c2": "order_status",
    "c3": "refund",
    "c4": "refund",
    "m1": "B",
    "m2": "A",
    "g1": "Sorry for the delay.",
    "g2": "Thank you!",
}
# classification options are the sorted labels: fraud, order_status, refund
PROBS_TEMPLATE = {
    "c1": [0.1, 0.8, 0.1],
    "c2": [0.1, 0.8, 0.1],
    "c3": [0.1, 0.1, 0.8],
    "c4": [0.3, 0.1, 0.6],
    "m1": [0.3, 0.7],
    "m2": [0.9, 0.1],
}


def _per_item(template: dict, *, copies: range = range(COPIES)) -> dict:
    return {f"{t}-{k:02d}": v for t, v in template.items() for k in copies}


BASE = _per_item(BASE_TEMPLATE)
PROBS = _per_item(PROBS_TEMPLATE)
CANDIDATES = {
    "same": ({}, {}),
    "worse": (
        _per_item({"c1": "refund", "m1": "A", "g1": "No."}),
        _per_item({"c1": [0.1, 0.2, 0.7], "m1": [0.7, 0.3]}),
    ),
    "fixer": (_per_item({"c4": "fraud"}), _per_item({"c4": [0.7, 0.1, 0.2]})),
    "edge": (
        _per_item({"c1": "refund"}, copies=range(12)),
        _per_item({"c1": [0.1, 0.2, 0.7]}, copies=range(12)),
    ),
}
BUDGET = {
    "rules": [
        {
            "rule": "accuracy cannot drop by more than 5 points",
            "why": "wrong intents misroute tickets",
        },
        {"rule": "flip rate below 50 percent", "why": "answers should stay as they were"},
        {"rule": "ECE must not increase by more than 0.5"},
    ]
}
EXPECTED = {"same": "accepted", "worse": "rejected", "fixer": "accepted", "edge": "inconclusive"}
FAST = {"drilldown": {"n_resamples": 200, "min_n": 1}, "calibration": {"n_resamples": 200}}


def _predictions(path: Path, outputs: dict, probs: dict) -> None:
    rows = [
        {"id": i, "output": text, "repeat": 0, **({"choice_probs": probs[i]} if i in probs else {})}
        for i, text in outputs.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_study(
    folder: Path,
    *,
    items: list[dict] = ITEMS,
    candidates: dict = CANDIDATES,
    budget: dict | None = BUDGET,
    drop: dict[str, str] | None = None,
    description: str = "",
) -> Path:
    """Write the study (eval set, template, predictions, budget); returns study.yaml.

    Predictions cover exactly the ids of ``items`` (fewer copies make a smaller study);
    ``drop`` maps a candidate to an item id left out of its predictions file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (folder / "prompt.jinja").write_text(
        "{% if labels %}Intents: {{ labels | join(', ') }}. {% endif %}{{ input }}"
    )
    ids = {item["id"] for item in items}

    def only(mapping: dict) -> dict:
        return {k: v for k, v in mapping.items() if k in ids}

    _predictions(folder / "base.jsonl", only(BASE), only(PROBS))
    for name, (changes, probs) in candidates.items():
        outputs = only({**BASE, **changes})
        if drop and name in drop:
            outputs.pop(drop[name])
        _predictions(folder / f"{name}.jsonl", outputs, only({**PROBS, **probs}))
    if budget is not None:
        (folder / "budget.yaml").write_text(yaml.safe_dump(budget, sort_keys=False))
    study = {
        "name": "tiny",
        "description": description,
        "eval_set": {"path": "eval.jsonl", "rare_label_threshold": 0.2},
        "prompt": {"template": "prompt.jinja", "chat": False, "choice_labels": "text"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8, "seed": 3},
        "repeats": 1,
        "baseline": {"name": "base", "runtime": "predictions", "model": "base.jsonl"},
        "candidates": [
            {"name": n, "runtime": "predictions", "model": f"{n}.jsonl"} for n in candidates
        ],
        **({"budget": "budget.yaml"} if budget is not None else {}),
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def build_judged_run(root: Path, **study_kwargs) -> Path:
    """Stages 1-4 and the verdict in process (no papermill); returns the run folder."""
    from kit.stages.calibration import write_calibration_tables
    from kit.stages.candidates import run_candidates
    from kit.stages.drilldown import write_drilldown_tables
    from kit.stages.freeze import freeze_baseline
    from kit.verdicts import judge_run

    study = write_study(root / "study", **study_kwargs)
    out = root / "runs" / "tiny"
    freeze_baseline(study, out, progress=False)
    run_candidates(out, progress=False)
    write_drilldown_tables(out, n_resamples=200, min_n=1)
    write_calibration_tables(out, n_resamples=200)
    judge_run(out)
    return out


# --------------------------------------------------------------------------- registry


def test_every_stage_notebook_has_typed_parameters_and_no_outputs():
    import nbformat
    import papermill as pm

    from kit.pipeline import NOTEBOOKS_DIR, STAGES, StageInputs

    assert [s.name for s in STAGES] == [
        "freeze",
        "candidates",
        "drilldown",
        "calibration",
        "robustness",
        "serving",
        "routing",
        "memo",
    ]
    demo = Path(__file__).resolve().parent.parent / "data" / "demo" / "study.yaml"
    inputs = StageInputs(study=demo, run=Path("/r/run"))  # calibration reads the study's settings
    for s in STAGES:
        path = NOTEBOOKS_DIR / s.notebook
        declared = pm.inspect_notebook(str(path))
        assert set(s.parameters(inputs)) <= set(declared), s.name
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.kernelspec.name == "python3"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1
    memo = pm.inspect_notebook(str(NOTEBOOKS_DIR / "07_acceptance_memo.ipynb"))
    assert memo["run"]["inferred_type_name"] == "str"
    assert memo["run"]["default"] == '""'  # empty: runs/<study name> (kit.pipeline.stage_run_dir)
    nb = nbformat.read(NOTEBOOKS_DIR / "07_acceptance_memo.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_unknown_stage_lists_the_valid_ones(tmp_path):
    from kit.pipeline import run_pipeline

    study = write_study(tmp_path / "study")
    with pytest.raises(CompkitError, match="stages: freeze, candidates, drilldown"):
        run_pipeline(study, tmp_path / "runs" / "x", stages=["slices"], progress=False)


def test_stages_after_candidates_refuse_a_run_without_candidates(tmp_path):
    from kit.pipeline import run_pipeline
    from kit.stages.freeze import freeze_baseline

    study = write_study(tmp_path / "study", candidates={})
    out = tmp_path / "runs" / "alone"
    freeze_baseline(study, out, progress=False)
    with pytest.raises(CompkitError, match=r"stage 'drilldown': .* has no candidate outputs"):
        run_pipeline(study, out, stages=["drilldown"], progress=False)
    assert not (out / "notebooks").exists()  # refused before papermill started


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def piped(tmp_path_factory) -> tuple[Path, Path, dict]:
    """``compkit run`` on the tiny study; returns (study, run folder, pipeline.json)."""
    root = tmp_path_factory.mktemp("pipe")
    study = write_study(root / "study")
    out = root / "runs" / "tiny"
    assert main(["run", str(study), "--out", str(out), "--quiet"]) == 0
    return study, out, json.loads((out / "pipeline.json").read_text())


NOTEBOOKS = [
    "01_freeze_baseline",
    "02_run_candidates",
    "03_slice_drilldown",
    "04_calibration",
    "04b_robustness",
    "05_serving",
    "07_acceptance_memo",
]


@pytest.mark.notebooks
def test_pipeline_writes_every_artifact(piped):
    _, out, record = piped
    for name in NOTEBOOKS:
        executed = out / "notebooks" / f"{name}.ipynb"
        assert executed.is_file() and (out / "notebooks" / f"{name}.html").is_file()
        cells = json.loads(executed.read_text())["cells"]
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in cells)
    assert not (out.parent / ".tiny.pipeline").exists()  # stage 1's staging folder is gone
    assert "<svg" in (out / "memo.html").read_text()
    verdict = json.loads((out / "verdict.json").read_text())
    assert {d["candidate"]: d["decision"] for d in verdict["decisions"]} == EXPECTED
    assert (out / "tables" / "verdicts.parquet").is_file()
    stages = record["stages"]
    assert list(stages) == [
        "freeze",
        "candidates",
        "drilldown",
        "calibration",
        "robustness",
        "serving",
        "routing",
        "memo",
    ]
    serving = json.loads((out / "serving.json").read_text())  # no model has a serving: block
    assert serving["models"] == [] and "no model has a serving: block" in serving["notes"][0]
    for rec in stages.values():
        assert rec["status"] == "finished" and len(rec["notebook_sha256"]) == 64
        assert rec["started_at"] <= rec["finished_at"]
        assert rec["executed_notebook"].startswith("notebooks/")
    assert stages["freeze"]["parameters"]["out"] == str(out.resolve())
    assert stages["memo"]["parameters"] == {"run": str(out.resolve())}


@pytest.mark.notebooks
def test_rerun_resumes_and_executes_no_stage(piped, capsys):
    study, out, record = piped
    assert main(["run", str(study), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stages run: none" in printed and "memo:" in printed
    after = json.loads((out / "pipeline.json").read_text())["stages"]
    for name, rec in record["stages"].items():
        assert after[name]["started_at"] == rec["started_at"]
        assert after[name]["finished_at"] == rec["finished_at"]


@pytest.mark.notebooks
def test_gate_exit_codes_on_the_piped_run(piped, capsys):
    _, out, _ = piped
    assert main(["gate", str(out), "--candidate", "fixer"]) == 0
    assert main(["gate", str(out), "--candidate", "same"]) == 0
    assert main(["gate", str(out), "--candidate", "worse"]) == 1
    assert main(["gate", str(out), "--candidate", "edge"]) == 3
    assert main(["gate", str(out)]) == 1  # one rejected: the whole gate fails
    capsys.readouterr()
    assert main(["gate", str(out), "--candidate", "edge", "--json"]) == 3
    rows = json.loads(capsys.readouterr().out)
    assert {r["candidate"] for r in rows} == {"edge"}
    assert {r["verdict"] for r in rows} == {"pass", "inconclusive"}
    assert {"rule", "observed", "ci_low", "ci_high", "n_needed", "reason"} <= set(rows[0])


@pytest.mark.notebooks
def test_rerunning_an_earlier_stage_makes_later_ones_stale(piped, capsys):
    from kit.pipeline import run_pipeline

    study, out, _ = piped
    result = run_pipeline(study, out, stages=["calibration"], progress=False)
    assert result.ran == ["calibration"]
    assert main(["gate", str(out)]) == 2  # the verdict predates the new calibration tables
    assert "rerun `compkit run`" in capsys.readouterr().err
    result = run_pipeline(study, out, progress=False)
    # later stages are stale (serving reuses its results; routing has no routing: block)
    assert result.ran == ["robustness", "serving", "routing", "memo"]
    assert result.skipped == ["freeze", "candidates", "drilldown", "calibration"]
    assert main(["gate", str(out), "--candidate", "fixer"]) == 0


@pytest.mark.notebooks
def test_a_candidate_rerun_makes_the_comparison_stages_stale(piped, capsys):
    from kit.pipeline import run_pipeline

    study, out, _ = piped
    assert main(["candidates", "--out", str(out), "--only", "same", "--force", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["gate", str(out)]) == 2  # the verdict no longer describes the outputs
    assert "changed" in capsys.readouterr().err
    result = run_pipeline(study, out, progress=False)
    ran = ["drilldown", "calibration", "robustness", "serving", "routing", "memo"]
    assert result.ran == ran  # they read the outputs
    assert main(["gate", str(out), "--candidate", "same"]) == 0


def test_bad_input_fails_before_anything_is_written(tmp_path, capsys):
    study = write_study(tmp_path / "study", drop={"worse": "g2-07"})
    out = tmp_path / "runs" / "early"
    assert main(["run", str(study), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "worse.jsonl" in err and "'g2-07'" in err and "field 'id'" in err
    assert not out.exists()  # no baseline was frozen for a study that cannot run


@pytest.mark.notebooks
def test_a_failing_stage_names_the_kit_call_and_keeps_its_notebook(tmp_path, capsys):
    from kit.pipeline import StageFailed, run_pipeline

    study = write_study(tmp_path / "study")
    out = tmp_path / "runs" / "broken"
    with pytest.raises(StageFailed) as info:
        run_pipeline(study, out, progress=False, parameters={"drilldown": {"metric": "acuracy"}})
    err = info.value
    message = str(err)
    assert err.stage == "drilldown"
    assert err.call == "kit.stages.drilldown.write_drilldown_tables"
    assert err.origin is not None and err.origin.startswith("kit/metrics.py:")
    assert "stage 'drilldown' failed in kit.stages.drilldown.write_drilldown_tables" in message
    assert "unknown metric 'acuracy' (did you mean 'accuracy'?)" in message
    assert "from kit" not in message.splitlines()[0]  # never blames the import line
    executed = out / "notebooks" / "03_slice_drilldown.ipynb"
    assert executed.is_file() and executed.with_suffix(".html").is_file()
    assert str(executed) in message
    source = json.loads((ROOT / "notebooks" / "03_slice_drilldown.ipynb").read_text())["cells"]
    assert "write_drilldown_tables(" in "".join(source[err.cell_index]["source"])
    saved = json.loads(executed.read_text())["cells"]
    failed = [c for c in saved if c["cell_type"] == "code" and c.get("outputs")]
    assert any(o.get("output_type") == "error" for c in failed for o in c["outputs"])
    record = json.loads((out / "pipeline.json").read_text())["stages"]
    assert record["candidates"]["status"] == "finished"
    assert record["drilldown"]["status"] == "failed"
    assert "CompkitError" in record["drilldown"]["error"]
    assert "calibration" not in record  # later stages did not run
    capsys.readouterr()
    assert main(["gate", str(out)]) == 2
    assert "stage 'drilldown' failed" in capsys.readouterr().err


def test_kernel_log_lines_stay_off_the_terminal_unless_verbose():
    from kit.pipeline import QUIET_KERNEL

    assert QUIET_KERNEL == ["--IPKernelApp.log_level=ERROR"]


# --------------------------------------------------------------------------- gate


def _crafted(folder: Path, decisions: dict[str, str]) -> Path:
    """A run folder holding only a crafted verdict.json with these decisions."""
    from kit.verdicts import BudgetBanner, DecisionRow, VerdictReport, VerdictRow, write_report

    verdict = {"accepted": "pass", "rejected": "fail", "inconclusive": "inconclusive"}
    report = VerdictReport(
        run=str(folder),
        study="crafted",
        baseline="base",
        candidates=list(decisions),
        created_at="2026-01-01T00:00:00+00:00",
        decisions=[
            DecisionRow(
                candidate=name,
                decision=d,
                n_rules=1,
                n_pass=int(d == "accepted"),
                n_fail=int(d == "rejected"),
                n_inconclusive=int(d == "inconclusive"),
                n_not_measured=0,
                reason=d,
            )
            for name, d in decisions.items()
        ],
        verdicts=[
            VerdictRow(
                candidate=name,
                rule="flip rate below 5 percent",
                metric="flip_rate",
                slice="overall",
                observed=0.01,
                verdict=verdict[d],
                reason="crafted",
            )
            for name, d in decisions.items()
        ],
        budget=BudgetBanner(
            frozen_path=None,
            current_path=None,
            frozen_sha256=None,
            current_sha256=None,
            changed=False,
        ),
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_report(folder, report)  # sealed, as judge_run writes it
    return folder


@pytest.mark.parametrize(
    ("decisions", "candidate", "code"),
    [
        ({"a": "accepted", "b": "accepted"}, None, 0),
        ({"a": "accepted", "b": "rejected"}, None, 1),
        ({"a": "accepted", "b": "inconclusive"}, None, 3),
        ({"a": "rejected", "b": "inconclusive"}, None, 1),
        ({"a": "accepted", "b": "rejected"}, "a", 0),
        ({"a": "accepted", "b": "rejected"}, "b", 1),
        ({"a": "accepted", "b": "inconclusive"}, "b", 3),
        ({"a": "accepted"}, "zzz", 2),
    ],
)
def test_gate_exit_codes_on_crafted_verdicts(tmp_path, decisions, candidate, code):
    run = _crafted(tmp_path / "run", decisions)
    argv = ["gate", str(run)] + (["--candidate", candidate] if candidate else [])
    assert main(argv) == code


def test_gate_on_a_missing_or_unjudged_run_exits_2(tmp_path, capsys):
    assert main(["gate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["gate", str(tmp_path / "empty")]) == 2
    assert "no verdict.json" in capsys.readouterr().err


def test_gate_json_prints_the_verdict_frame(tmp_path, capsys):
    run = _crafted(tmp_path / "run", {"a": "accepted", "b": "inconclusive"})
    assert main(["gate", str(run), "--json"]) == 3
    rows = json.loads(capsys.readouterr().out)
    assert [r["candidate"] for r in rows] == ["a", "b"]
    assert rows[0]["verdict"] == "pass" and rows[0]["baseline"] is None
    frame = pd.DataFrame(rows)
    from kit.budget.judge import VERDICT_COLUMNS

    assert list(frame.columns) == VERDICT_COLUMNS


def test_a_study_without_a_budget_runs_every_stage_as_an_evidence_report(tmp_path, capsys):
    from kit.report.memo import write_memo
    from kit.verdicts import VerdictReport

    run = build_judged_run(tmp_path, items=_expand(TEMPLATES, copies=1), budget=None)
    report = VerdictReport.load(run)
    assert not report.judged and report.decisions == [] and report.verdicts == []
    memo = write_memo(run).read_text(encoding="utf-8")
    assert "Evidence report: no verdicts" in memo and "<svg" in memo
    capsys.readouterr()
    assert main(["gate", str(run)]) == 2
    assert "frozen without a budget" in capsys.readouterr().err


def test_run_help_lists_every_stage(capsys):
    from kit.pipeline import STAGE_NAMES

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert ", ".join(STAGE_NAMES) in " ".join(capsys.readouterr().out.split())
