"""The load generator against the fake server: schedules, bounds, error classes, goodput,
a server dying mid-profile, and every figure re-derived from the stored timelines."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from kit.errors import CompkitError
from kit.runtimes.base import Prompt
from kit.runtimes.openai import OpenAIRuntime, run_coroutine
from kit.serving.client import LoadClient
from kit.serving.endpoint import (
    EndpointPlan,
    EndpointTarget,
    PromptSet,
    client_ceiling,
    run_endpoint,
)
from kit.serving.fake import FakeServer
from kit.serving.latency import (
    error_table,
    latency_table,
    per_request,
    throughput_table,
    variant_table,
)
from kit.serving.load import ProfileSpec, arrival_times, run_profile, sweep_rates
from kit.study import ModelSpec, SamplingConfig, ServingConfig, SLOConfig


def prompts(n: int = 12, marker: str = "") -> dict[str, Prompt]:
    return {
        f"q{i:02d}": Prompt(messages=({"role": "user", "content": f"question {i} {marker}"},))
        for i in range(n)
    }


def target(url: str, *, max_new_tokens: int = 8) -> EndpointTarget:
    spec = ModelSpec(
        name="m",
        runtime="openai",
        model="fake-model",
        endpoint=url,
        options={"logprobs": False, "max_retries": 0},
    )
    return EndpointTarget(
        OpenAIRuntime(spec), SamplingConfig(max_new_tokens=max_new_tokens), max_new_tokens=None
    )


def run_one(
    url: str,
    spec: ProfileSpec,
    texts: list[str],
    *,
    timeout_s: float = 10.0,
    max_duration_s: float = 30.0,
    alive=None,
):
    tgt = target(url)
    requests = [
        tgt.request(k, f"q{k}", "measure", Prompt(messages=({"role": "user", "content": t},)))
        for k, t in enumerate(texts)
    ]

    async def go():
        async with LoadClient(
            timeout_s=timeout_s, max_connections=max(1, spec.concurrency)
        ) as client:
            return await run_profile(
                client, spec, requests, max_duration_s=max_duration_s, alive=alive
            )

    return run_coroutine(go)


def overlap(records) -> int:
    """Most requests in flight at once, from the records' send and end times."""
    events = sorted(
        [(r.sent_s, 1) for r in records] + [(r.end_s, -1) for r in records],
        key=lambda e: (e[0], e[1]),
    )
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


@pytest.fixture(scope="module")
def slow_fake():
    with FakeServer(tokens=6, ttft_s=0.03, itl_s=0.01) as fake:
        yield fake


def test_synchronous_and_concurrency_keep_their_in_flight_counts(slow_fake):
    sync = run_one(slow_fake.url, ProfileSpec.synchronous(), ["a"] * 6)
    assert overlap(sync.records) == 1 and sync.stopped_by == "count"
    assert all(
        r.status == "ok" and r.output_tokens == 6 and len(r.chunk_s) == 6 for r in sync.records
    )
    conc = run_one(slow_fake.url, ProfileSpec.concurrent(3), ["a"] * 9)
    assert overlap(conc.records) == 3
    assert conc.request_rate() > 1.8 * sync.request_rate()  # the fake server overlaps requests


def test_open_loop_sends_on_schedule(slow_fake):
    run = run_one(slow_fake.url, ProfileSpec.at_rate(20.0), ["a"] * 8)
    sent = np.array([r.sent_s for r in run.records])
    scheduled = np.array([r.scheduled_s for r in run.records])
    assert np.allclose(scheduled, np.arange(8) / 20.0)
    lag = sent - scheduled
    assert np.all(lag >= -1e-3) and np.median(lag) < 0.02 and lag.max() < 0.25
    assert overlap(run.records) >= 2  # each answer takes ~80 ms, arrivals are 50 ms apart
    a, b = (arrival_times(50, 5.0, poisson=True, seed=s) for s in (1, 1))
    assert np.array_equal(a, b) and a[0] == 0 and np.all(np.diff(a) > 0)
    assert abs(np.mean(np.diff(a)) - 0.2) < 0.08


def test_sweep_rates_follow_guidellm():
    assert sweep_rates(1.0, 3.0, 5) == pytest.approx([5 / 3, 7 / 3, 3.0])
    assert sweep_rates(2.0, 2.0, 3) == [2.0]
    with pytest.raises(CompkitError, match="no successful request"):
        sweep_rates(0.0, 0.0, 5)


def test_time_bound_stops_sending(slow_fake):
    run = run_one(slow_fake.url, ProfileSpec.synchronous(), ["a"] * 200, max_duration_s=0.5)
    assert run.stopped_by == "time" and 2 <= len(run.records) < 200 and run.wall_s < 2


