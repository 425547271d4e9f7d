"""Stage 6: router policies, the blended system simulated from per-item outcomes, the
threshold chosen without the judged items, 'accepted with routing rule' and its gate code.

The end-to-end run is a real predictions study (``routing_study``: freeze, candidates,
drill-down, routing, verdict, memo) whose small model errs where it is unsure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import routing_study as rs

from kit.cli import main
from kit.errors import CompkitError
from kit.routing.policies import (
    Abstention,
    AnyOf,
    Cascade,
    ConfidenceBelow,
    ParseFailure,
    SliceRule,
    make_policy,
)
from kit.routing.simulate import (
    apgr,
    blended_outcomes,
    oracle_curve,
    pair_models,
    system_figures,
)
from kit.stats.intervals import proportion_ci, quantile_ci
from kit.verdicts import GATE_EXIT_CODES, ROUTED, gate_decision

# --------------------------------------------------------------------------- policies


def signals(conf, *, parse=None, abstain=None, label=None) -> pd.DataFrame:
    n = len(conf)
    return pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "repeat": 0,
            "task": "classification",
            "mean_token_prob": conf,
            "auto_confidence": conf,
            "parse_failed": parse if parse is not None else [False] * n,
            "abstained": abstain if abstain is not None else [False] * n,
            "label": label if label is not None else ["a"] * n,
        }
    )


def test_policies_route_compose_and_say_what_they_do():
    s = signals(
        [0.9, 0.3, np.nan, 0.7, 0.95],
        parse=[False, False, False, True, False],
        abstain=[False, False, False, False, True],
        label=["a", "a", "a", "a", "fraud"],
    )
    conf = ConfidenceBelow(source="mean_token", threshold=0.5)
    # a missing confidence routes: the router cannot vouch for it
    assert conf.route(s).tolist() == [False, True, True, False, False]
    rule = AnyOf((conf, ParseFailure(), SliceRule(column="label", values=("fraud",))))
    assert rule.route(s).tolist() == [False, True, True, True, True]
    assert Abstention().route(s).tolist() == [False, False, False, False, True]
    assert rule.with_threshold(0.95).route(s).tolist() == [True, True, True, True, True]
    assert rule.describe() == (
        "mean token probability < 0.5, or the answer is not valid JSON / a well-formed tool "
        "call, or every label = fraud"
    )
    with pytest.raises(CompkitError, match="unknown router policy 'nope'"):
        make_policy("nope")
    with pytest.raises(CompkitError, match="in \\[0, 1\\]"):
        ConfidenceBelow(threshold=1.5)
    with pytest.raises(CompkitError, match="lacks"):
        SliceRule(column="channel", values=("chat",)).route(s)


def test_cascade_over_three_models_passes_requests_on_step_by_step():
    a = signals([0.9, 0.2, 0.2, 0.9])
    b = signals([0.1, 0.9, 0.1, 0.1])
    cascade = Cascade(
        models=("tiny", "mid", "big"),
        policies=(ConfidenceBelow(threshold=0.5), ConfidenceBelow(threshold=0.5)),
    )
    assert cascade.final_stage({"tiny": a, "mid": b}).tolist() == [0, 1, 2, 0]
    with pytest.raises(CompkitError, match="one policy per step"):
        Cascade(models=("a", "b", "c"), policies=(ConfidenceBelow(),))


# --------------------------------------------------------------------------- simulation


def toy_pairing(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"i{k:02d}" for k in range(n)]
    small_ok = rng.random(n) < 0.6
    large_ok = rng.random(n) < 0.9
    rows = []
    for model, ok in (("small", small_ok), ("large", large_ok)):
        rows += [
            {
                "model": model,
                "item_id": i,
                "repeat": 0,
                "task": "classification",
                "correct": float(o),
            }
            for i, o in zip(ids, ok, strict=True)
        ]
    outcomes = pd.DataFrame(rows)
    sig = signals(rng.random(n).tolist())
    sig["item_id"] = ids
    lat = {"small": rng.gamma(4, 0.01, n), "large": rng.gamma(4, 0.08, n)}
    costs = pd.concat(
        [
            pd.DataFrame(
                {"model": m, "item_id": ids, "repeat": 0, "latency_s": lat[m], "cost_usd": np.nan}
            )
            for m in lat
        ]
    )
    pairing = pair_models(outcomes, sig, costs, small="small", large="large", baseline="large")
    return pairing, small_ok, large_ok, lat


def test_blended_system_equals_a_hand_count_of_its_requests():
    pairing, small_ok, large_ok, lat = toy_pairing()
    routed = ConfidenceBelow(source="mean_token", threshold=0.4).route(pairing.signals)
    blended = blended_outcomes(pairing, routed, name="sys")
    expected = np.where(routed, large_ok, small_ok).astype(float)
    assert blended["correct"].tolist() == expected.tolist()
    fig = system_figures(pairing, routed)
    assert fig["fallback_rate"] == routed.mean()
    low, high = proportion_ci(int(routed.sum()), len(routed))
    assert (fig["fallback_ci_low"], fig["fallback_ci_high"]) == (low, high)
    # a fallback request pays small + large: the p95 of that mixture, order-statistic CI
    mix = (lat["small"] + routed * lat["large"]) * 1000
    assert (fig["latency_p95_ms"], fig["latency_p95_ci_low"], fig["latency_p95_ci_high"]) == (
        quantile_ci(mix, 0.95)
    )
    assert fig["cost_unit"] == "compute_s"  # no cost: block -> model seconds
    cost = lat["small"] + routed * lat["large"]
    assert fig["cost_per_request"] == pytest.approx(cost.mean())
    assert fig["cost_saving"] == pytest.approx(1 - cost.mean() / lat["large"].mean())
    assert fig["saving_ci_low"] <= fig["cost_saving"] <= fig["saving_ci_high"]
    alone = system_figures(pairing, routed, large_only=True)
    assert alone["cost_saving"] == 0 and alone["fallback_rate"] == 0


def test_oracle_dominates_and_random_routing_recovers_half_the_gap():
    pairing, small_ok, large_ok, _ = toy_pairing(n=60, seed=3)
    oracle = oracle_curve(pairing)
    assert oracle["value"].iloc[0] == pytest.approx(small_ok.mean())
    gain = np.mean(~small_ok & large_ok)
    assert oracle["value"].max() == pytest.approx(small_ok.mean() + gain)
    s, g = small_ok.mean(), large_ok.mean()
    line = pd.DataFrame({"fallback_rate": [0.25, 0.5, 0.75]})
    line["value"] = s + line["fallback_rate"] * (g - s)
    assert apgr(line, small=s, large=g) == pytest.approx(0.5)
    assert apgr(oracle, small=s, large=g) > 0.5
    assert np.isnan(apgr(line, small=0.9, large=0.8))  # no gap to recover


def test_models_on_different_requests_are_refused():
    pairing, *_ = toy_pairing()
    outcomes = pairing.outcomes[
        ~((pairing.outcomes["model"] == "large") & (pairing.outcomes["item_id"] == "i03"))
    ]
    costs = pd.DataFrame(
        {
            "model": "small",
            "item_id": [f"i{k:02d}" for k in range(40)],
            "repeat": 0,
            "latency_s": 0.1,
            "cost_usd": np.nan,
        }
    )
    with pytest.raises(CompkitError, match="'large' has no measured request"):
        pair_models(
            outcomes, pairing.signals, costs, small="small", large="large", baseline="large"
        )


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory) -> Path:
    from kit.stages.drilldown import write_drilldown_tables
    from kit.stages.routing import run_routing
    from kit.verdicts import judge_run

    out = rs.build_run(tmp_path_factory.mktemp("routing"), n=320)
    write_drilldown_tables(out, n_resamples=200, min_n=1)
    run_routing(out)
    judge_run(out)
    return out


def test_rejected_candidate_is_accepted_with_its_routing_rule(routed_run, capsys):
    from kit.verdicts import VerdictReport

    report = VerdictReport.load(routed_run)
    verdicts = report.verdicts_frame().set_index(["candidate", "rule"])["verdict"]
    acc = "accuracy cannot drop by more than 5 points"
    assert verdicts[("small", acc)] == "fail"  # alone it loses about 20 points
    assert verdicts[("small+router", acc)] == "pass"
    assert verdicts[("small+router", "fallback rate must stay under 45 percent")] == "pass"
    (decision,) = report.decisions
    assert decision.candidate == "small" and decision.decision == ROUTED
    assert decision.routed_system == "small+router"
    assert decision.routing_rule.startswith("route to large when confidence < ")
    assert 0 < decision.fallback_rate < 0.45 and decision.cost_saving > 0.3
    assert main(["gate", str(routed_run)]) == 4
    printed = capsys.readouterr().out
    assert "deploy as small+router: route to large when confidence <" in printed
    assert "gate (all candidates): accepted with routing rule -> exit 4" in printed
    assert main(["gate", str(routed_run), "--candidate", "small"]) == 4


def test_threshold_is_chosen_on_calibration_items_and_judged_on_the_others(routed_run):
    from kit.run import Run

    run = Run.open(routed_run)
    rules = run.table("routing_rules").iloc[0]
    curve = run.table("routing_curve")
    assert rules["selection"] == "split" and rules["n_calibration"] + rules["n_judged"] == 320
    evidence = run.table("routing_evidence")
    acc = evidence[(evidence["model"] == "small+router") & (evidence["metric"] == "accuracy")]
    assert int(acc[acc["slice"] == "overall"]["n"].iloc[0]) == rules["n_judged"]
    # the chosen threshold is the cheapest calibration point meeting every rule
    cal = curve[(curve["split"] == "calibration") & (curve["slice"] == "overall")]
    wide = cal.pivot_table(index="threshold", columns="metric", values="value")
    delta = cal[cal["metric"] == "accuracy"].set_index("threshold")["delta"]
    ok = (delta >= -0.05) & (wide["fallback_rate"] < 0.45)
    cheapest = wide.loc[ok[ok].index, "fallback_rate"].min()
    assert wide.loc[rules["threshold"], "fallback_rate"] == cheapest
    assert set(curve["split"]) == {"calibration", "judged"}


def test_changing_judged_items_never_moves_the_threshold(routed_run):
    """The judged items' outcomes are not looked at when choosing: make the small model wrong
    on every held-out item and the chosen threshold stays; only the verdict's evidence moves."""
    from kit.budget.frozen import load_frozen_budget
    from kit.routing.costs import request_costs
    from kit.routing.policies import policy_from_config
    from kit.routing.signals import build_signals
    from kit.routing.sweep import select_threshold, split_items
    from kit.run import Run
    from kit.study import RoutingConfig

    run = Run.open(routed_run)
    cfg = RoutingConfig()
    outcomes = run.outcomes().astype({"item_id": str})
    sig = build_signals(run.outputs(), outcomes, model="small", slices=run.slices())
    costs = request_costs(run, ["small", "large"], timelines=None)
    _, held = split_items(sig, share=cfg.calibration_share, seed=cfg.seed)
    spoiled = outcomes.copy()
    spoiled.loc[(spoiled["model"] == "small") & spoiled["item_id"].isin(held), "correct"] = 0.0
    policy = policy_from_config(cfg, source="auto", tasks=["classification"])
    rules = list(load_frozen_budget(run).rules)
    picks = []
    for frame in (outcomes, spoiled):
        pairing = pair_models(frame, sig, costs, small="small", large="large", baseline="large")
        sel = select_threshold(
            pairing,
            policy,
            rules=rules,
            config=cfg,
            slices=run.slices(),
            slice_columns=["task"],
            metrics=["accuracy"],
        )
        judged = blended_outcomes(sel.judged, sel.routed, name="x")["correct"].mean()
        picks.append((sel.threshold, judged, set(sel.calibration_items) & set(held)))
    assert picks[0][0] == picks[1][0]
    assert picks[1][1] < picks[0][1]
    assert picks[0][2] == set()


