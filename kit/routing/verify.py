"""Check the simulation against reality: route the judged items live and compare.

:func:`live_check` takes a run that stage 6 has routed, serves its judged (held-out) items
through :class:`kit.routing.client.RouterClient` with the chosen rule, and returns, per
figure (fallback rate, blended accuracy, blended p95 latency), the simulated value with its
interval next to the measured one and whether the measurement falls inside
(:data:`CHECK_COLUMNS`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kit.errors import CompkitError

CHECK_COLUMNS = ["figure", "simulated", "ci_low", "ci_high", "measured", "inside", "n"]
_FIGURES = {
    "fallback_rate": "fallback_rate",
    "accuracy": "accuracy",
    "blended_latency_p95_ms": "blended_latency_p95_ms",
}


def judged_items(run, candidate: str) -> list[str]:
    """The items stage 6 judged ``candidate``'s routed system on (``routing_items``)."""
    items = run.table("routing_items")
    mine = items[(items["candidate"] == candidate) & items["role"].str.startswith("judged")]
    if mine.empty:
        raise CompkitError(f"stage 6 did not route candidate {candidate!r}; run it first")
    return sorted(mine["item_id"].astype(str))


def _policy(run, candidate: str, config):
    from kit.routing.policies import policy_from_config

    rule = run.table("routing_rules").set_index("candidate").loc[candidate]
    tasks = sorted(set(run.outcomes()["task"]))
    policy = policy_from_config(
        config, source=config.confidence, tasks=tasks, slice_columns=list(run.slices().columns)
    )
    return policy.with_threshold(min(float(rule["threshold"]), 1.0))


def live_check(
    run: str | Path,
    *,
    candidate: str,
    small,
    large,
    log_path: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Serve ``candidate``'s judged items through the live router; ``(check, log)``.

    ``small`` / ``large`` are open runtimes serving the candidate and the fallback (for
    example :class:`kit.runtimes.openai.OpenAIRuntime` against two llama.cpp servers).
    """
    from kit.routing.client import RouterClient, requests_for
    from kit.routing.simulate import routed_name
    from kit.run import Run

    run = Run.open(run)
    config = run.study.routing
    if config is None:
        raise CompkitError(f"{run.root}: the frozen study has no routing: block")
    items = judged_items(run, candidate)
    client = RouterClient(
        small=small,
        large=large,
        policy=_policy(run, candidate, config),
        eval_set=run.eval_set,
        sampling=run.sampling,
        slices=run.slices(),
        quantile=config.token_quantile,
        names=(candidate, config.fallback or run.baseline),
    )
    log = client.run(requests_for(run, items), log_path=log_path)
    evidence = run.table("routing_evidence")
    mine = evidence[
        (evidence["model"] == routed_name(candidate)) & (evidence["slice"] == "overall")
    ]
    measured = {
        "fallback_rate": float(log["routed"].mean()),
        "accuracy": float(pd.to_numeric(log["correct"]).mean()),
        "blended_latency_p95_ms": float(np.quantile(log["total_s"].astype(float) * 1000, 0.95)),
    }
    rows = []
    for figure, metric in _FIGURES.items():
        row = mine[mine["metric"] == metric].iloc[0]
        lo, hi, got = float(row["value_ci_low"]), float(row["value_ci_high"]), measured[figure]
        rows.append(
            {
                "figure": figure,
                "simulated": float(row["value"]),
                "ci_low": lo,
                "ci_high": hi,
                "measured": got,
                "inside": bool(lo - 1e-9 <= got <= hi + 1e-9),
                "n": len(log),
            }
        )
    return pd.DataFrame(rows, columns=CHECK_COLUMNS), log
