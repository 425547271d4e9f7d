"""Scorer additions: label aggregates, acc vs acc_norm, review sheets, evaluate modules offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kit.analysis.compare import compare_models
from kit.errors import CompkitError, ValidationError
from kit.evalset import load_eval_set
from kit.metrics import METRICS, MetricSpec, register_metric
from kit.scoring import label_metrics, macro_f1, score_outputs
from kit.scoring.custom import SHIPPED_DIR, evaluate_scorer, shipped_modules
from kit.scoring.review import (
    REVIEW_COLUMNS,
    export_review_sheet,
    import_review_sheet,
    meta_path,
    review_scores,
)
from kit.scoring.tasks import length_normalized_choice

MODULE = SHIPPED_DIR / "exact_match_normalized"


def _eval_set(tmp_path: Path, items: list[dict]):
    path = tmp_path / "e.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8"
    )
    return load_eval_set(path)


def _outputs(rows: list[tuple], **extra_columns) -> pd.DataFrame:
    """rows: (model, item_id, repeat, output)"""
    frame = pd.DataFrame(rows, columns=["model", "item_id", "repeat", "output"]).assign(error=None)
    for name, values in extra_columns.items():
        frame[name] = values
    return frame


# --------------------------------------------------------------------------- classification

CLS = [
    {"id": "a1", "task": "classification", "input": "x", "label": "order_status"},
    {"id": "a2", "task": "classification", "input": "x", "label": "order_status"},
    {"id": "b1", "task": "classification", "input": "x", "label": "refund"},
    {"id": "c1", "task": "classification", "input": "x", "label": "fraud_report"},
    {"id": "g1", "task": "generation", "input": "x", "reference": "hello"},
]
#: m predicts order_status, refund, refund, (nothing) for a1, a2, b1, c1; both repeats alike.
PREDS = {"a1": "order_status", "a2": "refund", "b1": "refund", "c1": "I am not sure", "g1": "hi"}


@pytest.fixture
def cls_outcomes(tmp_path):
    eval_set = _eval_set(tmp_path, CLS)
    rows = [("m", i, r, text) for r in (0, 1) for i, text in PREDS.items()]
    rows += [("perfect", it["id"], 0, it.get("label", "hello")) for it in CLS]
    return eval_set, score_outputs(eval_set, _outputs(rows))


def test_label_metrics_by_hand(cls_outcomes):
    eval_set, outcomes = cls_outcomes
    table = label_metrics(outcomes, eval_set)
    assert list(table.columns) == ["model", "label", "precision", "recall", "f1", "support"]
    m = table[table["model"] == "m"].set_index("label")
    assert list(m.index) == ["fraud_report", "order_status", "refund", "macro"]
    # order_status: 1 of 1 predictions right (P=1), 1 of 2 items found (R=1/2), F1=2/3
    assert m.loc["order_status", ["precision", "recall", "f1"]].tolist() == pytest.approx(
        [1, 0.5, 2 / 3]
    )
    # refund: predicted twice, right once (P=1/2), its one item found (R=1), F1=2/3
    assert m.loc["refund", ["precision", "recall", "f1"]].tolist() == pytest.approx([0.5, 1, 2 / 3])
    # fraud_report: never predicted (P=0 by convention), missed (R=0), F1=0
    assert m.loc["fraud_report", ["precision", "recall", "f1"]].tolist() == [0, 0, 0]
    assert m.loc["macro", ["precision", "recall", "f1"]].tolist() == pytest.approx(
        [0.5, 0.5, 4 / 9]
    )
    # support counts items, not (item, repeat) rows
    assert m["support"].tolist() == [1, 2, 1, 4]
    perfect = table[table["model"] == "perfect"].set_index("label")
    assert perfect.loc["macro", "f1"] == 1.0


def test_macro_f1(cls_outcomes):
    eval_set, outcomes = cls_outcomes
    f1 = macro_f1(outcomes, eval_set).set_index("model")
    assert list(f1.columns) == ["metric", "value", "n"]
    assert f1.loc["m", "value"] == pytest.approx(4 / 9) and f1.loc["m", "n"] == 4
    assert f1.loc["perfect", "value"] == 1.0


def test_registry_entries_for_label_metrics():
    assert METRICS["macro_f1"].kind == "aggregate" and METRICS["macro_f1"].higher_is_better
    assert METRICS["macro_f1"].table == "label_evidence"
    assert METRICS["recall"].tasks == ("classification",)
    assert "rare_label_recall" not in METRICS  # "rare-label recall" is recall on a label slice
    assert METRICS["choice_accuracy_norm"].higher_is_better
    with pytest.raises(CompkitError, match="already registered"):
        register_metric(MetricSpec("accuracy", "mine", False, "scoring"))


# --------------------------------------------------------------------------- acc vs acc_norm

MC = [
    # acc picks the short wrong option, acc_norm the long right one
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "x",
        "choices": ["Paris", "the city of Lyon"],
        "answer": 1,
    },
    # acc right, acc_norm wrong: the short right option has the higher total, the long one the
    # higher score per character
    {
        "id": "m2",
        "task": "multiple_choice",
        "input": "x",
        "choices": ["Nice", "Marseille et environs"],
        "answer": 0,
    },
    # unicode: lengths are characters ("ü" is 1 character, 2 UTF-8 bytes), as in the harness
    {"id": "m3", "task": "multiple_choice", "input": "x", "choices": ["ü", "ab"], "answer": 1},
    {
        "id": "k1",
        "task": "classification",
        "input": "x",
        "label": "refund",
        "labels": ["no", "refund"],
    },
]
CONTINUATIONS = {
    "m1": (" Paris", " the city of Lyon"),
    "m2": (" Nice", " Marseille et environs"),
    "m3": (" ü", " ab"),
    "k1": (" no", " refund"),
}
LOGPROBS = {"m1": [-3.0, -6.0], "m2": [-3.0, -3.5], "m3": [-1.0, -1.9], "k1": [-2.0, -4.0]}


def test_acc_and_acc_norm_differ_on_crafted_logprobs(tmp_path):
    eval_set = _eval_set(tmp_path, MC)
    ids = list(LOGPROBS)
    outputs = _outputs(
        [("m", i, 0, "A") for i in ids],
        choice_logprobs=[LOGPROBS[i] for i in ids],
        choice_pred=[max(range(len(LOGPROBS[i])), key=LOGPROBS[i].__getitem__) for i in ids],
    )
    o = score_outputs(eval_set, outputs, continuations=CONTINUATIONS).set_index("item_id")
    # m1: -3/5 = -0.6 vs -6/16 = -0.375 -> norm picks option 1 (right); acc picks 0 (wrong)
    assert (o.loc["m1", "choice_correct"], o.loc["m1", "choice_correct_norm"]) == (0.0, 1.0)
    # m2: acc picks 0 (-3.0 > -3.5, right); per character -3/4 = -0.75 vs -3.5/21 = -0.167 -> 1
    assert (o.loc["m2", "choice_correct"], o.loc["m2", "choice_correct_norm"]) == (1.0, 0.0)
    # m3: characters: -1/1 = -1.0 vs -1.9/2 = -0.95 -> 1 (bytes would give -0.5 vs -0.95 -> 0)
    assert (o.loc["m3", "choice_correct"], o.loc["m3", "choice_correct_norm"]) == (0.0, 1.0)
    # classification: -2/2 = -1.0 vs -4/6 = -0.667 -> 'refund' (right) only when normalized
    assert (o.loc["k1", "choice_correct"], o.loc["k1", "choice_correct_norm"]) == (0.0, 1.0)
    # the generated letter is scored separately ('A' is wrong for m1, m2)
    assert o.loc["m1", "correct"] == 0.0
    assert length_normalized_choice([-4.0, -3.9], ["Nice", "Marseille et environs"]) == 1
    assert length_normalized_choice([-4.0, -4.1], ["Nice", "Marseille et environs"]) == 1
    assert length_normalized_choice([-1.0, -30.0], ["Nice", "Marseille et environs"]) == 0
    assert length_normalized_choice(None, ["a"]) is None
    assert length_normalized_choice([-1.0], ["a", "b"]) is None


def test_acc_norm_needs_continuations(tmp_path):
    eval_set = _eval_set(tmp_path, MC)
    outputs = _outputs([("m", "m1", 0, "B")], choice_logprobs=[[-3.0, -6.0]], choice_pred=[0])
    o = score_outputs(eval_set, outputs)
    assert "choice_correct_norm" not in o.columns and o.loc[0, "choice_correct"] == 0.0
    failed = outputs.assign(error="timed out")
    f = score_outputs(eval_set, failed, continuations=CONTINUATIONS)
    assert "choice_correct_norm" not in f.columns and f.loc[0, "correct"] == 0.0


# --------------------------------------------------------------------------- review sheets


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_drilldown import build_run

    return build_run(tmp_path_factory.mktemp("review"))


def test_review_sheet_round_trip(run_dir, tmp_path):
    path = export_review_sheet(run_dir, candidate="q4", path=tmp_path / "review.csv")
    sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(sheet.columns) == REVIEW_COLUMNS
    assert sheet["item_id"].tolist() == ["g1", "g2"]  # generation items, eval-set order
    g1 = sheet.iloc[0]
    assert (g1["reference"], g1["baseline_output"], g1["candidate_output"]) == (
        "Sorry for the delay.",
        "Sorry for the delay.",
        "No.",
    )
    assert (sheet[["score_baseline", "score_candidate"]] == "").all().all()
    meta = json.loads(meta_path(path).read_text())
    assert (meta["baseline"], meta["candidate"], meta["scale"], meta["repeat"]) == (
        "base",
        "q4",
        "0-5",
        0,
    )
    assert meta["kit"]["version"] and meta["eval_set_sha256"]

    sheet.loc[0, ["score_baseline", "score_candidate", "notes"]] = ["5", "1", "curt"]
    sheet.loc[1, "score_baseline"] = "4.5"  # candidate left blank: not reviewed
    sheet.to_csv(path, index=False)
    scores = import_review_sheet(path)
    assert scores[["model", "item_id", "repeat", "raw_score", "human_score"]].values.tolist() == [
        ["base", "g1", 0, 5.0, 1.0],
        ["q4", "g1", 0, 1.0, 0.2],
        ["base", "g2", 0, 4.5, 0.9],
    ]
    assert scores.loc[1, "notes"] == "curt" and scores.attrs["scale"] == "0-5"

    from kit.run import Run
    from kit.stages.candidates import write_outcomes

    # review scores join the run's one outcome table (re-written once, read by every stage)
    write_outcomes(Run.open(run_dir), sources=[review_scores(scores)])
    outcomes = Run.open(run_dir).outcomes()
    human = outcomes.set_index(["model", "item_id", "repeat"])["human_score"]
    assert human[("q4", "g1", 0)] == 0.2 and pd.isna(human[("q4", "g1", 1)])
    assert human.notna().sum() == 3
    table = compare_models(
        outcomes, baseline="base", candidates="q4", metrics=["human_score"], n_resamples=50
    )
    assert table.loc[0, ["delta", "n"]].tolist() == pytest.approx([-0.8, 1])  # g2 has no pair


def test_review_sheet_bad_values_name_row_and_column(run_dir, tmp_path):
    path = export_review_sheet(run_dir, candidate="q4", path=tmp_path / "r.csv", scale="0-1")
    sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
    sheet.loc[0, "score_candidate"] = "abc"
    sheet.loc[1, "score_baseline"] = "3"  # off the 0-1 scale
    sheet.loc[1, "score_candidate"] = "0.5"
    sheet.to_csv(path, index=False)
    with pytest.raises(ValidationError) as err:
        import_review_sheet(path)
    problems = {(p.row, p.field) for p in err.value.problems}
    assert problems == {(2, "score_candidate"), (3, "score_baseline")}
    assert "'abc' is not a score on the 0-1 scale" in str(err.value)
    # the same cells read on the 0-5 scale: only 'abc' is wrong
    with pytest.raises(ValidationError, match=r"row 2, field 'score_candidate'"):
        import_review_sheet(path, scale="0-5")
    sheet.drop(columns=["score_baseline"]).to_csv(path, index=False)
    with pytest.raises(ValidationError, match=r"row 1, field 'score_baseline': column missing"):
        import_review_sheet(path)
    pd.concat([sheet, sheet.iloc[[0]]]).assign(score_candidate="").to_csv(path, index=False)
    with pytest.raises(ValidationError, match=r"row 4, field 'item_id': item 'g1' repeats row 2"):
        import_review_sheet(path)
    with pytest.raises(CompkitError, match="review scale"):
        import_review_sheet(path, scale="1-10")


def test_review_sheet_without_sidecar_uses_roles(tmp_path):
    path = tmp_path / "loose.csv"
    pd.DataFrame(
        [{c: "" for c in REVIEW_COLUMNS} | {"item_id": "g1", "score_candidate": "0"}]
    ).to_csv(path, index=False)
    scores = import_review_sheet(path, candidate="q4")
    assert scores[["model", "human_score"]].values.tolist() == [["q4", 0.0]]


# --------------------------------------------------------------------------- evaluate modules

GEN = [
    {"id": "g1", "task": "generation", "input": "x", "reference": "Sorry for the delay."},
    {"id": "g2", "task": "generation", "input": "x", "reference": "Thank you!"},
    {
        "id": "c1",
        "task": "classification",
        "input": "x",
        "label": "refund",
        "labels": ["refund", "no"],
    },
]

OFFLINE_SCRIPT = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
from kit.scoring.custom import evaluate_scorer
out = []
for target in sys.argv[1:]:  # the shipped name, then the module folder
    scorer = evaluate_scorer(target, task="generation", metric_name="exact_match_normalized",
                             higher_is_better=True)
    out.append([scorer.item_value("  SORRY for the delay!", "Sorry for the delay."),
                scorer.item_value("Sorry.", "Sorry for the delay."), scorer.info.description])
print(json.dumps(out))
"""