def test_crossfit_judges_every_item_out_of_fold(tmp_path):
    from kit.stages.routing import run_routing

    out = rs.build_run(tmp_path, n=160, routing={"selection": "crossfit", "folds": 4})
    result = run_routing(out)
    rule = result.rules.iloc[0]
    assert rule["selection"] == "crossfit" and rule["n_judged"] == 160
    assert "cross-fitted over 4 folds" in rule["selection_note"]
    ev = result.evidence
    n = ev[
        (ev["model"] == "small+router") & (ev["metric"] == "accuracy") & (ev["slice"] == "overall")
    ]
    assert int(n["n"].iloc[0]) == 160


def test_without_a_routing_block_nothing_is_routed(tmp_path):
    from kit.stages.routing import run_routing

    out = rs.build_run(tmp_path, n=40, routed=False)
    result = run_routing(out)
    assert result.rules.empty and "no routing: block" in result.config_source
    assert not (out / "tables" / "routing_evidence.parquet").exists()


def test_bad_routing_settings_are_refused_naming_them(tmp_path):
    from kit.stages.routing import run_routing
    from kit.study import RoutingConfig, load_study

    study = rs.write_study(tmp_path / "s", n=16, routing={"candidates": ["nope"]})
    with pytest.raises(CompkitError, match="routing names model\\(s\\) \\['nope'\\]"):
        load_study(study)
    out = rs.build_run(tmp_path / "r", n=40)
    with pytest.raises(CompkitError, match=r"routing\.slices names column 'tier'"):
        run_routing(out, config=RoutingConfig(slices={"tier": ["gold"]}), write=False)


