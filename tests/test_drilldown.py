"""Stage 3 drill-down: compute glue on crafted frames, a tiny real run, the explorer, notebook 03.

The tiny run is real (``freeze_baseline`` + ``run_candidates``) but uses the predictions
runtime, so its outputs are crafted: candidate ``q4`` breaks c1, m1 and g1 (right->wrong),
``q8`` fixes c4 (wrong->right). No model is loaded; building it takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kit.analysis.compare import RESULT_COLUMNS, compare_models
from kit.analysis.slices import DISCOVERY_COLUMNS
from kit.errors import CompkitError
from kit.evalset import load_eval_set
from kit.stages.drilldown import (
    FAILING_COLUMNS,
    drilldown_frames,
    failing_examples,
    load_run_outcomes,
    parse_slice,
    read_drilldown_tables,
    run_models,
    side_by_side,
    write_drilldown_tables,
)

ROOT = Path(__file__).resolve().parent.parent
ITEMS = [
    {
        "id": "c1",
        "task": "classification",
        "input": "where is my parcel",
        "label": "order_status",
        "channel": "email",
    },
    {
        "id": "c2",
        "task": "classification",
        "input": "has it shipped yet",
        "label": "order_status",
        "channel": "chat",
    },
    {
        "id": "c3",
        "task": "classification",
        "input": "my refund never came",
        "label": "refund",
        "channel": "email",
    },
    {
        "id": "c4",
        "task": "classification",
        "input": "someone stole my card",
        "label": "fraud_report",
        "channel": "chat",
    },
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "Return window?",
        "choices": ["7 days", "thirty days"],
        "answer": 1,
        "channel": "email",
    },
    {
        "id": "m2",
        "task": "multiple_choice",
        "input": "Capital of France?",
        "choices": ["Paris", "Lyon"],
        "answer": 0,
        "channel": "chat",
    },
    {
        "id": "g1",
        "task": "generation",
        "input": "Apologise for the delay.",
        "reference": "Sorry for the delay.",
        "channel": "email",
    },
    {
        "id": "g2",
        "task": "generation",
        "input": "Say thanks.",
        "reference": "Thank you very much!",
        "channel": "chat",
    },
]
BASE = {
    "c1": "order_status",
    "c2": "order_status",
    "c3": "refund",
    "c4": "refund",
    "m1": "B",
    "m2": "A",
    "g1": "Sorry for the delay.",
    "g2": "Thank you very much!",
}
# classification options are the sorted labels: fraud_report, order_status, refund
PROBS = {
    "c1": [0.1, 0.8, 0.1],
    "c2": [0.1, 0.8, 0.1],
    "c3": [0.1, 0.1, 0.8],
    "c4": [0.3, 0.1, 0.6],
    "m1": [0.3, 0.7],
    "m2": [0.9, 0.1],
}
CANDIDATES = {
    "q4": ({"c1": "refund", "m1": "A", "g1": "No."}, {"c1": [0.1, 0.2, 0.7], "m1": [0.7, 0.3]}),
    "q8": ({"c4": "fraud_report"}, {"c4": [0.7, 0.1, 0.2]}),
}


def _predictions(path: Path, outputs: dict, probs: dict, repeats: int) -> None:
    rows = [
        {"id": i, "output": text, "repeat": r, **({"choice_probs": probs[i]} if i in probs else {})}
        for r in range(repeats)
        for i, text in outputs.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_run(root: Path, *, repeats: int = 2) -> Path:
    """Freeze the crafted baseline and run both crafted candidates; returns the run folder."""
    from kit.stages.candidates import run_candidates
    from kit.stages.freeze import freeze_baseline

    study_dir = root / "study"
    study_dir.mkdir(parents=True)
    (study_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (study_dir / "prompt.jinja").write_text(
        "{% if labels %}Intents: {{ labels | join(', ') }}. {% endif %}{{ input }}"
    )
    _predictions(study_dir / "base.jsonl", BASE, PROBS, repeats)
    for name, (changes, probs) in CANDIDATES.items():
        _predictions(study_dir / f"{name}.jsonl", {**BASE, **changes}, {**PROBS, **probs}, repeats)
    study = {
        "name": "drill",
        "eval_set": {"path": "eval.jsonl", "rare_label_threshold": 0.3},
        "prompt": {"template": "prompt.jinja", "chat": False, "choice_labels": "text"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8, "seed": 3},
        "repeats": repeats,
        "baseline": {"name": "base", "runtime": "predictions", "model": "base.jsonl"},
        "candidates": [
            {"name": n, "runtime": "predictions", "model": f"{n}.jsonl"} for n in CANDIDATES
        ],
    }
    (study_dir / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    out = root / "runs" / "drill"
    freeze_baseline(study_dir / "study.yaml", out, progress=False)
    run_candidates(out, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("drill"))


# --------------------------------------------------------------------------- crafted frames


def planted(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Baseline always right with two repeats; q4 flips 70% on language=de & channel=email."""
    rng = np.random.default_rng(seed)
    ids = [f"i{i:04d}" for i in range(n)]
    slices = pd.DataFrame(
        {
            "id": ids,
            "task": "classification",
            "language": rng.choice(["de", "en"], n),
            "channel": rng.choice(["email", "chat"], n),
            "label_rarity": None,
            "label": None,
            "prompt_tokens": 10,
        }
    )
    hot = ((slices["language"] == "de") & (slices["channel"] == "email")).to_numpy()
    flip = rng.random(n) < np.where(hot, 0.7, 0.0)
    frames = []
    for model, values, repeats in (("base", np.ones(n), 2), ("q4", np.where(flip, 0.0, 1.0), 1)):
        for r in range(repeats):
            frames.append(
                pd.DataFrame(
                    {
                        "model": model,
                        "item_id": ids,
                        "repeat": r,
                        "task": "classification",
                        "pred": np.where(values == 1, "right", "wrong"),
                        "correct": values,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True), slices


def test_drilldown_frames_on_a_planted_slice():
    outcomes, slices = planted()
    tables = drilldown_frames(outcomes, slices, baseline="base", n_resamples=200, seed=1, min_n=20)
    assert list(tables.frames()) == [
        "overall_deltas",
        "slice_table",
        "flips",
        "flip_evidence",
        "label_evidence",
        "noise_floor",
        "worst_slices",
        "discovered_slices",
        "label_metrics",
    ]
    direct = compare_models(outcomes, baseline="base", n_resamples=200, seed=1)
    point = ["model", "metric", "value", "baseline_value", "delta", "n", "p_value"]
    pd.testing.assert_frame_equal(
        tables.overall_deltas[point], direct[point]
    )  # compare_models' numbers
    assert list(tables.slice_table.columns) == RESULT_COLUMNS
    assert set(tables.slice_table["slice"]) == {"overall", "task", "language", "channel"}
    flips = tables.flips.set_index(["slice", "slice_value", "flip"])["count"]
    hot = ((slices["language"] == "de") & (slices["channel"] == "email")).sum()
    broken = int((outcomes.query("model == 'q4'")["correct"] == 0).sum())
    assert flips[("overall", "all", "right_to_wrong")] == broken
    assert flips[("overall", "all", "wrong_to_right")] == 0
    assert flips[("language", "en", "right_to_wrong")] == 0  # flips only in the planted slice
    assert 0.5 * hot < broken <= hot
    # the baseline agrees with itself: a zero noise floor
    floor = tables.noise_floor.query("slice == 'overall' and metric == 'accuracy'")
    assert floor["delta"].tolist() == [0.0] and floor["flip_rate"].tolist() == [0.0]
    worst = tables.worst_slices
    assert worst.iloc[0][["slice", "slice_value"]].tolist() in (
        ["language", "de"],
        ["channel", "email"],
    )
    assert bool(worst.iloc[0]["clear_drop"])
    found = tables.discovered_slices
    assert list(found.columns) == ["model", "metric", *DISCOVERY_COLUMNS]
    rates = tables.flip_evidence.set_index(["model", "slice", "slice_value"])
    assert rates.loc[("q4", "overall", "all"), "value"] == broken / len(slices)
    assert rates.loc[("q4", "overall", "all"), "value_method"] == "clopper_pearson"
    assert found.iloc[0]["slice"] == "language=de & channel=email"
    assert found.iloc[0]["n"] == hot and found.iloc[0]["flips"] == broken
    assert tables.label_metrics.empty  # no eval set given


def test_parse_slice_reads_discovered_slices():
    assert parse_slice("channel=email & language=de") == {"channel": "email", "language": "de"}
    assert parse_slice({"language": "de"}) == {"language": "de"}
    assert parse_slice(None) == {}
    with pytest.raises(CompkitError, match="column=value"):
        parse_slice("language")


def test_side_by_side_shows_the_output_that_has_the_flipped_outcome(tmp_path):
    path = tmp_path / "e.jsonl"
    items = [
        {
            "id": "a",
            "task": "classification",
            "input": "where is my parcel",
            "label": "order_status",
            "channel": "email",
        },
        {
            "id": "b",
            "task": "classification",
            "input": "refund please",
            "label": "refund",
            "channel": "chat",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    eval_set = load_eval_set(path)
    texts = {  # (model, item, repeat) -> output; the candidate is right on a's repeat 0 only
        ("base", "a", 0): "order_status",
        ("base", "a", 1): "order_status",
        ("base", "a", 2): "refund",
        ("q4", "a", 0): "order_status",
        ("q4", "a", 1): "refund <b>bold</b>",
        ("q4", "a", 2): "refund",
        ("base", "b", 0): "refund",
        ("base", "b", 1): "refund",
        ("base", "b", 2): "refund",
        ("q4", "b", 0): "refund",
        ("q4", "b", 1): "refund",
        ("q4", "b", 2): "refund",
    }
    outputs = pd.DataFrame(
        [
            {"model": m, "item_id": i, "repeat": r, "output": t, "error": None}
            for (m, i, r), t in texts.items()
        ]
    )
    from kit.scoring import score_outputs

    outcomes = score_outputs(eval_set, outputs)
    slices = pd.DataFrame({"id": ["a", "b"], "channel": ["email", "chat"]})
    out = side_by_side(outcomes, outputs, eval_set, baseline="base", candidate="q4", slices=slices)
    assert list(out.columns) == FAILING_COLUMNS
    row = out.iloc[0]
    assert (row["item_id"], row["flip"], row["reference"]) == (
        "a",
        "right_to_wrong",
        "order_status",
    )
    # majority over repeats: baseline right (repeat 0 shown), candidate wrong (repeat 1 shown as is)
    assert (
        row["baseline_output"] == "order_status" and row["candidate_output"] == "refund <b>bold</b>"
    )
    assert row["input"] == "where is my parcel"
    only = side_by_side(
        outcomes,
        outputs,
        eval_set,
        baseline="base",
        candidate="q4",
        slices=slices,
        slice="channel=chat",
    )
    assert only.empty and "channel" in only.columns
    with pytest.raises(CompkitError, match="not in the slices frame"):
        side_by_side(
            outcomes,
            outputs,
            eval_set,
            baseline="base",
            candidate="q4",
            slices=slices,
            slice="tier=gold",
        )


# --------------------------------------------------------------------------- a real tiny run


def test_run_outcomes_include_acc_norm_and_failing_examples(run_dir):
    assert run_models(run_dir) == ("base", ["q4", "q8"])
    outcomes = load_run_outcomes(run_dir)
    assert {"choice_correct", "choice_correct_norm", "chrf"} <= set(outcomes.columns)
    mc = outcomes[outcomes["task"] == "multiple_choice"]
    assert mc["choice_correct_norm"].notna().all()
    failing = failing_examples(run_dir, candidate="q4", outcomes=outcomes)
    assert failing["item_id"].tolist() == ["c1", "g1", "m1"]
    g1 = failing.set_index("item_id").loc["g1"]
    assert (g1["baseline_output"], g1["candidate_output"], g1["reference"]) == (
        "Sorry for the delay.",
        "No.",
        "Sorry for the delay.",
    )
    assert failing.set_index("item_id").loc["m1", "reference"] == "B) thirty days"
    email = failing_examples(
        run_dir, candidate="q4", slice="channel=email & task=classification", outcomes=outcomes
    )
    assert email["item_id"].tolist() == ["c1"] and email["channel"].tolist() == ["email"]
    assert failing_examples(run_dir, candidate="q8", outcomes=outcomes).empty
    assert len(failing_examples(run_dir, candidate="q4", k=1, outcomes=outcomes)) == 1


def test_write_drilldown_tables(run_dir):
    tables = write_drilldown_tables(run_dir, n_resamples=100, seed=3, min_n=1)
    folder = run_dir / "tables"
    stored = read_drilldown_tables(run_dir)
    for name, frame in tables.frames().items():
        pd.testing.assert_frame_equal(getattr(stored, name), frame, check_dtype=False, obj=name)
    meta = json.loads((folder / "drilldown.json").read_text())
    assert meta["parameters"]["n_resamples"] == 100 and meta["baseline"] == "base"
    assert meta["candidates"] == ["q4", "q8"] and meta["kit"]["version"]
    labels = tables.label_metrics.set_index(["model", "label"])
    assert labels.loc[("q8", "macro"), "f1"] == 1.0
    assert labels.loc[("base", "refund"), "precision"] == 0.5  # c3 right, c4 wrongly 'refund'


def test_slice_explorer_updates_chart_and_examples(run_dir):
    pytest.importorskip("ipywidgets")
    from kit.report.widgets import slice_explorer
    from kit.stages.drilldown import write_drilldown_tables

    outcomes = load_run_outcomes(run_dir)
    tables = write_drilldown_tables(run_dir, n_resamples=50)
    explorer = slice_explorer(run_dir, tables=tables, outcomes=outcomes).explorer
    assert (explorer.candidate.value, explorer.metric.value) == ("q4", "accuracy")
    spec = explorer._slice_chart.spec
    assert spec["params"][0]["name"] == "slice_pick"  # a click on a slice reaches Python
    assert "c1" in explorer.table.value
    explorer.column.value = "channel"
    explorer.pick_slice("chat")
    explorer.flips.value = "right_to_wrong"
    assert "slice channel=chat" in explorer.status.value
    explorer.candidate.value = "q8"
    explorer.metric.value = "chrf"
    assert "of q8 on chrf" in explorer.status.value
    assert explorer._slice_chart.spec["params"][0]["name"] == "slice_pick"


@pytest.mark.notebooks
def test_notebook_03_writes_the_drilldown_tables(run_dir, tmp_path):
    import papermill as pm

    executed = tmp_path / "03.ipynb"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "03_slice_drilldown.ipynb"),
        str(executed),
        parameters={"run": str(run_dir), "n_resamples": 200, "seed": 1, "min_n": 1},
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        kernel_name="python3",
    )
    assert executed.exists()
    folder = run_dir / "tables"
    meta = json.loads((folder / "drilldown.json").read_text())
    assert meta["parameters"] == {
        "metric": "accuracy",
        "n_resamples": 200,
        "seed": 1,
        "min_n": 1,
        "k": 10,
        "confidence": 0.95,
    }
    overall = pd.read_parquet(folder / "overall_deltas.parquet").set_index(["model", "metric"])
    assert overall.loc[("q4", "accuracy"), "delta"] == pytest.approx(-3 / 8)
    assert overall.loc[("q8", "accuracy"), "delta"] == pytest.approx(1 / 8)
    flips = pd.read_parquet(folder / "flips.parquet").query(
        "slice == 'overall' and metric == 'accuracy'"
    )
    counts = flips.set_index(["model", "flip"])["count"]
    assert counts[("q4", "right_to_wrong")] == 3 and counts[("q8", "wrong_to_right")] == 1
    worst = pd.read_parquet(folder / "worst_slices.parquet")
    # ranked by the interval bound nearest zero: the slice of all 8 items has the narrowest
    # interval, email (q4 breaks 3 of its 4 items) comes next; on 8 items no drop is certain
    q4 = worst[worst["model"] == "q4"][["slice", "slice_value"]].values.tolist()
    assert q4[:2] == [["length_bucket", "<64"], ["channel", "email"]]
    assert not worst["clear_drop"].any()
    found = pd.read_parquet(folder / "discovered_slices.parquet")
    assert set(found["model"]) == {"q4"}  # q8 has no right->wrong flip
    assert len(pd.read_parquet(folder / "noise_floor.parquet")) > 0  # two repeats
    for name, info in meta["files"].items():
        assert len(pd.read_parquet(folder / name)) == info["rows"]
