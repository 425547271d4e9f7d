"""Stage 2 on tiny local models: recipes as candidates, same inputs, skip/force, kill -9 resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kit import cli
from kit.errors import CompkitError
from kit.stages.candidates import CandidateManifest, candidate_summary, run_candidates
from kit.stages.freeze import FrozenInputsChanged, freeze_baseline

ITEMS = [
    {"id": f"c{i}", "task": "classification", "input": text, "label": label}
    for i, (text, label) in enumerate(
        [
            ("where is my parcel", "order_status"),
            ("someone stole my card", "fraud_report"),
            ("cancel it please", "cancel_order"),
            ("has my order shipped", "order_status"),
            ("stop my order now", "cancel_order"),
            ("my refund never came", "refund"),
        ]
    )
] + [
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "Return window?",
        "choices": ["7 days", "30 days"],
        "answer": 1,
    },
    {
        "id": "g1",
        "task": "generation",
        "input": "Apologise for the delay.",
        "reference": "Sorry for the delay.",
    },
]


def make_study(d: Path, model_dir: Path, candidates: list[dict], *, repeats: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (d / "prompt.jinja").write_text(
        "{% if labels %}Intents: {{ labels | join(', ') }}. {% endif %}{{ input }}"
    )
    study = {
        "name": "cands",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 5, "seed": 3},
        "repeats": repeats,
        "baseline": {
            "name": "base",
            "runtime": "transformers",
            "model": str(model_dir),
            "batch_size": 1,
        },
        "candidates": candidates,
    }
    (d / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return d / "study.yaml"


CANDIDATES = [
    {
        "name": "int8",
        "runtime": "transformers",
        "model": "MODEL",
        "recipe": "int8_dynamic",
        "batch_size": 4,
    },
    {
        "name": "pruned50",
        "runtime": "transformers",
        "model": "MODEL",
        "batch_size": 4,
        "recipe": {"name": "prune_magnitude", "params": {"sparsity": 0.5}},
    },
    {
        "name": "bf16",
        "runtime": "transformers",
        "model": "MODEL",
        "recipe": "bf16",
        "batch_size": 4,
    },
]


@pytest.fixture
def frozen_run(tmp_path, tiny_llama_dir):
    cands = [{**c, "model": str(tiny_llama_dir)} for c in CANDIDATES]
    study = make_study(tmp_path / "study", tiny_llama_dir, cands)
    out = tmp_path / "runs" / "r"
    freeze_baseline(study, out, progress=False)
    return study, out


def test_candidates_run_on_the_frozen_inputs(frozen_run):
    _, out = frozen_run
    summary = run_candidates(out, progress=False)
    assert list(summary["candidate"]) == ["bf16", "int8", "pruned50"]
    assert (summary["rows"] == len(ITEMS) * 2).all() and (summary["errors"] == 0).all()
    base = pd.read_parquet(out / "outputs" / "base")
    for name in ("int8", "pruned50", "bf16"):
        rows = pd.read_parquet(out / "outputs" / name)
        assert sorted(zip(rows["item_id"], rows["repeat"], strict=True)) == sorted(
            zip(base["item_id"], base["repeat"], strict=True)
        )
        assert set(rows["seed"]) == set(base["seed"])  # same seed per repeat as the baseline
        cm = CandidateManifest.load(out / "candidates" / f"{name}.json")
        assert cm.footprint["parameters"] > 0 and cm.footprint["size_bytes"] > 0
        assert cm.identity["weights_sha256"] and cm.recipe["name"] in (
            "int8_dynamic",
            "prune_magnitude",
            "bf16",
        )
    sizes = summary.set_index("candidate")["size_mb"]
    base_size = json.loads((out / "manifest.json").read_text())["model"]["size_bytes"] / 1e6
    assert (
        sizes["bf16"] == pytest.approx(base_size / 2, rel=0.05) and sizes["int8"] < 0.6 * base_size
    )
    # loadable folders for the float recipes
    assert (out / "models" / "pruned50" / "config.json").exists() and (
        out / "models" / "bf16"
    ).exists()
    # the pruned candidate's outputs differ from the baseline somewhere (choice probabilities at least)
    pruned = (
        pd.read_parquet(out / "outputs" / "pruned50").set_index(["item_id", "repeat"]).sort_index()
    )
    b = base.set_index(["item_id", "repeat"]).sort_index()
    assert (pruned["output"] != b["output"]).any() or (
        pruned["choice_confidence"] - b["choice_confidence"]
    ).abs().max() > 1e-4
    outcomes = pd.read_parquet(out / "outcomes.parquet")
    assert set(outcomes["model"]) == {"base", "int8", "pruned50", "bf16"}
    assert len(outcomes) == 4 * len(ITEMS) * 2


def test_finished_candidates_are_skipped_unless_forced(frozen_run, capsys):
    _, out = frozen_run
    run_candidates(out, only=["int8"], progress=False)
    parts = sorted((out / "outputs" / "int8").glob("part-*.parquet"))
    stamp = parts[-1].stat().st_mtime_ns
    run_candidates(out, only=["int8"], progress=False)
    assert "already complete, skipped" in capsys.readouterr().out
    assert sorted((out / "outputs" / "int8").glob("part-*.parquet")) == parts
    assert parts[-1].stat().st_mtime_ns == stamp
    run_candidates(out, only=["int8"], force=True, progress=False)
    assert len(pd.read_parquet(out / "outputs" / "int8")) == len(ITEMS) * 2
    with pytest.raises(CompkitError, match=r"--only \['nope'\]: not candidates"):
        run_candidates(out, only=["nope"], progress=False)


def test_candidates_refuse_when_frozen_inputs_changed(frozen_run):
    study, out = frozen_run
    (study.parent / "prompt.jinja").write_text("Changed: {{ input }}")
    with pytest.raises(FrozenInputsChanged, match="CHANGED  prompt template"):
        run_candidates(out, progress=False)
    assert not (out / "outputs" / "int8").exists()
    assert cli.main(["candidates", "--out", str(out), "--quiet"]) == 1


def test_changed_candidate_spec_needs_force(frozen_run):
    study, out = frozen_run
    run_candidates(out, only=["pruned50"], progress=False)
    data = yaml.safe_load(study.read_text())
    data["candidates"][1]["recipe"]["params"]["sparsity"] = 0.6
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(CompkitError, match="changed since its results were stored"):
        run_candidates(out, only=["pruned50"], progress=False)
    run_candidates(out, only=["pruned50"], force=True, progress=False)
    assert (
        CandidateManifest.load(out / "candidates" / "pruned50.json").recipe["params"]["sparsity"]
        == 0.6
    )


def test_kill_9_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, tiny_llama_dir):
    cands = [
        {
            "name": "slow",
            "runtime": "transformers",
            "model": str(tiny_llama_dir),
            "batch_size": 1,
            "recipe": "int8_dynamic",
        }
    ]
    study = make_study(tmp_path / "study", tiny_llama_dir, cands, repeats=6)
    out = tmp_path / "runs" / "k"
    freeze_baseline(study, out, progress=False)
    store = out / "outputs" / "slow"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = "from kit.stages.candidates import run_candidates; import sys; run_candidates(sys.argv[1], progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(store.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_parts = list(store.glob("part-*.parquet"))
    assert len(killed_parts) >= 2, "the run should have been killed after two stored batches"
    before = pd.read_parquet(store)
    expected = len(ITEMS) * 6
    assert len(before) < expected, "killed too late to test resume"
    summary = run_candidates(out, progress=False)
    after = pd.read_parquet(store)
    assert len(after) == int(summary.loc[0, "rows"])
    assert len(after) == expected
    assert not after.duplicated(["item_id", "repeat"]).any()
    keys = set(zip(after["item_id"], after["repeat"], strict=True))
    assert keys == {(it["id"], r) for it in ITEMS for r in range(6)}
    assert set(zip(before["item_id"], before["repeat"], strict=True)) <= keys
    assert len(candidate_summary(out)) == 1