def test_gate_over_candidates_accepted_alone_or_with_routing():
    frame = pd.DataFrame({"candidate": ["a", "b"], "decision": ["accepted", ROUTED]})
    assert gate_decision(frame) == ROUTED and GATE_EXIT_CODES[ROUTED] == 4
    frame.loc[1, "decision"] = "rejected"
    assert gate_decision(frame) == "rejected"


def test_memo_shows_the_three_systems_side_by_side(routed_run):
    from kit.report.memo import write_memo

    text = write_memo(routed_run).read_text(encoding="utf-8")
    assert 'id="routing"' in text and "Rule to deploy:" in text
    for column in ("large only", "small only", "small+router"):
        assert f"<th>{column}</th>" in text
    assert "accepted with routing rule" in text and "Deploy as small+router" in text
    assert 'id="fig-deferral"' in text and "<script" not in text
    report = json.loads((routed_run / "routing.json").read_text())
    assert report["kind"] == "compkit.routing" and report["rules"][0]["candidate"] == "small"


# --------------------------------------------------------------------------- monitoring


def _reference_log(run_dir: Path) -> pd.DataFrame:
    """What the deployed router would log on the judged items: the rule's own decisions."""
    from kit.routing.monitor import _reference
    from kit.run import Run

    policy, ref, _ = _reference(Run.open(run_dir), "small")
    log = ref.assign(routed=policy.route(ref))
    outcomes = Run.open(run_dir).outcomes()
    small = outcomes[outcomes["model"] == "small"].set_index("item_id")["correct"]
    large = outcomes[outcomes["model"] == "large"].set_index("item_id")["correct"]
    log["correct"] = np.where(log["routed"], large[log["item_id"]], small[log["item_id"]])
    return log


