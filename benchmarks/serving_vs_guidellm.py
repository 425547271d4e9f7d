"""compkit's load generator against GuideLLM 0.8.1: the same llama.cpp server, the same prompts.

Starts one ``llama_cpp.server`` with the SmolLM2 Q4_1 GGUF (kit's
:class:`~kit.serving.servers.LlamaCppServer`, ``--n-threads`` threads) and, for two prompt
sets, runs each tool synchronously and at concurrency 4 on the identical list of chat
requests (same messages, same ``max_tokens``, temperature 0, streamed):

* ``synthetic``: prompts of 128 tokens by the server's tokenizer, 64 output tokens at most
  (llama-cpp-python cannot ignore EOS, so both tools see the same, possibly shorter, answers);
* ``demo``: the demo study's rendered prompts (system + user turn), its 48 output tokens.

GuideLLM reads the requests from a JSONL file (``messages``) with its backend's
``max_tokens`` and, in its request body, ``max_tokens`` again and temperature 0
(llama-cpp-python reads ``max_tokens``, not the ``max_completion_tokens`` GuideLLM sends for
chat). No ``output_tokens_count`` column: with one GuideLLM adds ``ignore_eos``, which
llama-cpp-python ignores, and then reports the requested count as the output tokens (the
server sends no usage in a stream), which distorts its ITL and TPOT. Each case warms the
server, then runs the tools ``--rounds`` times in ABBA order (compkit, GuideLLM, GuideLLM,
compkit) and averages each tool's runs, so slow drift of a shared machine hits both alike. Printed per case and tool: requests/s (GuideLLM: its
``requests_per_second`` mean; compkit: successful requests / measured window), TTFT median
and p95, ITL median (compkit's pooled chunk gaps, and the GuideLLM-style per-request mean
that GuideLLM reports), and the ratios compkit / GuideLLM. Goal: req/s and TTFT median within
5 %.

Then both tools against an instant fake server (:class:`~kit.serving.fake.FakeServer`, 16
token chunks per answer) at 32 requests in flight: each one's request ceiling. The fake
server runs in its own process; on a 2-core machine the figures include its share.

The last line holds the req/s and TTFT-median ratios. Run under ``flock /tmp/bench.lock``.

Usage::

    .venv/bin/python benchmarks/serving_vs_guidellm.py [--requests 16] [--n-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kit.models import builtin_gguf_path, ensure_builtin  # noqa: E402
from kit.runtimes.openai import run_coroutine  # noqa: E402
from kit.serving.client import LoadClient, RequestSpec  # noqa: E402
from kit.serving.deploy import endpoint_runtime  # noqa: E402
from kit.serving.endpoint import EndpointTarget  # noqa: E402
from kit.serving.fake import FakeServer  # noqa: E402
from kit.serving.latency import variant_table  # noqa: E402
from kit.serving.load import ProfileSpec, run_profile  # noqa: E402
from kit.serving.servers import LlamaCppServer  # noqa: E402
from kit.study import SamplingConfig  # noqa: E402

MODEL = "smollm2"
DEMO = ROOT / "data" / "demo" / "study.yaml"


# ---------------------------------------------------------------------------- prompts


def synthetic_messages(url: str, n: int, tokens: int) -> list[list[dict[str, str]]]:
    spec_rt = endpoint_runtime(_spec(), url, MODEL, timeout_s=60)
    try:
        target = EndpointTarget(spec_rt, SamplingConfig(), max_new_tokens=None)
        texts = target.synthetic_prompts(n, tokens, seed=0)
    finally:
        spec_rt.close()
    return [[{"role": "user", "content": p.text}] for p in texts]


def demo_messages(n: int) -> tuple[list[list[dict[str, str]]], int]:
    from kit.stages.freeze import prepare

    study, eval_set, builder, _ = prepare(DEMO)
    prompts = [builder.render(item) for item in list(eval_set)[:n]]
    return [list(p.messages or ()) for p in prompts], study.sampling.max_new_tokens


def _spec():
    from kit.study import ModelSpec

    return ModelSpec(name="bench", runtime="openai", model=MODEL, endpoint="http://127.0.0.1:1")


def body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---------------------------------------------------------------------------- the two tools


def run_compkit(
    url: str, bodies: list[dict[str, Any]], concurrency: int, *, max_duration_s: float = 600
) -> dict[str, float]:
    specs = [
        RequestSpec(k, f"r{k}", "measure", f"{url}/v1/chat/completions", b)
        for k, b in enumerate(bodies)
    ]
    profile = ProfileSpec.synchronous() if concurrency == 1 else ProfileSpec.concurrent(concurrency)

    async def go():
        async with LoadClient(timeout_s=600, max_connections=concurrency) as client:
            return await run_profile(client, profile, specs, max_duration_s=max_duration_s)

    cpu = time.process_time()
    run = run_coroutine(go)
    cpu = time.process_time() - cpu
    frame = run.frame(model="compkit")
    ok = frame[frame["status"] == "ok"]
    ttft = (ok["first_token_s"] - ok["sent_s"]).to_numpy() * 1e3
    gaps = np.concatenate([np.diff(np.asarray(c)) for c in ok["chunk_s"] if len(c) > 1]) * 1e3
    variants = variant_table(frame).set_index(["tool", "metric", "stat"])["value"]
    return {
        "req_s": run.request_rate(),
        "ttft_median_ms": float(np.median(ttft)),
        "ttft_p95_ms": float(np.quantile(ttft, 0.95)),
        "itl_median_ms": float(np.median(gaps)) if gaps.size else float("nan"),
        "itl_guidellm_ms": float(variants[("guidellm", "inter_token_latency_ms", "p50")]),
        "ok": len(ok),
        "requests": len(frame),
        "output_tokens": float(pd.to_numeric(ok["output_tokens"]).mean()),
        "client_cpu_ms": cpu / max(1, len(frame)) * 1e3,
    }


def run_guidellm(
    url: str,
    bodies: list[dict[str, Any]],
    profile: str,
    tokenizer: Path,
    work: Path,
    *,
    max_duration_s: float | None = None,
) -> dict[str, float]:
    data = work / f"data-{time.monotonic_ns()}.jsonl"
    data.write_text("".join(json.dumps({"messages": b["messages"]}) + "\n" for b in bodies))
    out = work / f"guidellm-{time.monotonic_ns()}.json"
    backend = {
        "kind": "openai_http",
        "target": url,
        "model": MODEL,
        "validate_backend": False,
        "timeout": 600,
        "max_tokens": bodies[0]["max_tokens"],  # sent as max_completion_tokens
        "extras": {"body": {"temperature": 0.0, "max_tokens": bodies[0]["max_tokens"]}},
    }
    cmd = [
        str(Path(sys.executable).with_name("guidellm")),
        "run",
        "--backend",
        json.dumps(backend),
        "--profile",
        profile,
        "--constraint",
        f"kind=max_requests,count={len(bodies)}",
        "--data",
        f"kind=json_file,path={data}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console",
    ]
    if max_duration_s is not None:
        cmd[cmd.index("--data") : cmd.index("--data")] = [
            "--constraint",
            f"kind=max_duration,seconds={max_duration_s:g}",
        ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"guidellm failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]

    def ok(name: str) -> dict[str, Any]:
        return metrics[name]["successful"]

    return {
        "req_s": ok("requests_per_second")["mean"],
        "ttft_median_ms": ok("time_to_first_token_ms")["median"],
        "ttft_p95_ms": ok("time_to_first_token_ms")["percentiles"]["p95"],
        "itl_median_ms": float("nan"),  # GuideLLM keeps no per-gap list
        "itl_guidellm_ms": ok("inter_token_latency_ms")["median"],
        "ok": ok("request_latency")["count"],
        "requests": sum(
            metrics["request_latency"][k]["count"] for k in ("successful", "errored", "incomplete")
        ),
        "output_tokens": ok("output_token_count")["mean"],
        "client_cpu_ms": cpu / max(1, len(bodies)) * 1e3,  # start-up included
    }


# ---------------------------------------------------------------------------- cases


def warm(url: str, bodies: list[dict[str, Any]]) -> None:
    run_compkit(url, bodies[:2], 1)


def compare(
    args: argparse.Namespace, url: str, tokenizer: Path, work: Path
) -> list[tuple[str, dict, dict]]:
    synthetic = [body(m, 64) for m in synthetic_messages(url, args.requests, 128)]
    demo_msgs, demo_max = demo_messages(args.requests)
    demo = [body(m, demo_max) for m in demo_msgs]
    cases = []
    for set_name, bodies in (("synthetic 128/64", synthetic), ("demo prompts", demo)):
        for concurrency in (1, 4):
            profile = (
                "kind=synchronous" if concurrency == 1 else f"kind=concurrent,streams={concurrency}"
            )
            warm(url, bodies)
            mine, theirs = [], []
            for r in range(args.rounds):  # ABBA: compkit, GuideLLM, GuideLLM, compkit, ...
                for tool in ("compkit", "guidellm")[:: 1 if r % 2 == 0 else -1]:
                    if tool == "compkit":
                        mine.append(run_compkit(url, bodies, concurrency))
                    else:
                        theirs.append(run_guidellm(url, bodies, profile, tokenizer, work))
            label = (
                f"{set_name}, {'synchronous' if concurrency == 1 else f'concurrency {concurrency}'}"
            )
            cases.append((label, _mean(mine), _mean(theirs)))
            print_case(label, cases[-1][1], cases[-1][2])
    return cases


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def print_case(label: str, mine: dict, theirs: dict) -> None:
    print(f"\n{label}")
    print(
        f"  {'tool':<10}{'req/s':>8}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>9}{'ITL/req p50':>13}"
        f"{'ok':>5}{'out tok':>9}{'client CPU ms/req':>19}"
    )
    for name, m in (("compkit", mine), ("GuideLLM", theirs)):
        print(
            f"  {name:<10}{m['req_s']:>8.3f}{m['ttft_median_ms']:>10.1f}{m['ttft_p95_ms']:>10.1f}"
            f"{m['itl_median_ms']:>9.1f}{m['itl_guidellm_ms']:>13.1f}{m['ok']:>5.0f}{m['output_tokens']:>9.1f}"
            f"{m['client_cpu_ms']:>19.1f}"
        )
    print(
        f"  ratio compkit/GuideLLM: req/s {mine['req_s'] / theirs['req_s']:.3f}, "
        f"TTFT median {mine['ttft_median_ms'] / theirs['ttft_median_ms']:.3f}, "
        f"TTFT p95 {mine['ttft_p95_ms'] / theirs['ttft_p95_ms']:.3f}, "
        f"ITL (per-request mean) median {mine['itl_guidellm_ms'] / theirs['itl_guidellm_ms']:.3f}",
        flush=True,
    )


def server_affinity(pid: int) -> list[int] | None:
    import psutil

    return psutil.Process(pid).cpu_affinity()


def ceiling(
    args: argparse.Namespace, tokenizer: Path, work: Path, cores: list[int] | None
) -> tuple[float, float]:
    import psutil

    n, c = args.ceiling_requests, 32
    with FakeServer(tokens=16, model=MODEL) as fake:
        if cores and args.pin:
            psutil.Process(fake.server.pid).cpu_affinity(cores)  # where the real server ran
        bodies = [body([{"role": "user", "content": f"hi {k}"}], 16) for k in range(n)]
        run_compkit(fake.url, bodies[:200], c)  # warm-up
        mine = run_compkit(fake.url, bodies, c, max_duration_s=20)
        theirs = run_guidellm(
            fake.url,
            bodies,
            f"kind=throughput,max_concurrency={c}",
            tokenizer,
            work,
            max_duration_s=20,
        )
    print(
        f"\nclient ceiling against an instant fake server (16 chunks/answer, {c} in flight, up to {n} requests)"
    )
    print(f"  compkit  {mine['req_s']:>8.0f} req/s ({mine['ok']} ok)")
    print(f"  GuideLLM {theirs['req_s']:>8.0f} req/s ({theirs['ok']} ok)")
    return mine["req_s"], theirs["req_s"]


def pin(server_pid: int, threads: int) -> str | None:
    """The server on the first ``threads`` cores, this process (and the GuideLLM runs it
    starts) on the others, so neither client's CPU slows the server down."""
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= threads:
        return None
    server_cores, client_cores = cores[:threads], cores[threads:]
    for proc in [psutil.Process(server_pid), *psutil.Process(server_pid).children(recursive=True)]:
        proc.cpu_affinity(server_cores)
    os.sched_setaffinity(0, client_cores)
    return f"server on cores {server_cores}, clients on {client_cores}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10, help="requests per run")
    parser.add_argument("--n-threads", type=int, default=1, help="llama.cpp threads of the server")
    parser.add_argument("--rounds", type=int, default=2, help="runs per tool and case (ABBA)")
    parser.add_argument("--ceiling-requests", type=int, default=3000)
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin server and clients to cores"
    )
    args = parser.parse_args(argv)
    if shutil.which("guidellm", path=str(Path(sys.executable).parent)) is None:
        parser.error("GuideLLM is not installed in this environment (pip install guidellm==0.8.1)")
    tokenizer = ensure_builtin("smollm2-135m-instruct")  # GuideLLM needs a local tokenizer
    gguf = builtin_gguf_path("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        with LlamaCppServer(gguf, alias=MODEL, n_threads=args.n_threads) as server:
            pinned = pin(server.pid, args.n_threads) if args.pin else None
            print(
                f"llama_cpp.server {gguf.name}, {args.n_threads} thread(s), at {server.url}; "
                f"cold start {server.cold_start}; {pinned or 'not pinned'}"
            )
            cases = compare(args, server.url, tokenizer, Path(tmp))
            server_cores = server_affinity(server.pid)
        fake = None if args.skip_ceiling else ceiling(args, tokenizer, Path(tmp), server_cores)
    rps = ", ".join(f"{label} {m['req_s'] / t['req_s']:.3f}" for label, m, t in cases)
    ttft = ", ".join(
        f"{label} {m['ttft_median_ms'] / t['ttft_median_ms']:.3f}" for label, m, t in cases
    )
    worst = max(
        max(abs(m["req_s"] / t["req_s"] - 1), abs(m["ttft_median_ms"] / t["ttft_median_ms"] - 1))
        for _, m, t in cases
    )
    extra = (
        ""
        if fake is None
        else f"; client ceiling compkit {fake[0]:.0f} vs GuideLLM {fake[1]:.0f} req/s"
    )
    print(
        f"\ncompkit/GuideLLM req/s ratio: {rps} | TTFT median ratio: {ttft} | largest deviation {worst:.1%}{extra}"
    )


if __name__ == "__main__":
    main()
