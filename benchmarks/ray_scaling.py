"""Items per second of a choice-scoring candidate run on Ray with 1 and with 2 replicas.

The study: classification items (five intents, prompts of varied length), each scored by the
options' log-probabilities and answered greedily in a few tokens, by builtin SmolLM2-135M-
Instruct (Q4_1 GGUF) on llama.cpp, one CPU core per replica (``resources: {num_cpus: 1}``,
so each replica runs llama.cpp on one thread). The baseline is a predictions file, so that
freezing is instant. Each measured run is a real ``compkit candidates --ray --force``
(``run_candidates``) on one local Ray started once: the figure is rows / the candidate's
wall time (``candidates/<name>.json``), replica start-up (model load) included.

Runs alternate (1, 2, 1, 2, ...) so background load hits both alike; the median per side is
reported, and the last line is the 2-vs-1 ratio. Ideal is 2.0 on a machine with two idle
cores; on a real cluster each replica has its own cores or GPU, so items/s grows with the
replicas until the driver (~ms per batch) or the shared filesystem becomes the limit: in
practice close to linear for models whose batches take 100 ms or more.

Run::

    flock /tmp/bench.lock .venv/bin/python benchmarks/ray_scaling.py --items 96 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from kit.execute_ray import import_ray
from kit.run import CandidateManifest
from kit.stages.candidates import run_candidates
from kit.stages.freeze import freeze_baseline

INTENTS = ["order_status", "refund", "cancel_order", "fraud_report", "change_address"]
TEXTS = [
    "where is my parcel",
    "I want my money back for the broken kettle I bought last week",
    "please cancel the order I placed this morning, I ordered the wrong size by mistake",
    "someone used my card to buy things I never ordered",
    "I moved house last month and the delivery should go to my new flat instead",
    "has it shipped yet",
    "the refund you promised two weeks ago still has not reached my account",
    "stop my order",
]


def make_study(folder: Path, n: int) -> Path:
    items = [
        {
            "id": f"i{i:04d}",
            "task": "classification",
            "input": f"{TEXTS[i % len(TEXTS)]} (ticket {i})",
            "label": INTENTS[i % len(INTENTS)],
        }
        for i in range(n)
    ]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (folder / "base.jsonl").write_text(
        "".join(json.dumps({"id": r["id"], "output": r["label"]}) + "\n" for r in items)
    )
    (folder / "prompt.jinja").write_text(
        "Classify the customer message into one of: {{ labels | join(', ') }}.\n"
        "Message: {{ input }}\nAnswer with the intent only."
    )
    study = {
        "name": "ray-scaling",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja", "choice_labels": "text"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 4, "seed": 1},
        "baseline": {"name": "base", "runtime": "predictions", "model": "base.jsonl"},
        "candidates": [
            {
                "name": "smollm2",
                "runtime": "llamacpp",
                "model": "builtin:smollm2-135m-instruct",
                "batch_size": 4,
                "options": {"n_ctx": 512},
            }
        ],
        "execution": {"engine": "ray", "resources": {"num_cpus": 1}},
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder / "study.yaml"


def measure(out: Path, workers: int) -> float:
    """One forced run with ``workers`` replicas; returns rows per second of wall time."""
    run_candidates(out, force=True, progress=False, workers=workers)
    cm = CandidateManifest.load(out / "candidates" / "smollm2.json")
    return cm.rows / cm.wall_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="measured runs per side")
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True, help="one unmeasured run"
    )
    args = parser.parse_args(argv)
    ray = import_ray(local=True)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            study = make_study(Path(tmp), args.items)
            out = Path(tmp) / "run"
            freeze_baseline(study, out, progress=False)
            if args.warmup:
                measure(out, 1)  # page cache, worker processes
            rates: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.rounds):
                for workers in (1, 2):
                    rates[workers].append(measure(out, workers))
                    print(
                        f"round {r + 1}: {workers} replica(s): {rates[workers][-1]:.2f} items/s",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"items: {args.items}, 1 replica: {one:.2f} items/s, 2 replicas: {two:.2f} items/s")
    print(f"ray scaling, 2 replicas vs 1: {two / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
