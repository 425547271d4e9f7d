"""Evidence you cannot silently change, and bad input refused before anything is written.

Every tampering case goes through the CLI, as a user would meet it: ``compkit check``,
``compkit gate`` and ``compkit run`` must each refuse (exit 2) and name the file.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline import build_judged_run, write_study

from kit.cli import main


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("integrity")
    return root / "study" / "study.yaml", build_judged_run(root)


@pytest.fixture
def run(judged, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the judged run (the study files are shared, read-only here)."""
    study, source = judged
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return study, copy


def refused(argv: list[str], capsys, *names: str) -> str:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2, text
    for name in names:
        assert name in text, (name, text)
    return text


def _first_part(run: Path, model: str = "worse") -> Path:
    return sorted((run / "outputs" / model).glob("part-*.parquet"))[0]


def test_an_untouched_run_checks_and_gates(run, capsys):
    _, folder = run
    capsys.readouterr()
    assert main(["check", str(folder)]) == 0
    assert (
        "evidence: every stored output, artifact and the verdict match" in capsys.readouterr().out
    )
    assert main(["gate", str(folder), "--candidate", "fixer"]) == 0


@pytest.mark.parametrize("command", ["check", "gate", "run"])
def test_a_deleted_output_part_is_refused_everywhere(run, capsys, command):
    study, folder = run
    part = _first_part(folder)
    part.unlink()
    argv = {"check": ["check", str(folder)], "gate": ["gate", str(folder)]}.get(
        command, ["run", str(study), "--out", str(folder), "--quiet"]
    )
    text = refused(argv, capsys, str(part))
    assert "up to date" not in text


def test_an_added_or_edited_part_is_refused(run, capsys):
    _, folder = run
    part = _first_part(folder)
    stray = part.with_name("part-999999.parquet")
    shutil.copy(part, stray)
    refused(["check", str(folder)], capsys, str(stray), "not written by kit")
    stray.unlink()
    frame = pd.read_parquet(part)
    frame.iloc[:-1].to_parquet(part, index=False)  # one row fewer, written by hand
    refused(["gate", str(folder)], capsys, str(part), "changed")


def test_a_hand_edited_verdict_is_refused(run, capsys):
    _, folder = run
    path = folder / "verdict.json"
    content = json.loads(path.read_text())
    for d in content["decisions"]:
        d["decision"] = "accepted"
    path.write_text(json.dumps(content, indent=2))
    text = refused(["gate", str(folder)], capsys, str(path), "does not match its seal")
    assert "exit 0" not in text


@pytest.mark.parametrize("relpath", ["tables/slice_table.parquet", "outcomes.parquet"])
def test_edited_evidence_tables_are_refused(run, capsys, relpath):
    study, folder = run
    path = folder / relpath
    frame = pd.read_parquet(path)
    frame.iloc[::-1].to_parquet(path, index=False)
    refused(["gate", str(folder)], capsys, str(path))
    refused(["check", str(folder)], capsys, str(path), "changed since kit wrote it")
    refused(["run", str(study), "--out", str(folder), "--quiet"], capsys, str(path))


def test_an_edited_frozen_input_is_refused_by_the_gate(run, capsys):
    _, folder = run
    budget = folder / "frozen" / "budget.yaml"
    budget.write_text(budget.read_text().replace("5 points", "50 points"))
    refused(["gate", str(folder)], capsys, str(budget))


def test_out_naming_a_file_is_a_clear_error(tmp_path, capsys):
    study = write_study(tmp_path / "study")
    target = tmp_path / "a-file"
    target.write_text("x")
    refused(["run", str(study), "--out", str(target), "--quiet"], capsys, "is a file")
    refused(["freeze", str(study), "--out", str(target), "--quiet"], capsys, "is a file")


# --------------------------------------------------------------------------- bad input


def _study(tmp_path: Path, **changes) -> Path:
    path = write_study(tmp_path / "study")
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_yaml_alias_bomb_is_refused_in_seconds(tmp_path, capsys):
    path = write_study(tmp_path / "study")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\n"
    data = path.read_text().replace("baseline:", f"{bomb}baseline:", 1)
    path.write_text(data)
    assert len(bomb) < 700  # 10**9 values once expanded
    started = time.perf_counter()
    refused(["validate", str(path)], capsys, str(path), "aliases expand to more than")
    assert time.perf_counter() - started < 10


def test_unknown_runtime_options_get_a_did_you_mean(tmp_path, capsys):
    base = {
        "name": "base",
        "runtime": "predictions",
        "model": "base.jsonl",
        "options": {"progres": True},
    }
    path = _study(tmp_path, baseline=base)
    refused(["validate", str(path)], capsys, "baseline.options.progres", "did you mean 'progress'")


def test_non_utf8_eval_set_names_file_line_and_byte(tmp_path, capsys):
    path = write_study(tmp_path / "study")
    eval_set = tmp_path / "study" / "eval.jsonl"
    lines = eval_set.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:12] + b"\xff" + lines[2][12:]
    eval_set.write_bytes(b"".join(lines))
    refused(["validate", str(path)], capsys, str(eval_set), "row 3", "not UTF-8", "0xff")


def test_blank_ids_are_refused_and_ids_are_stripped(tmp_path, capsys):
    path = write_study(tmp_path / "study")
    eval_set = tmp_path / "study" / "eval.jsonl"
    rows = [json.loads(line) for line in eval_set.read_text().splitlines()]
    rows[0]["id"] = "   "
    rows[1]["id"] = f"  {rows[1]['id']}  "
    eval_set.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = refused(["validate", str(path)], capsys, str(eval_set), "row 1", "field 'id'")
    assert "row 2" not in text  # a padded id is the id without its spaces


def test_a_predictions_file_is_fully_validated_before_a_run(tmp_path, capsys):
    path = write_study(tmp_path / "study")
    preds = tmp_path / "study" / "fixer.jsonl"
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    rows[3]["confidence"] = 1.7
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "runs" / "x"
    refused(["run", str(path), "--out", str(out), "--quiet"], capsys, str(preds), "confidence")
    assert not out.exists()


def test_missing_model_files_and_dead_endpoints_fail_validation(tmp_path, capsys):
    gguf = {"name": "q4", "runtime": "llamacpp", "model": str(tmp_path / "missing.gguf")}
    dead = {"name": "srv", "runtime": "openai", "model": "m", "endpoint": "http://127.0.0.1:9/v1",
            "options": {"connect_timeout_s": 2, "timeout_s": 2}}  # fmt: skip
    path = _study(tmp_path, candidates=[gguf, dead])
    started = time.perf_counter()
    text = refused(["validate", str(path)], capsys, "candidates.0", "candidates.1")
    assert "missing.gguf" in text and "127.0.0.1:9" in text
    assert time.perf_counter() - started < 30
