"""The in-process deploy (transformers): batch profile over batch sizes, batch-size flips,
cold start and memory, with the tiny GPT-2; and the trade-off frame and charts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from kit.cli import main
from kit.metrics import METRICS
from kit.serving.tables import latency_reference, load_curve
from kit.serving.tradeoff import tradeoff_frame
from kit.stages.serving import load_timelines, run_serving

ITEMS = [
    {"id": f"g{i}", "task": "generation", "input": q, "reference": a}
    for i, (q, a) in enumerate(
        [
            ("What is the capital of France?", "Paris."),
            ("Where does the sun rise?", "In the east."),
            ("Say hello.", "Hello!"),
            ("Where is my order?", "Your order is on the way."),
            ("Can I get a refund?", "Yes, we will send a refund."),
            ("What do birds do?", "Birds sing and fly."),
        ]
    )
]


@pytest.fixture(scope="module")
def batched(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("inprocess")
    (root / "eval.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (root / "prompt.jinja").write_text("{{ input }}")
    model = {"runtime": "transformers", "model": str(tiny_model_dir), "batch_size": 4}
    study = {
        "name": "inprocess",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja", "chat": True},
        "sampling": {"temperature": 0.0, "max_new_tokens": 6},
        "serving": {
            "requests": 6,
            "warmup": 2,
            "client_check": False,
            "reference": "concurrency=2",
        },
        "baseline": {
            "name": "tiny",
            **model,
            "serving": {"batch_sizes": [1, 2, 4]},
            "cost": {"usd_per_hour": 0.1},
        },
        "candidates": [
            {"name": "tiny-bf16", **model, "recipe": "bf16", "serving": {"batch_sizes": [1, 4]}}
        ],
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    run = root / "run"
    assert main(["freeze", str(path), "--out", str(run), "--quiet"]) == 0
    return run, run_serving(run, progress=False)


def test_batch_profiles_run_every_size_and_time_every_token(batched):
    run, result = batched
    timeline = load_timelines(run, ["tiny"])
    assert list(dict.fromkeys(timeline["profile"])) == [
        "batch_size=1",
        "batch_size=2",
        "batch_size=4",
    ]
    for profile, g in timeline.groupby("profile"):
        size = int(profile.split("=")[1])
        assert len(g) == 6 and (g["phase"] == "measure").all()
        assert g.groupby("sent_s").size().max() == size  # a batch shares its start
        for rec in g.itertuples():
            assert len(rec.chunk_s) == rec.output_tokens and np.all(np.diff(rec.chunk_s) >= 0)
            assert rec.first_token_s <= rec.last_token_s <= rec.end_s
    record = result.report.models[0]
    assert record.deploy == "transformers" and record.status == "measured"
    assert record.cold_start_s > record.ready_s > 0 and record.peak_rss_mb >= record.base_rss_mb > 0


def test_batch_flips_and_the_unbatched_answers(batched):
    _, result = batched
    flips = result.tables["batch_flips"]
    tiny = flips[flips["model"] == "tiny"].set_index("batched")
    assert list(tiny.index) == ["batch_size=2", "batch_size=4"] and tiny["n"].eq(6).all()
    assert tiny.loc["batch_size=4", "overall"] and not tiny.loc["batch_size=2", "overall"]
    outcomes = result.tables["outcomes"]
    one = outcomes[(outcomes["model"] == "tiny") & (outcomes["profile"] == "batch_size=1")]
    four = outcomes[(outcomes["model"] == "tiny") & (outcomes["profile"] == "batch_size=4")]
    both = one.merge(four, on="item_id", suffixes=("_1", "_4"))
    assert tiny.loc["batch_size=4", "changed"] == (both["output_1"] != both["output_4"]).sum()
    assert tiny.loc["batch_size=4", "flips"] == (both["correct_1"] != both["correct_4"]).sum()
    agreement = result.tables["runtime_agreement"]
    assert set(agreement[agreement["model"] == "tiny"]["profile"]) == {
        "batch_size=1",
        "batch_size=2",
        "batch_size=4",
    }
    assert agreement["n"].eq(6).all()


def test_overall_rows_come_from_the_reference_and_every_metric_is_declared(batched):
    _, result = batched
    ev = result.tables["evidence"]
    assert set(ev["metric"]) <= {n for n, spec in METRICS.items() if spec.stage == "serving"}
    points = result.tables["points"].set_index(["model", "figure"])["profile"]
    assert points[("tiny", "latency (overall rows)")] == "batch_size=2"  # concurrency=2 -> batch 2
    assert pd.isna(points[("tiny-bf16", "latency (overall rows)")])  # no batch size 2 measured
    assert not (
        (ev["model"] == "tiny-bf16") & (ev["slice"] == "overall") & (ev["metric"] == "ttft_p50_ms")
    ).any()
    sync = ev[
        (ev["model"] == "tiny") & (ev["slice"] == "profile") & (ev["slice_value"] == "synchronous")
    ]
    assert "ttft_p50_ms" in set(sync["metric"])  # batch size 1 counts as synchronous
    cand = ev[
        (ev["model"] == "tiny-bf16") & (ev["slice"] == "batch_size") & (ev["slice_value"] == "4")
    ]
    row = cand[cand["metric"] == "throughput_rps"].iloc[0]
    assert row["baseline_value"] > 0 and row["rel_ci_low"] <= row["rel"] <= row["rel_ci_high"]
    emitted = set(ev["metric"])
    for spec in METRICS.values():
        if spec.stage == "serving":
            assert spec.unit and spec.phrases and spec.overall, spec.name
    assert emitted <= {n for n, spec in METRICS.items() if spec.stage == "serving"}


def test_latency_reference_maps_server_profiles_to_batches():
    names = {"batch_size=1", "batch_size=4"}
    assert latency_reference("synchronous", names) == "batch_size=1"
    assert latency_reference("concurrency=4", names) == "batch_size=4"
    assert latency_reference("throughput", names) == "batch_size=4"
    assert latency_reference("concurrency=2", names) is None
    assert latency_reference("concurrency=2", {"concurrency=2"}) == "concurrency=2"


def test_tradeoff_frame_turns_changes_into_gains_and_the_chart_only_draws(batched):
    from kit.report.charts.serving import latency_chart, load_curve_chart, tradeoff_chart

    _, result = batched
    ev = pd.DataFrame(
        [
            {
                "model": "c",
                "slice": "overall",
                "metric": "throughput_rps",
                "baseline_value": 2.0,
                "rel": 1.0,
                "rel_ci_low": 0.5,
                "rel_ci_high": 1.5,
            },
            {
                "model": "c",
                "slice": "overall",
                "metric": "peak_memory_mb",
                "baseline_value": 900.0,
                "rel": -0.4,
                "rel_ci_low": -0.4,
                "rel_ci_high": -0.4,
            },
            {
                "model": "c",
                "slice": "overall",
                "metric": "accuracy_under_load",
                "baseline_value": 0.8,
                "rel": np.nan,
                "rel_ci_low": np.nan,
                "rel_ci_high": np.nan,
                "delta": -0.05,
                "ci_low": -0.12,
                "ci_high": 0.02,
            },
        ]
    )
    frame = tradeoff_frame(ev).set_index("gain")
    assert frame.loc["speed-up", ["gain_value", "gain_low", "gain_high"]].tolist() == [
        2.0,
        1.5,
        2.5,
    ]
    assert frame.loc["memory saving", "gain_value"] == pytest.approx(0.4)
    assert (
        frame.loc["speed-up", "quality_delta"] == -0.05
        and frame.loc["speed-up", "quality_source"] == "stage 5 (under load)"
    )
    stage3 = pd.DataFrame(
        [
            {
                "model": "c",
                "slice": "overall",
                "metric": "accuracy",
                "delta": -0.01,
                "ci_low": -0.03,
                "ci_high": 0.0,
            }
        ]
    )
    assert tradeoff_frame(ev, stage3)["quality_delta"].eq(-0.01).all()
    spec = tradeoff_chart(tradeoff_frame(ev)).to_dict()
    (data,) = spec["datasets"].values()
    assert len(data) == 2 and {r["gain"] for r in data} == {"speed-up", "memory saving"}
    latency_chart(result.tables["latency"]).to_dict()
    load_curve_chart(load_curve(result.tables["latency"], result.tables["throughput"])).to_dict()
