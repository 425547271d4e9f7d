"""The frozen budget: the copy verdicts use, and the banner when the file changed since."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from kit.budget.frozen import budget_status, compare_budgets, load_frozen_budget
from kit.budget.grammar import AbsoluteBound
from kit.errors import CompkitError

DEMO = Path(__file__).resolve().parents[1] / "data" / "support" / "budget.yaml"


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
    from kit.run import BaselineManifest, FrozenInputs, OutputsSummary

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
    pd.DataFrame({"id": ["a"], "task": ["classification"], "label_rarity": ["rare"]}).to_parquet(
        run / "frozen" / "slices.parquet"
    )
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
