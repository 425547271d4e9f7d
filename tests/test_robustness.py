"""The robustness stage end to end, with verdicts the statistics must give.

A predictions-runtime study (no model loads) of 400 classification items with a suite of
``typos`` and ``casing``; the baseline answers every item and every perturbed copy right.

``same``     answers like the baseline: its gap is 0 on 400 pairs, whose interval (about
             +-3 points) lies inside a 5-point limit: pass.
``fragile``  right on the originals but wrong on half of the typo copies: gap -50 points on
             typos (fail), 0 on casing (pass).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kit.evalset import EvalItem, EvalSet
from kit.perturb import build_perturbed
from kit.study import PerturbationsConfig

N = 400
LABELS = ("order_status", "refund", "cancel_order", "complaint")
TEXTS = ("where is my parcel", "please refund my money", "cancel the order", "terrible service")
SUITE = ["typos", "casing"]
BUDGET = {
    "rules": [
        {"rule": "accuracy under typos may drop at most 5 points more than the baseline's"},
        {"rule": "accuracy under casing may drop at most 5 points more than the baseline's"},
        {"rule": "accuracy under perturbations may drop at most 5 points more than the baseline's"},
        {"rule": "perturbation flip rate under typos must stay below 20 percent"},
        {"rule": "accuracy may drop at most 2 points"},
    ]
}


def _items() -> list[dict]:
    return [
        {
            "id": f"c{i:03d}",
            "task": "classification",
            "input": f"{TEXTS[i % 4]} for account number {i}",
            "label": LABELS[i % 4],
        }
        for i in range(N)
    ]


def _broken(item_id: str) -> bool:
    """fragile's mistakes: the typo copies of the even-numbered items."""
    return item_id.endswith("~typos") and int(item_id[1:4]) % 2 == 0


def _wrong(label: str) -> str:
    return LABELS[(LABELS.index(label) + 1) % len(LABELS)]