def test_every_fault_gets_its_class(slow_fake):
    texts = ["fine", "#error500", "#error429", "#drop", "#hang", "#truncate", "#done", "#error400"]
    start = time.monotonic()
    run = run_one(slow_fake.url, ProfileSpec.concurrent(8), texts, timeout_s=1.5)
    assert time.monotonic() - start < 6  # the hung request ends at its deadline
    got = {texts[r.index]: (r.status, r.error_class, r.interrupted) for r in run.records}
    assert got == {
        "fine": ("ok", None, False),
        "#error500": ("error", "http_5xx", False),
        "#error429": ("error", "http_4xx", False),
        "#error400": ("error", "http_4xx", False),
        "#drop": ("error", "connection", False),
        "#hang": ("error", "timeout", False),
        "#truncate": ("error", "truncated_stream", False),
        "#done": ("error", "truncated_stream", True),
    }
    frame = run.frame(model="m")
    errors = error_table(frame)
    assert dict(zip(errors["error_class"], errors["n"], strict=True)) == {
        "http_5xx": 1,
        "http_4xx": 2,
        "connection": 1,
        "timeout": 1,
        "truncated_stream": 2,
    }
    thr = throughput_table(frame).set_index("metric")["value"]
    assert thr["error_rate_under_load"] == pytest.approx(7 / 8)
    assert thr["timeout_rate"] == pytest.approx(1 / 8) and thr["interrupted_rate"] == pytest.approx(
        1 / 8
    )


def test_goodput_counts_slow_and_failed_requests_as_misses(slow_fake):
    texts = ["ok"] * 6 + ["#slow=0.3"] * 3 + ["#error500"]
    frame = run_one(slow_fake.url, ProfileSpec.synchronous(), texts).frame(model="m")
    thr = throughput_table(frame, slo=SLOConfig(ttft_ms=200)).set_index("metric")
    assert thr.loc["goodput_share", "value"] == pytest.approx(6 / 10)
    window = thr.loc["window_s", "value"]
    assert thr.loc["goodput_rps", "value"] == pytest.approx(6 / window)
    assert thr.loc["throughput_rps", "value"] == pytest.approx(9 / window)
    lo, hi = thr.loc["goodput_share", ["ci_low", "ci_high"]]
    assert lo < 0.6 < hi  # Clopper-Pearson
    both = throughput_table(frame, slo=SLOConfig(ttft_ms=200, e2e_ms=1)).set_index("metric")
    assert both.loc["goodput_share", "value"] == 0.0  # nothing ends within 1 ms


def test_percentiles_are_rederived_from_the_stored_timelines(slow_fake, tmp_path):
    texts = [f"t{i} #slow={0.002 * i:.3f}" for i in range(15)]
    frame = run_one(slow_fake.url, ProfileSpec.concurrent(2), texts).frame(model="m")
    path = tmp_path / "timeline.parquet"
    frame.to_parquet(path, index=False)
    stored = pd.read_parquet(path)
    ok = stored[stored["status"] == "ok"]
    ttft = (ok["first_token_s"] - ok["sent_s"]).to_numpy()
    e2e = (ok["end_s"] - ok["sent_s"]).to_numpy()
    out = ok["output_tokens"].to_numpy()
    tpot = (e2e - ttft) / (out - 1)
    itl = np.concatenate([np.diff(np.asarray(c)) for c in ok["chunk_s"]])
    lat = latency_table(stored).set_index(["metric", "stat"])
    for metric, values in (("ttft_ms", ttft), ("e2e_ms", e2e), ("tpot_ms", tpot), ("itl_ms", itl)):
        for q in (50, 90, 95, 99):
            assert lat.loc[(metric, f"p{q}"), "value_ms"] == pytest.approx(
                np.quantile(values, q / 100) * 1e3
            )
        assert lat.loc[(metric, "mean"), "value_ms"] == pytest.approx(values.mean() * 1e3)
    p50 = lat.loc[("ttft_ms", "p50")]
    assert p50["ci_low"] <= p50["value_ms"] <= p50["ci_high"] and math.isfinite(p50["ci_high"])
    assert math.isinf(lat.loc[("ttft_ms", "p99"), "ci_high"])  # 15 requests cannot bound a p99
    variants = variant_table(stored).set_index(["tool", "metric", "stat"])["value"]
    assert variants[("vllm", "ttft_ms", "p50")] == pytest.approx(
        np.percentile((ok["first_chunk_s"] - ok["sent_s"]), 50) * 1e3
    )
    events = np.concatenate([np.diff(np.asarray(c)) for c in ok["event_s"]])
    assert variants[("vllm", "itl_ms", "mean")] == pytest.approx(events.mean() * 1e3)
    g_itl = ((ok["last_token_s"] - ok["first_token_s"]) / (out - 1)).to_numpy()
    assert variants[("guidellm", "inter_token_latency_ms", "mean")] == pytest.approx(
        np.average(g_itl, weights=out - 1) * 1e3
    )
    reqs = per_request(stored)
    assert reqs["tpot_s"].to_numpy() == pytest.approx(tpot)


