"""Latency, throughput, goodput and errors from stored per-request timelines (pure compute).

Every function takes a timeline frame (one row per request:
:data:`kit.serving.client.TIMELINE_COLUMNS` plus ``model`` and the profile columns of
:meth:`kit.serving.load.ProfileSpec.record`) and returns a tidy frame; only measured
requests count (``phase == "measure"``; warm-up requests are discarded and reported by the
stage). Definitions (compkit's, with vLLM ``bench serve``'s and GuideLLM's where they
differ) are in :data:`DEFINITIONS` and ``docs/serving.md``; in short, per successful
request:

* TTFT = first content chunk - request sent
* E2E = end of the response - request sent
* TPOT = (E2E - TTFT) / (output tokens - 1), requests with more than one output token
* ITL = the gaps between consecutive content chunks, pooled over requests

Percentiles are ``numpy.quantile`` (linear) over requests (over gaps for ITL) with the
distribution-free order-statistic interval (:func:`kit.stats.intervals.quantile_ci`); for
ITL, whose gaps within a request are not independent, a bootstrap over whole requests
(:func:`kit.stats.serving_intervals.cluster_quantile_ci`). Requests per second =
successful measured requests / measured window (first send to last end) with Garwood's
Poisson interval; goodput the same for requests meeting every SLO (errors are misses).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from kit.stats.intervals import proportion_ci, quantile_ci
from kit.stats.serving_intervals import (
    cluster_quantile_ci,
    mean_ci,
    poisson_rate_ci,
    union_product_bounds,
)
from kit.study import SLOConfig

PROFILE_KEYS = ["model", "profile", "group", "slice", "slice_value"]
QUANTILES = (0.5, 0.9, 0.95, 0.99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
#: Columns of :func:`latency_table`.
LATENCY_COLUMNS = [
    *PROFILE_KEYS,
    "metric",
    "stat",
    "value_ms",
    "ci_low",
    "ci_high",
    "n",
    "n_requests",
    "method",
]

#: How each figure is defined here and by the two reference tools.
DEFINITIONS: list[dict[str, str]] = [
    {
        "metric": "TTFT",
        "compkit": "first chunk with content - request sent (client side)",
        "vllm_bench_serve": "first chunk with choices - request sent (a chat stream's "
        "role-only first chunk counts)",
        "guidellm": "first token iteration - request start (as compkit)",
    },
    {
        "metric": "E2E latency",
        "compkit": "end of the response body - request sent",
        "vllm_bench_serve": "last chunk with choices - request sent (E2EL)",
        "guidellm": "request end - request start (request_latency, as compkit)",
    },
    {
        "metric": "TPOT",
        "compkit": "(E2E - TTFT) / (output tokens - 1), per request, outputs > 1 token",
        "vllm_bench_serve": "(E2EL - TTFT) / (output tokens - 1), per request",
        "guidellm": "(last token - request start) / output tokens, weighted by output "
        "tokens (includes the first token)",
    },
    {
        "metric": "ITL",
        "compkit": "every gap between consecutive content chunks, pooled over requests",
        "vllm_bench_serve": "every gap between consecutive chunks with choices, pooled",
        "guidellm": "(last token - first token) / (output tokens - 1) per request, weighted "
        "by output tokens - 1 (what compkit and vLLM call TPOT)",
    },
    {
        "metric": "percentiles",
        "compkit": "numpy.quantile (linear) with order-statistic CIs",
        "vllm_bench_serve": "numpy.percentile (linear), no CI",
        "guidellm": "inverted CDF of the (weighted) values",
    },
    {
        "metric": "requests/s",
        "compkit": "successful measured requests / (last end - first send of measured)",
        "vllm_bench_serve": "completed requests / benchmark duration (warm-up excluded)",
        "guidellm": "mean request rate over the measured window (the same quotient)",
    },
    {
        "metric": "output tokens",
        "compkit": "usage.completion_tokens, else one per content chunk",
        "vllm_bench_serve": "usage.completion_tokens, else the tokenizer on the text",
        "guidellm": "usage, else one per streamed iteration",
    },
    {
        "metric": "goodput",
        "compkit": "requests meeting every SLO (TTFT, TPOT, E2E <= limit) / window; "
        "errors are misses",
        "vllm_bench_serve": "the same with --goodput ttft:ms tpot:ms e2el:ms",
        "guidellm": "not reported in 0.8 (its goodput profile searches for a rate)",
    },
]


# --------------------------------------------------------------------------- per request


def per_request(timeline: pd.DataFrame) -> pd.DataFrame:
    """Measured requests with their derived figures in seconds (compkit's, vLLM's and
    GuideLLM's variants): ``ttft_s, e2e_s, tpot_s, queue_s, vllm_ttft_s, vllm_e2el_s,
    vllm_tpot_s, guidellm_itl_s, guidellm_tpot_s`` (NaN where undefined)."""
    t = timeline[timeline["phase"] == "measure"].copy()
    ok = t["status"] == "ok"
    out = pd.to_numeric(t["output_tokens"], errors="coerce")
    sent = t["sent_s"].astype(float)

    def since_sent(col: str) -> pd.Series:
        return (pd.to_numeric(t[col], errors="coerce") - sent).where(ok)

    t["ttft_s"] = since_sent("first_token_s")
    t["e2e_s"] = since_sent("end_s")
    many = out > 1
    t["tpot_s"] = ((t["e2e_s"] - t["ttft_s"]) / (out - 1)).where(many)
    t["queue_s"] = sent - pd.to_numeric(t["scheduled_s"], errors="coerce")
    last_event = t["event_s"].map(lambda e: e[-1] if e is not None and len(e) else np.nan)
    t["vllm_ttft_s"] = since_sent("first_chunk_s")
    t["vllm_e2el_s"] = (last_event.astype(float) - sent).where(ok)
    t["vllm_tpot_s"] = ((t["vllm_e2el_s"] - t["vllm_ttft_s"]) / (out - 1)).where(many)
    first, last = (pd.to_numeric(t[c], errors="coerce") for c in ("first_token_s", "last_token_s"))
    t["guidellm_itl_s"] = ((last - first) / (out - 1)).where(ok & many)
    t["guidellm_tpot_s"] = ((last - sent) / out).where(ok & (out > 0))
    return t


def _gaps(series: pd.Series) -> list[np.ndarray]:
    return [np.diff(np.asarray(c, dtype=float)) for c in series if c is not None and len(c) > 1]


# --------------------------------------------------------------------------- latency


def latency_table(
    timeline: pd.DataFrame,
    *,
    confidence: float = 0.95,
    quantiles: Iterable[float] = QUANTILES,
    n_resamples: int = 1000,
) -> pd.DataFrame:
    """TTFT, TPOT, ITL and E2E per model and profile: ``p50 ... p99`` and ``mean`` in
    milliseconds with CIs (:data:`LATENCY_COLUMNS`; see the module docstring)."""
    rows: list[dict[str, Any]] = []
    reqs = per_request(timeline)
    for key, g in reqs.groupby(PROFILE_KEYS, sort=False, dropna=False):
        base = dict(zip(PROFILE_KEYS, key, strict=True))
        ok = g[g["status"] == "ok"]
        for metric in ("ttft", "tpot", "e2e"):
            rows += _stats(
                base, metric, ok[f"{metric}_s"].dropna().to_numpy(), quantiles, confidence
            )
        rows += _itl_stats(base, _gaps(ok["chunk_s"]), quantiles, confidence, n_resamples)
    return pd.DataFrame(rows, columns=LATENCY_COLUMNS)


def _stats(base, metric, values, quantiles, confidence) -> list[dict[str, Any]]:
    rows = []
    for q in quantiles:
        est, lo, hi = quantile_ci(values, q, confidence=confidence)
        rows.append(
            _row(
                base,
                metric,
                f"p{round(q * 100):g}",
                est,
                lo,
                hi,
                values.size,
                values.size,
                "order_statistic",
            )
        )
    mean, lo, hi = mean_ci(values, confidence=confidence)
    rows.append(_row(base, metric, "mean", mean, lo, hi, values.size, values.size, "bca_bootstrap"))
    return rows


def _itl_stats(base, gaps, quantiles, confidence, n_resamples) -> list[dict[str, Any]]:
    n = int(sum(g.size for g in gaps))
    rows = []
    qs = list(quantiles)
    triples = cluster_quantile_ci(gaps, qs, confidence=confidence, n_resamples=n_resamples)
    for q, (est, lo, hi) in zip(qs, triples, strict=True):
        rows.append(
            _row(
                base, "itl", f"p{round(q * 100):g}", est, lo, hi, n, len(gaps), "cluster_bootstrap"
            )
        )
    pooled = np.concatenate(gaps) if gaps else np.zeros(0)
    mean = float(pooled.mean()) if pooled.size else math.nan
    rows.append(_row(base, "itl", "mean", mean, math.nan, math.nan, n, len(gaps), "point"))
    return rows


def _row(base, metric, stat, est, lo, hi, n, n_requests, method) -> dict[str, Any]:
    return {
        **base,
        "metric": f"{metric}_ms",
        "stat": stat,
        "value_ms": est * 1e3,
        "ci_low": lo * 1e3,
        "ci_high": hi * 1e3,
        "n": int(n),
        "n_requests": int(n_requests),
        "method": method,
    }


# --------------------------------------------------------------------------- throughput


def is_good(reqs: pd.DataFrame, slo: SLOConfig | None) -> pd.Series:
    """Whether each request met every SLO (False for failed requests; TPOT of a one-token
    answer counts as 0, as in vLLM)."""
    good = reqs["status"] == "ok"
    if slo is None:
        return good
    if slo.ttft_ms is not None:
        good &= reqs["ttft_s"].fillna(math.inf) * 1e3 <= slo.ttft_ms
    if slo.tpot_ms is not None:
        good &= reqs["tpot_s"].fillna(0.0) * 1e3 <= slo.tpot_ms
    if slo.e2e_ms is not None:
        good &= reqs["e2e_s"].fillna(math.inf) * 1e3 <= slo.e2e_ms
    return good


#: Columns of :func:`throughput_table`.
THROUGHPUT_COLUMNS = [*PROFILE_KEYS, "metric", "value", "ci_low", "ci_high", "n", "method"]


def throughput_table(
    timeline: pd.DataFrame, *, slo: SLOConfig | None = None, confidence: float = 0.95
) -> pd.DataFrame:
    """Per model and profile: ``throughput_rps``, ``output_tokens_per_s``, ``goodput_rps``
    and ``goodput_share`` (with an SLO), ``error_rate_under_load``, ``timeout_rate``,
    ``interrupted_rate``, plus the counts ``requests``, ``errors``, ``window_s`` and the
    mean ``output_tokens`` (:data:`THROUGHPUT_COLUMNS`)."""
    rows: list[dict[str, Any]] = []
    reqs = per_request(timeline)
    for key, g in reqs.groupby(PROFILE_KEYS, sort=False, dropna=False):
        base = dict(zip(PROFILE_KEYS, key, strict=True))
        rows += _throughput_rows(base, g, slo, confidence)
    return pd.DataFrame(rows, columns=THROUGHPUT_COLUMNS)


def _throughput_rows(base, g: pd.DataFrame, slo, confidence) -> list[dict[str, Any]]:
    n = len(g)
    ok = g["status"] == "ok"
    end = pd.to_numeric(g["end_s"], errors="coerce").fillna(g["sent_s"])
    window = float(end.max() - g["sent_s"].min()) if n else 0.0
    out = pd.to_numeric(g.loc[ok, "output_tokens"], errors="coerce").dropna().to_numpy()
    rows = [
        _trow(base, "requests", n, n, n, n, "count"),
        _trow(base, "errors", int((~ok).sum()), math.nan, math.nan, n, "count"),
        _trow(base, "window_s", window, math.nan, math.nan, n, "measured"),
    ]
    rps = int(ok.sum()) / window if window > 0 else math.nan
    lo, hi = poisson_rate_ci(int(ok.sum()), window, confidence=confidence)
    rows.append(_trow(base, "throughput_rps", rps, lo, hi, n, "garwood_poisson"))
    tok_mean, tok_lo, tok_hi = mean_ci(out, confidence=1 - (1 - confidence) / 2)
    rate_half = poisson_rate_ci(int(ok.sum()), window, confidence=1 - (1 - confidence) / 2)
    t_lo, t_hi = union_product_bounds(rate_half, (tok_lo, tok_hi))
    tokens_s = out.sum() / window if window > 0 else math.nan
    rows.append(_trow(base, "output_tokens_per_s", tokens_s, t_lo, t_hi, n, "union_product"))
    rows.append(
        _trow(base, "output_tokens", tok_mean, tok_lo, tok_hi, int(ok.sum()), "bca_bootstrap")
    )
    if slo is not None:
        good = int(is_good(g, slo).sum())
        lo, hi = poisson_rate_ci(good, window, confidence=confidence)
        rows.append(
            _trow(
                base,
                "goodput_rps",
                good / window if window > 0 else math.nan,
                lo,
                hi,
                n,
                "garwood_poisson",
            )
        )
        rows.append(_share(base, "goodput_share", good, n, confidence))
    rows.append(_share(base, "error_rate_under_load", int((~ok).sum()), n, confidence))
    rows.append(
        _share(base, "timeout_rate", int((g["error_class"] == "timeout").sum()), n, confidence)
    )
    rows.append(
        _share(
            base,
            "interrupted_rate",
            int(g["interrupted"].fillna(False).astype(bool).sum()),
            n,
            confidence,
        )
    )
    return rows


def _share(base, metric, count, n, confidence) -> dict[str, Any]:
    lo, hi = proportion_ci(count, n, confidence=confidence)
    return _trow(
        base, metric, count / n if n else math.nan, float(lo), float(hi), n, "clopper_pearson"
    )


def _trow(base, metric, value, lo, hi, n, method) -> dict[str, Any]:
    return {
        **base,
        "metric": metric,
        "value": float(value),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": int(n),
        "method": method,
    }


# --------------------------------------------------------------------------- errors


def error_table(timeline: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Failed measured requests by class: ``model, profile, ..., error_class, n, requests,
    share, ci_low, ci_high, example`` (Clopper–Pearson intervals)."""
    reqs = timeline[timeline["phase"] == "measure"]
    rows = []
    for key, g in reqs.groupby(PROFILE_KEYS, sort=False, dropna=False):
        failed = g[g["status"] != "ok"]
        for cls, f in failed.groupby("error_class", dropna=False):
            lo, hi = proportion_ci(len(f), len(g), confidence=confidence)
            rows.append(
                {
                    **dict(zip(PROFILE_KEYS, key, strict=True)),
                    "error_class": cls,
                    "n": len(f),
                    "requests": len(g),
                    "share": len(f) / len(g),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "example": str(f["error"].iloc[0])[:300],
                }
            )
    columns = [
        *PROFILE_KEYS,
        "error_class",
        "n",
        "requests",
        "share",
        "ci_low",
        "ci_high",
        "example",
    ]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- variants


def variant_table(
    timeline: pd.DataFrame, *, quantiles: Iterable[float] = QUANTILES
) -> pd.DataFrame:
    """Point estimates under vLLM ``bench serve``'s and GuideLLM's definitions (see
    :data:`DEFINITIONS`), for comparison with those tools: ``*PROFILE_KEYS, tool, metric,
    stat, value`` (milliseconds; requests/s and tokens/s for the throughputs)."""
    rows: list[dict[str, Any]] = []
    reqs = per_request(timeline)
    for key, g in reqs.groupby(PROFILE_KEYS, sort=False, dropna=False):
        base = dict(zip(PROFILE_KEYS, key, strict=True))
        ok = g[g["status"] == "ok"]
        rows += _vllm(base, g, ok, quantiles)
        rows += _guidellm(base, g, ok, quantiles)
    return pd.DataFrame(rows, columns=[*PROFILE_KEYS, "tool", "metric", "stat", "value"])


def _vllm(base, g, ok, quantiles) -> list[dict[str, Any]]:
    series = {
        "ttft_ms": ok["vllm_ttft_s"].dropna().to_numpy(),
        "tpot_ms": ok["vllm_tpot_s"].dropna().to_numpy(),
        "itl_ms": np.concatenate(_gaps(ok["event_s"]) or [np.zeros(0)]),
        "e2el_ms": ok["vllm_e2el_s"].dropna().to_numpy(),
    }
    rows = []
    for metric, x in series.items():
        for q in quantiles:
            value = float(np.percentile(x, q * 100)) * 1e3 if x.size else math.nan
            rows.append(
                {
                    **base,
                    "tool": "vllm",
                    "metric": metric,
                    "stat": f"p{round(q * 100):g}",
                    "value": value,
                }
            )
        rows.append(
            {
                **base,
                "tool": "vllm",
                "metric": metric,
                "stat": "mean",
                "value": float(x.mean()) * 1e3 if x.size else math.nan,
            }
        )
    window = _window(g)
    out = pd.to_numeric(ok["output_tokens"], errors="coerce").sum()
    rows.append(
        {
            **base,
            "tool": "vllm",
            "metric": "request_throughput",
            "stat": "value",
            "value": len(ok) / window if window else math.nan,
        }
    )
    rows.append(
        {
            **base,
            "tool": "vllm",
            "metric": "output_throughput",
            "stat": "value",
            "value": out / window if window else math.nan,
        }
    )
    return rows


def _guidellm(base, g, ok, quantiles) -> list[dict[str, Any]]:
    out = pd.to_numeric(ok["output_tokens"], errors="coerce")
    series = {
        "time_to_first_token_ms": (ok["ttft_s"], None),
        "inter_token_latency_ms": (ok["guidellm_itl_s"], out - 1),
        "time_per_output_token_ms": (ok["guidellm_tpot_s"], out),
        "request_latency_ms": (ok["e2e_s"], None),
    }
    rows = []
    for metric, (values, weights) in series.items():
        for stat, value in _weighted_stats(values, weights, quantiles).items():
            rows.append(
                {**base, "tool": "guidellm", "metric": metric, "stat": stat, "value": value * 1e3}
            )
    window = _window(g)
    rows.append(
        {
            **base,
            "tool": "guidellm",
            "metric": "requests_per_second",
            "stat": "mean",
            "value": len(ok) / window if window else math.nan,
        }
    )
    return rows


def _weighted_stats(values: pd.Series, weights: pd.Series | None, quantiles) -> dict[str, float]:
    """GuideLLM's percentiles: the inverted CDF of the weighted values; and the mean."""
    frame = pd.DataFrame({"v": values, "w": 1.0 if weights is None else weights}).dropna()
    frame = frame[frame["w"] > 0].sort_values("v")
    if frame.empty:
        return {**{f"p{round(q * 100):g}": math.nan for q in quantiles}, "mean": math.nan}
    v, w = frame["v"].to_numpy(), frame["w"].to_numpy(dtype=float)
    cdf = np.cumsum(w / w.sum())
    out = {
        f"p{round(q * 100):g}": float(v[min(np.searchsorted(cdf, q, side="left"), v.size - 1)])
        for q in quantiles
    }
    out["mean"] = float(np.average(v, weights=w))
    return out


def _window(g: pd.DataFrame) -> float:
    if g.empty:
        return 0.0
    end = pd.to_numeric(g["end_s"], errors="coerce").fillna(g["sent_s"])
    return float(end.max() - g["sent_s"].min())
