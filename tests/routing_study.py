"""Test helper (not tests): a predictions study whose small model errs where it is unsure.

``large`` (the baseline) is right on 96% of the items; ``small`` is right where it is
confident and mostly wrong where it is not (a share of its confident answers is wrong too, and
some unsure ones are right), and always wrong on the rare ``fraud`` label. Latencies: small
about 50 ms, large about 300 ms, each request its own (seeded) figure. Built with the real
stages (freeze, candidates), so the run folder is what stage 6 reads in production.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

LABELS = ["fraud", "order_status", "refund"]  # choice options are the sorted labels


def items(n: int) -> list[dict]:
    out = []
    for k in range(n):
        label = "fraud" if k % 8 == 7 else ("order_status" if k % 2 == 0 else "refund")
        out.append(
            {
                "id": f"q{k:04d}",
                "task": "classification",
                "input": f"customer message number {k} about {label.replace('_', ' ')}",
                "label": label,
                "channel": "email" if k % 3 == 0 else "chat",
            }
        )
    return out


def _probs(answer: str, p: float) -> list[float]:
    rest = (1 - p) / (len(LABELS) - 1)
    return [p if lab == answer else rest for lab in LABELS]


def _wrong(label: str) -> str:
    return "refund" if label != "refund" else "order_status"


def predictions(rows: list[dict], *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(large, small)`` prediction rows for ``rows``."""
    rng = np.random.default_rng(seed)
    large, small = [], []
    for k, item in enumerate(rows):
        label = item["label"]
        big = label if k % 25 != 3 else _wrong(label)
        large.append(
            {
                "id": item["id"],
                "output": big,
                "choice_probs": _probs(big, 0.85),
                "latency_s": float(0.3 + rng.gamma(4, 0.02)),
            }
        )
        unsure = k % 5 == 0 or label == "fraud"
        if unsure:
            right = k % 15 == 0 and label != "fraud"
            p = float(rng.uniform(0.36, 0.6))
        else:
            right = k % 37 != 1
            p = float(rng.uniform(0.7, 0.98))
        ans = label if right else _wrong(label)
        small.append(
            {
                "id": item["id"],
                "output": ans,
                "choice_probs": _probs(ans, p),
                "latency_s": float(0.05 + rng.gamma(4, 0.004)),
            }
        )
    return large, small


BUDGET = {
    "rules": [
        {"rule": "accuracy cannot drop by more than 5 points", "why": "misrouted tickets"},
        {"rule": "fallback rate must stay under 45 percent", "why": "large-model capacity"},
    ]
}


def write_study(
    folder: Path, *, n: int = 400, routing: dict | None = None, routed: bool = True
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = items(n)
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prompt.jinja").write_text("Intents: {{ labels | join(', ') }}. {{ input }}")
    large, small = predictions(rows)
    for name, preds in (("large", large), ("small", small)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (folder / "budget.yaml").write_text(yaml.safe_dump(BUDGET, sort_keys=False))
    study = {
        "name": "routing-test",
        "eval_set": {"path": "eval.jsonl", "rare_label_threshold": 0.15},
        "prompt": {"template": "prompt.jinja", "chat": False, "choice_labels": "text"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8, "seed": 3},
        "baseline": {"name": "large", "runtime": "predictions", "model": "large.jsonl"},
        "candidates": [{"name": "small", "runtime": "predictions", "model": "small.jsonl"}],
        "budget": "budget.yaml",
        **({"routing": routing or {}} if routed else {}),
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def build_run(root: Path, **kwargs) -> Path:
    """Freeze and run the candidate (stages 1-2) in process; returns the run folder."""
    from kit.stages.candidates import run_candidates
    from kit.stages.freeze import freeze_baseline

    study = write_study(root / "study", **kwargs)
    out = root / "runs" / "routing"
    freeze_baseline(study, out, progress=False)
    run_candidates(out, progress=False)
    return out