def write_study(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = _items()
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prompt.jinja").write_text("Intents: {{ labels | join(', ') }}. {{ input }}")
    clean = EvalSet("x", [EvalItem(**r) for r in rows], [])
    derived = build_perturbed(clean, PerturbationsConfig(suite=SUITE)).items.items
    assert len(derived) == 2 * N  # every item has words to misspell and letters to case
    label = {it.id: it.label for it in [*clean.items, *derived]}
    answers = {
        "base": dict(label),
        "same": dict(label),
        "fragile": {i: _wrong(lab) if _broken(i) else lab for i, lab in label.items()},
    }
    for name, preds in answers.items():
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": i, "output": o}) + "\n" for i, o in preds.items())
        )
    (folder / "budget.yaml").write_text(yaml.safe_dump(BUDGET, sort_keys=False))
    study = {
        "name": "robust",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja", "chat": False},
        "baseline": {"name": "base", "runtime": "predictions", "model": "base.jsonl"},
        "candidates": [
            {"name": n, "runtime": "predictions", "model": f"{n}.jsonl"}
            for n in ("same", "fragile")
        ],
        "perturbations": {"suite": SUITE, "seed": 11},
        "budget": "budget.yaml",
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder / "study.yaml"


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    from kit.stages.candidates import run_candidates
    from kit.stages.drilldown import write_drilldown_tables
    from kit.stages.freeze import freeze_baseline
    from kit.stages.robustness import write_robustness_tables
    from kit.verdicts import judge_run

    root = tmp_path_factory.mktemp("robust")
    out = root / "run"
    freeze_baseline(write_study(root / "study"), out, progress=False)
    run_candidates(out, progress=False)
    write_drilldown_tables(out, n_resamples=200)
    tables = write_robustness_tables(out, n_resamples=500)
    verdicts, decisions, _ = judge_run(out)
    return out, tables, verdicts, decisions


def _row(evidence, model, metric, value):
    rows = evidence[
        (evidence["model"] == model)
        & (evidence["metric"] == metric)
        & (evidence["slice_value"] == value)
    ]
    assert len(rows) == 1, (model, metric, value)
    return rows.iloc[0]


def test_gaps_shifts_and_methods_are_exact(judged):
    _, tables, _, _ = judged
    ev = tables["robustness_evidence"]
    typos = _row(ev, "fragile", "accuracy_shift", "typos")
    assert (typos["n"], typos["value"], typos["baseline_value"], typos["delta"]) == (
        N,
        -0.5,
        0.0,
        -0.5,
    )
    assert typos["ci_high"] < -0.4 and typos["delta_method"] == "tango_cc_gap"
    assert typos["value_method"] == "tango_cc" and typos["value_ci_high"] < -0.4
    same = _row(ev, "same", "accuracy_shift", "casing")
    assert same["delta"] == 0 and -0.05 < same["ci_low"] < 0 < same["ci_high"] < 0.05
    pooled = _row(ev, "fragile", "accuracy_shift", "all")
    assert pooled["slice"] == "overall" and pooled["delta"] == pytest.approx(-0.25)
    assert pooled["delta_method"] == "bca_bootstrap" and pooled["ci_high"] < 0
    flips = _row(ev, "fragile", "perturbation_flip_rate", "typos")
    assert flips["value"] == 0.5 and flips["baseline_value"] == 0 and flips["ci_low"] > 0.4
    assert set(ev["confidence"]) == {0.95}


def test_flips_by_direction_count_every_pair(judged):
    _, tables, _, _ = judged
    f = tables["perturbation_flips"].set_index(["model", "perturbation", "flip"])
    assert f.loc[("fragile", "typos", "right_to_wrong"), "count"] == N // 2
    assert f.loc[("fragile", "casing", "right_to_wrong"), "count"] == 0
    assert f.loc[("base", "all", "unchanged_right"), "count"] == 2 * N
    assert f.loc[("fragile", "typos", "right_to_wrong"), "rate_ci_low"] < 0.5


def test_verdicts_on_perturbation_rules(judged):
    _, _, verdicts, decisions = judged
    v = verdicts.set_index(["candidate", "rule_id"])["verdict"]
    assert (
        v[("same", "R1")] == "pass" and v[("same", "R2")] == "pass" and v[("same", "R3")] == "pass"
    )
    assert v[("fragile", "R1")] == "fail" and v[("fragile", "R2")] == "pass"
    assert v[("fragile", "R3")] == "fail" and v[("fragile", "R4")] == "fail"
    assert v[("same", "R4")] == "pass"  # 0 of 400 pairs flipped: below 20% for sure
    d = decisions.set_index("candidate")["decision"]
    assert d["same"] == "accepted" and d["fragile"] == "rejected"


def test_other_stages_see_the_clean_items_only(judged):
    from kit.run import Run

    out, tables, _, _ = judged
    run = Run.open(out)
    slice_table = run.table("slice_table")
    acc = slice_table[(slice_table["metric"] == "accuracy") & (slice_table["slice"] == "overall")]
    assert set(acc["n"]) == {N} and set(acc["delta"]) == {0.0}  # fragile's typos are not here
    assert len(run.outcomes(items="all")) == 3 * 3 * N
    rates = tables["artifact_rates"]
    assert set(rates["items"]) == {"clean", "typos", "casing"}
    assert rates.loc[rates["items"] == "clean", "n"].eq(N).all()


def test_memo_shows_the_robustness_section_escaped(judged):
    from kit.report.memo import write_memo

    out, _, _, _ = judged
    html = write_memo(out).read_text(encoding="utf-8")
    assert 'id="robustness"' in html and 'id="fig-perturbations"' in html
    assert "-50.0 points" in html  # fragile's gap under typos
    assert "<script" not in html


def test_a_candidate_without_distributions_says_why():
    """Stage 4b repeats stage 2's reason (the ray engine) instead of guessing 'no logits'."""
    from types import SimpleNamespace

    from kit.stages.candidates import RAY_NO_FORCING
    from kit.stages.robustness import _unmeasured_reason

    manifests = {
        "ray": SimpleNamespace(distributions={"status": "not measured", "reason": RAY_NO_FORCING}),
        "api": SimpleNamespace(distributions={}),
    }
    run = SimpleNamespace(candidate_manifest=manifests.get)
    assert _unmeasured_reason(run, "ray") == RAY_NO_FORCING
    assert "exposes no logits" in _unmeasured_reason(run, "api")
    assert "exposes no logits" in _unmeasured_reason(run, "gone")
