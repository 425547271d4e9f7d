"""The one metric registry: everything a stage emits is registered, everything registered is
emitted by the stage it names, and every budget phrase resolves to it.

The emitted side is measured on a real run: the demo eval set (all six tasks, with a
perturbation suite) with the predictions runtime (a baseline that answers every item right, a
candidate that gets some wrong), through stages 1-4, the robustness stage and the verdict, in
process. Token-level metrics need logits (the predictions runtime has none): their
registration is checked, their emission is tested in ``tests/test_robustness_models.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kit.budget.grammar import parse_rule
from kit.evalset import label_set, load_eval_set
from kit.metrics import METRICS, REQUIRES_SUITE, STAGES, UNITS, metric, metric_for_column
from kit.perturb import build_perturbed
from kit.run import Run
from kit.study import PerturbationsConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "support"
#: Stages this test runs; the others (serving, routing) are checked by name only.
RUN_HERE = ("scoring", "comparison", "calibration", "robustness")
SUITE = ["typos", "injection"]


def right_answer(item) -> str:
    if item.task == "classification":
        return item.label
    if item.task == "multiple_choice":
        return "ABCDEFGH"[item.answer]
    if item.task == "extraction":
        return json.dumps(item.fields)
    if item.task == "refusal":
        return "I can't help with that request." if item.should_refuse else "Sure: here it is."
    if item.task == "tool_call":
        return json.dumps({"tool": item.expected_tool, "arguments": item.expected_args})
    return item.reference or ""


def predictions(eval_set, *, wrong_every: int | None) -> list[dict]:
    rows = []
    derived = build_perturbed(eval_set, PerturbationsConfig(suite=SUITE)).items.items
    for i, item in enumerate([*eval_set.items, *derived]):
        output = right_answer(item)
        broken = wrong_every is not None and i % wrong_every == 0
        if broken:
            output = "not sure" if item.task != "extraction" else '{"order_id": '
        row = {"id": item.id, "output": output}
        if item.task in ("classification", "multiple_choice"):
            options = label_set(eval_set, item) if item.task == "classification" else item.choices
            k = len(options)
            right = options.index(item.label) if item.task == "classification" else item.answer
            probs = [0.4 / max(k - 1, 1)] * k
            probs[right] = 0.6
            if broken:
                probs = list(reversed(probs))
            row["choice_probs"] = probs
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    from kit.stages.calibration import write_calibration_tables
    from kit.stages.candidates import run_candidates
    from kit.stages.drilldown import write_drilldown_tables
    from kit.stages.freeze import freeze_baseline
    from kit.stages.robustness import write_robustness_tables
    from kit.verdicts import judge_run

    root = tmp_path_factory.mktemp("registry")
    eval_set = load_eval_set(DEMO / "support_eval.jsonl")
    for name, wrong in (("base", None), ("cand", 7)):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in predictions(eval_set, wrong_every=wrong))
        )
    (root / "budget.yaml").write_text(
        yaml.safe_dump({"rules": [{"rule": "accuracy cannot drop by more than 5 points"}]})
    )
    study = {
        "name": "registry",
        "eval_set": {"path": str(DEMO / "support_eval.jsonl")},
        "prompt": {"template": str(DEMO / "prompts" / "support.jinja")},
        "baseline": {"name": "base", "runtime": "predictions", "model": "base.jsonl"},
        "candidates": [{"name": "cand", "runtime": "predictions", "model": "cand.jsonl"}],
        "budget": "budget.yaml",
        "perturbations": {"suite": SUITE},
    }
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    out = root / "run"
    freeze_baseline(root / "study.yaml", out, progress=False)
    run_candidates(out, progress=False)
    write_drilldown_tables(out, n_resamples=100)
    write_calibration_tables(out, n_resamples=100)
    write_robustness_tables(out, n_resamples=100)
    judge_run(out)
    return Run.open(out)


def emitted(run: Run) -> set[str]:
    """Metric names in every table a stage wrote, and the metric columns of the outcomes."""
    names: set[str] = set()
    for path in run.tables_dir.glob("*.parquet"):
        frame = pd.read_parquet(path)
        if "metric" in frame.columns:
            names |= set(frame["metric"].dropna().astype(str))
    for column in run.outcomes().columns:
        spec = metric_for_column(column)
        if spec is not None:
            names.add(spec.name)
    return names - {"flip"}


def test_every_emitted_metric_is_registered(run):
    unknown = sorted(emitted(run) - set(METRICS))
    assert not unknown, f"emitted but not registered (so not judgeable): {unknown}"


def test_every_registered_metric_of_these_stages_is_emitted(run):
    names = emitted(run)
    for spec in METRICS.values():
        if spec.stage not in RUN_HERE or (spec.requires and spec.requires != REQUIRES_SUITE):
            continue
        assert spec.name in names, f"{spec.name} ({spec.stage}) is registered but not emitted"


def test_budget_phrases_name_one_metric_each():
    owners: dict[str, set[str]] = {}
    for spec in METRICS.values():
        for phrase in (spec.name.replace("_", " "), *spec.phrases):
            owners.setdefault(phrase.lower().replace("-", " "), set()).add(spec.name)
    assert {p: o for p, o in owners.items() if len(o) > 1} == {}
    # a plural names the singular's metric ('truncated answers' once meant server-cut streams)
    plurals = {p: (owners[p], owners[p + "s"]) for p in owners if p + "s" in owners}
    assert {p: o for p, o in plurals.items() if o[0] != o[1]} == {}


def test_every_registered_metric_names_its_stage_table_unit_and_phrase():
    for spec in METRICS.values():
        assert spec.stage in STAGES and spec.unit in UNITS, spec
        assert spec.table and spec.description
        where = " for rare labels" if spec.name == "recall" else ""  # recall names a label slice
        text = f"{spec.name.replace('_', ' ')}{where} must not get worse"
        assert parse_rule(text).metric == spec.name
        for phrase in spec.phrases:
            assert parse_rule(f"{phrase}{where} must not get worse").metric == spec.name, phrase
    assert metric("correct").name == "accuracy"  # an outcome column resolves too


def test_evidence_rows_name_their_methods_and_level(run):
    from kit.verdicts import gather_evidence

    evidence = gather_evidence(run)
    assert (evidence["confidence"] == 0.95).all()
    for col in ("value_method", "delta_method", "rel_method"):
        present = evidence[col].dropna()
        assert set(present) <= {
            "clopper_pearson",
            "tango_cc",
            "tang_cc",
            "tango_cc_gap",
            "bca_bootstrap",
            "cluster_bootstrap_t",
            "bounded_zero_change",
        }, col
    binary = evidence[evidence["metric"] == "json_parse_failure"]
    assert set(binary["delta_method"]) == {"tango_cc"}
    assert set(evidence.loc[evidence["metric"] == "chrf", "delta_method"]) <= {
        "bca_bootstrap",
        "bounded_zero_change",
    }