def test_a_dying_server_aborts_the_profile_and_the_plan():
    with FakeServer(tokens=4, ttft_s=0.01, die_after=5) as fake:
        tgt = target(fake.url)
        cfg = ServingConfig(
            profiles=["synchronous", "concurrency"], concurrency=[2], requests=8, warmup=1
        )
        plan = EndpointPlan(
            "m",
            cfg,
            PromptSet.from_frozen(prompts(), seed=0),
            progress=False,
            alive=lambda: fake.server.death_message(),
        )
        start = time.monotonic()
        runs = run_endpoint(tgt, plan)
        took = time.monotonic() - start
    assert took < 10 and len(runs) == 1  # concurrency=2 never started
    run = runs[0]
    assert run.stopped_by == "aborted" and "exited with code 1" in run.aborted
    assert sum(r.status == "ok" for r in run.records) == 5
    assert all(r.error_class == "connection" for r in run.records if r.status != "ok")


def test_prompt_sets_share_one_order_and_split_by_length():
    ps = PromptSet.from_frozen({f"i{k}": Prompt(text="x" * (k + 1)) for k in range(9)}, seed=3)
    assert ps.measured(4) == list(ps.ids[:4]) and ps.warmup(2, after=4) == list(ps.ids[4:6])
    assert ps.measured(11)[9:] == list(ps.ids[:2])  # cycles
    assert ps.by_length("short", 3) == ["i0", "i1", "i2"]
    assert ps.by_length("longest", 3) == ["i6", "i7", "i8"]
    assert ps.by_length("long", 3) == ["i5", "i6", "i7"]
    assert PromptSet.from_frozen(ps.prompts, seed=3).ids == ps.ids


def test_the_whole_plan_runs_every_profile_kind(slow_fake):
    cfg = ServingConfig(
        profiles=["synchronous", "concurrency", "rate_sweep", "prompt_length", "synthetic"],
        concurrency=[2],
        requests=4,
        warmup=1,
        sweep_size=4,
        max_concurrency=4,
        synthetic={"prompt_tokens": 16, "output_tokens": 4},
    )
    runs = run_endpoint(
        target(slow_fake.url),
        EndpointPlan("m", cfg, PromptSet.from_frozen(prompts(), seed=0), progress=False),
    )
    names = [r.spec.name for r in runs]
    assert names[:3] == ["synchronous", "concurrency=2", "throughput"]
    rates = [r.spec.rate for r in runs if r.spec.kind == "constant"]
    sync, peak = runs[0].request_rate(), runs[2].request_rate()
    assert rates == pytest.approx([float(f"{r:.4g}") for r in sweep_rates(sync, peak, 4)], rel=1e-3)
    assert [n for n in names if n.startswith("prompt_length")] == [
        "prompt_length=short",
        "prompt_length=long",
        "prompt_length=longest",
    ]
    syn = next(r for r in runs if r.spec.name == "synthetic=16/4")
    assert all(r.output_tokens == 4 for r in syn.measured)
    assert len(syn.measured[0].output) > 0
    for run in runs:
        assert len(run.measured) == 4 and len(run.records) - len(run.measured) == 1


def test_client_ceiling_is_far_above_a_real_cpu_server():
    result = client_ceiling(concurrency=4, requests=200)
    assert result["ok"] == 200 and result["ceiling_rps"] > 50


def test_eval_requests_carry_each_items_schema_and_token_limit(slow_fake):
    """Served as deployed: an extraction item's request asks for its JSON schema
    (response_format) and its task's token limit; a fixed serving.max_new_tokens wins."""
    schema = {"type": "object", "properties": {"date": {"type": "string"}}}
    ps = PromptSet.from_frozen(
        {"cls": Prompt(text="intent?"), "ext": Prompt(text="slots?")},
        seed=0,
        schemas={"ext": schema},
        limits={"cls": 8, "ext": 64},
    )
    reqs = {r.item_id: r for r in target(slow_fake.url).eval_requests(["cls", "ext"], [], ps)}
    assert reqs["ext"].payload["max_tokens"] == 64 and reqs["cls"].payload["max_tokens"] == 8
    assert reqs["ext"].payload["response_format"]["json_schema"]["schema"] == schema
    assert "response_format" not in reqs["cls"].payload
    spec = ModelSpec(name="m", runtime="openai", model="f", endpoint=slow_fake.url)
    fixed = EndpointTarget(OpenAIRuntime(spec), SamplingConfig(max_new_tokens=8), max_new_tokens=5)
    assert {r.payload["max_tokens"] for r in fixed.eval_requests(["cls", "ext"], [], ps)} == {5}
