"""Cost per request and per 1,000 correct answers from a model's ``cost:`` block.

Hardware (``usd_per_hour``): a machine serving at ``R`` requests per second costs
``usd_per_hour / 3600 / R`` per request, so the figure belongs to an *operating point*: the
profile with the highest goodput when an SLO is set (the most traffic the hardware serves
within the objectives), else the highest throughput (:func:`operating_point`). Its interval
maps Garwood's interval of the request rate through that monotone function.

API (``usd_per_1m_input_tokens`` / ``usd_per_1m_output_tokens``): each request costs
``(prompt tokens x input price + output tokens x output price) / 1e6``, from the server's
usage counts; the mean over the operating point's requests with a BCa interval. Without
prompt-token counts (servers that send no usage) no API cost is computed.

Per 1,000 correct answers: ``1000 x cost per request / accuracy`` at the operating point, the
interval from the cost's and the accuracy's intervals at ``1 - alpha/2`` each (a union
bound, :mod:`kit.stats.serving_intervals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kit.stats.intervals import proportion_ci
from kit.stats.serving_intervals import mean_ci, poisson_rate_ci, union_ratio
from kit.study import CostSpec

#: Profile groups that stand for the product's traffic (synthetic prompts do not).
EVAL_GROUPS = ("synchronous", "concurrency", "throughput", "rate_sweep", "batch")


def operating_point(throughput: pd.DataFrame, model: str, *, goodput: bool) -> str | None:
    """The profile of ``model`` with the highest goodput (``goodput``) or throughput among
    the eval-traffic profiles; None when it has none."""
    metric = "goodput_rps" if goodput else "throughput_rps"
    rows = throughput[
        (throughput["model"] == model)
        & (throughput["metric"] == metric)
        & throughput["group"].isin(EVAL_GROUPS)
    ].dropna(subset=["value"])
    if rows.empty:
        return None
    return str(rows.sort_values(["value", "profile"], ascending=[False, True]).iloc[0]["profile"])


@dataclass(frozen=True)
class PointData:
    """What the operating point measured: successful requests over the window, correct
    answers among the eval requests, and per-request token counts."""

    ok: int
    window_s: float
    correct: int
    answered_of: int
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray


def cost_rows(
    cost: CostSpec, point: PointData, *, confidence: float = 0.95
) -> list[dict[str, Any]]:
    """``cost_per_request_usd`` and ``cost_per_1k_correct_usd`` rows (``metric, value,
    ci_low, ci_high, n, method, mode``); API prices without token counts give none."""
    half = 1 - (1 - confidence) / 2
    per_request = _per_request(cost, point, confidence)
    if per_request is None:
        return []
    half_cost = _per_request(cost, point, half)
    rows = [{**per_request, "metric": "cost_per_request_usd"}]
    acc = point.correct / point.answered_of if point.answered_of else math.nan
    if point.answered_of and half_cost is not None:
        a_lo, a_hi = (
            float(x) for x in proportion_ci(point.correct, point.answered_of, confidence=half)
        )
        lo, hi = union_ratio((half_cost["ci_low"], half_cost["ci_high"]), (a_lo, a_hi))
        value = per_request["value"] / acc * 1000 if acc > 0 else math.inf
        rows.append(
            {
                "metric": "cost_per_1k_correct_usd",
                "value": value,
                "ci_low": lo * 1000,
                "ci_high": hi * 1000,
                "n": point.answered_of,
                "method": "union_product",
                "mode": per_request["mode"],
            }
        )
    return rows


def _per_request(cost: CostSpec, point: PointData, confidence: float) -> dict[str, Any] | None:
    if cost.mode == "hourly":
        per_s = float(cost.usd_per_hour) / 3600
        lo, hi = poisson_rate_ci(point.ok, point.window_s, confidence=confidence)
        rate = point.ok / point.window_s if point.window_s > 0 else 0.0
        return {
            "value": per_s / rate if rate > 0 else math.inf,
            "ci_low": per_s / hi if hi > 0 else math.inf,
            "ci_high": per_s / lo if lo > 0 else math.inf,
            "n": point.ok,
            "method": "garwood_poisson",
            "mode": "hourly",
        }
    pt, ot = point.prompt_tokens, point.output_tokens
    if pt.size == 0 or pt.size != ot.size or not np.isfinite(pt).all():
        return None
    each = (
        pt * float(cost.usd_per_1m_input_tokens) + ot * float(cost.usd_per_1m_output_tokens)
    ) / 1e6
    mean, lo, hi = mean_ci(each, confidence=confidence)
    return {
        "value": mean,
        "ci_low": lo,
        "ci_high": hi,
        "n": int(each.size),
        "method": "bca_bootstrap",
        "mode": "tokens",
    }