def test_evaluate_module_loads_offline_from_the_local_path(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, "exact_match_normalized", str(MODULE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for same, different, description in json.loads(done.stdout.strip().splitlines()[-1]):
        assert (same, different) == (1.0, 0.0)
        assert description.startswith("``exact_match_normalized`` is the share")
    assert any((tmp_path / "modules").rglob("exact_match_normalized.py"))  # loaded via evaluate


def test_evaluate_module_as_a_scorer(tmp_path):
    assert "exact_match_normalized" in shipped_modules()
    scorer = evaluate_scorer(
        MODULE, task="generation", metric_name="exact_match_normalized", higher_is_better=True
    )
    assert METRICS["exact_match_normalized"].higher_is_better
    assert METRICS["exact_match_normalized"].tasks == ("generation",)
    eval_set = _eval_set(tmp_path, GEN)
    outputs = _outputs(
        [
            ("base", "g1", 0, "sorry for the delay"),
            ("base", "g2", 0, "Thank you!"),
            ("base", "c1", 0, "refund"),
            ("q4", "g1", 0, "Sorry for the wait."),
            ("q4", "g2", 0, "thank   YOU"),
            ("q4", "c1", 0, "refund"),
        ]
    )
    outputs.loc[4, "error"] = "timed out"  # q4/g2 failed: no value, as for chrF
    o = score_outputs(eval_set, outputs, sources=[scorer])
    values = o.set_index(["model", "item_id"])["exact_match_normalized"]
    assert values[("base", "g1")] == 1.0 and values[("base", "g2")] == 1.0
    assert values[("q4", "g1")] == 0.0 and pd.isna(values[("q4", "g2")])
    assert pd.isna(values[("base", "c1")])  # other tasks are not scored
    table = compare_models(o, baseline="base", metrics=["exact_match_normalized"], n_resamples=50)
    assert table.loc[0, ["delta", "n"]].tolist() == [-1.0, 1]
    # loading twice with the same metadata is fine; a different direction is a clash
    evaluate_scorer(
        MODULE, task="generation", metric_name="exact_match_normalized", higher_is_better=True
    )
    with pytest.raises(CompkitError, match="already registered"):
        evaluate_scorer(
            MODULE, task="generation", metric_name="exact_match_normalized", higher_is_better=False
        )


def test_evaluate_scorer_refuses_hub_names_and_bad_keys(tmp_path):
    with pytest.raises(CompkitError, match="never from the Hub"):
        evaluate_scorer("bleu", task="generation", metric_name="bleu_x", higher_is_better=True)
    with pytest.raises(CompkitError, match="task 'poetry'"):
        evaluate_scorer(MODULE, task="poetry", metric_name="em_x", higher_is_better=True)
    with pytest.raises(CompkitError, match="result_key"):
        evaluate_scorer(
            MODULE, task="generation", metric_name="em_y", higher_is_better=True, result_key="f1"
        )
    assert "em_y" not in METRICS