def test_monitor_sees_no_drift_on_the_judged_traffic_and_drift_on_shifted_traffic(
    routed_run, tmp_path, capsys
):
    from kit.routing.monitor import monitor_log

    log = _reference_log(routed_run)
    same = monitor_log(routed_run, log=log).set_index("check")
    assert not same["drifted"].any(), same
    assert same.loc["fallback_rate", "observed"] == same.loc["fallback_rate", "reference"]
    # later traffic the small model is less sure of: more fallback, a shifted distribution
    from kit.routing.monitor import _reference
    from kit.run import Run

    policy = _reference(Run.open(routed_run), "small")[0]
    later = log.assign(auto_confidence=log["auto_confidence"] - 0.25)
    later["routed"] = policy.route(later)
    later["correct"] = 0.0  # and the labelled answers got worse
    shifted = monitor_log(routed_run, log=later).set_index("check")
    assert shifted.loc[["fallback_rate", "confidence_shift", "accuracy"], "drifted"].all()
    # a deployment that does not run the judged rule
    wrong = log.assign(routed=~log["routed"])
    assert monitor_log(routed_run, log=wrong).set_index("check").loc["rule_agreement", "drifted"]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in later.to_dict("records")))
    assert main(["monitor", str(routed_run), "--log", str(path)]) == 1
    assert "monitor: drift -> exit 1" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"routed": true}\nnot json\n')
    assert main(["monitor", str(routed_run), "--log", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl, line 2: not JSON" in capsys.readouterr().err


def test_cascade_over_three_models_is_simulated_request_by_request():
    from kit.routing.simulate import cascade_system

    ids = [f"i{k}" for k in range(4)]
    right = {"tiny": [1, 0, 0, 1], "mid": [0, 1, 0, 0], "big": [1, 1, 1, 0]}
    outcomes = pd.DataFrame(
        [
            {"model": m, "item_id": i, "repeat": 0, "task": "classification", "correct": float(c)}
            for m, cs in right.items()
            for i, c in zip(ids, cs, strict=True)
        ]
    )
    sig = {"tiny": signals([0.9, 0.2, 0.2, 0.9]), "mid": signals([0.1, 0.9, 0.1, 0.1])}
    for s in sig.values():
        s["item_id"] = ids
    seconds = {"tiny": 0.01, "mid": 0.1, "big": 1.0}
    costs = pd.DataFrame(
        [
            {"model": m, "item_id": i, "repeat": 0, "latency_s": t, "cost_usd": np.nan}
            for m, t in seconds.items()
            for i in ids
        ]
    )
    cascade = Cascade(
        models=("tiny", "mid", "big"),
        policies=(ConfidenceBelow(threshold=0.5), ConfidenceBelow(threshold=0.5)),
    )
    system, figures = cascade_system(outcomes, sig, costs, cascade, name="cascade")
    assert figures["served_by"].tolist() == ["tiny", "mid", "big", "tiny"]
    assert system["correct"].tolist() == [1.0, 1.0, 1.0, 1.0]
    # a request pays every model it reached
    assert figures["latency_s"].tolist() == pytest.approx([0.01, 0.11, 1.11, 0.01])
