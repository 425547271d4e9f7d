"""Every metric the serving stage emits, as plain data for the metric registry (``kit.metrics``).

Each entry: ``name``, ``unit`` (``ms``, ``s``, ``requests/s``, ``tokens/s``, ``MB``, ``USD``,
or ``share`` for a fraction), ``higher_is_better``, ``stage`` (``serving``), ``interval``
(the method of its value's CI, named in :mod:`kit.stats.serving_intervals` /
:mod:`kit.stats.intervals`), ``comparison`` (how its change against the baseline is
bounded), ``slices`` (the evidence slices it appears on besides ``overall``), ``overall``
(what its overall row is), ``description`` and ``phrases`` (what a product owner writes in
a budget; the grammar maps them to the name).

Slices: ``profile`` (``synchronous``, ``throughput``), ``concurrency`` (N users),
``rate`` (requests/s of an open-loop profile), ``prompt_length`` (``short``, ``long``,
``longest``), ``synthetic`` (``128/64``...), ``batch_size`` (in process).
"""

from __future__ import annotations

from typing import Any

LOAD_SLICES = ("profile", "concurrency", "rate", "prompt_length", "synthetic", "batch_size")
_EVAL_SLICES = ("profile", "concurrency", "rate", "prompt_length", "batch_size")

_LATENCY = {
    "ttft": (
        "time to first token",
        ("first-token latency", "first token latency", "time to first token", "TTFT"),
    ),
    "tpot": (
        "time per output token after the first",
        ("time per output token", "TPOT", "per-token latency"),
    ),
    "itl": ("gap between consecutive streamed tokens", ("inter-token latency", "ITL", "token gap")),
    "e2e": (
        "end-to-end request latency",
        ("end-to-end latency", "E2E latency", "request latency", "response time"),
    ),
}
_QUANTILE_WORDS = {
    "50": ("p50", "median"),
    "90": ("p90", "90th percentile"),
    "95": ("p95", "95th percentile"),
    "99": ("p99", "99th percentile"),
}


def _latency_specs() -> list[dict[str, Any]]:
    out = []
    for key, (what, nouns) in _LATENCY.items():
        for q, words in _QUANTILE_WORDS.items():
            out.append(
                {
                    "name": f"{key}_p{q}_ms",
                    "unit": "ms",
                    "higher_is_better": False,
                    "stage": "serving",
                    "interval": "cluster_bootstrap" if key == "itl" else "order_statistic",
                    "comparison": "cluster_bootstrap_union"
                    if key == "itl"
                    else "order_statistic_union",
                    "slices": LOAD_SLICES,
                    "overall": "the study's serving.reference profile (default synchronous)",
                    "description": f"{words[0]} {what} over successful requests",
                    "phrases": [f"{w} {n}" for w in words for n in nouns],
                }
            )
    return out


def _spec(name, unit, higher, interval, comparison, slices, overall, description, phrases):
    return {
        "name": name,
        "unit": unit,
        "higher_is_better": higher,
        "stage": "serving",
        "interval": interval,
        "comparison": comparison,
        "slices": slices,
        "overall": overall,
        "description": description,
        "phrases": list(phrases),
    }


_PEAK = "the highest value over the model's eval-traffic profiles (saturation)"
_POINT = "the operating point: the profile with the highest goodput (with an SLO), else throughput"
_POOLED = (
    "all measured requests of the model's loaded profiles (every profile but those sending one "
    "request at a time, unless there are only those), pooled"
)
_ONCE = "measured once per deployment"

#: The serving stage's metrics (see the module docstring for the fields).
SERVING_METRICS: list[dict[str, Any]] = [
    *_latency_specs(),
    _spec(
        "throughput_rps",
        "requests/s",
        True,
        "garwood_poisson",
        "poisson_ratio_conditional",
        LOAD_SLICES,
        _PEAK,
        "successful requests per second over the measured window",
        ["throughput", "requests per second", "request throughput", "req/s", "RPS"],
    ),
    _spec(
        "output_tokens_per_s",
        "tokens/s",
        True,
        "union_product",
        "union",
        LOAD_SLICES,
        _PEAK,
        "generated tokens per second over the measured window (all requests together)",
        [
            "output tokens per second",
            "token throughput",
            "output throughput",
            "generation throughput",
        ],
    ),
    _spec(
        "goodput_rps",
        "requests/s",
        True,
        "garwood_poisson",
        "poisson_ratio_conditional",
        LOAD_SLICES,
        _PEAK,
        "requests per second that met every latency SLO (errors are misses)",
        ["goodput", "good requests per second", "requests within the SLO per second"],
    ),
    _spec(
        "goodput_share",
        "share",
        True,
        "clopper_pearson",
        "clopper_pearson_union",
        LOAD_SLICES,
        _POINT,
        "share of requests that met every latency SLO",
        ["share of requests within the SLO", "SLO attainment", "goodput share"],
    ),
    _spec(
        "error_rate_under_load",
        "share",
        False,
        "clopper_pearson",
        "clopper_pearson_union",
        LOAD_SLICES,
        _POOLED,
        "share of requests that failed under load (any error class, timeouts and cut streams included)",
        ["error rate under load", "error rate", "failed requests under load", "request failures"],
    ),
    _spec(
        "timeout_rate",
        "share",
        False,
        "clopper_pearson",
        "clopper_pearson_union",
        LOAD_SLICES,
        _POOLED,
        "share of requests that hit the client timeout",
        ["timeout rate", "timeouts", "request timeouts"],
    ),
    _spec(
        "interrupted_rate",
        "share",
        False,
        "clopper_pearson",
        "clopper_pearson_union",
        LOAD_SLICES,
        _POOLED,
        "share of streams the server cut short ([DONE] without a finish_reason)",
        ["interrupted streams", "cut streams", "truncated answers"],
    ),
    _spec(
        "parse_failure_under_load",
        "share",
        False,
        "clopper_pearson",
        "tango_cc",
        _EVAL_SLICES,
        _POINT,
        "share of answered requests with a format (JSON, label, option) whose answer could not be read",
        [
            "parse failures under load",
            "parse failure rate under load",
            "unparsable answers under load",
        ],
    ),
    _spec(
        "accuracy_under_load",
        "share",
        True,
        "clopper_pearson",
        "tango_cc",
        _EVAL_SLICES,
        _POINT,
        "share of eval requests answered correctly under load (failed requests count as wrong)",
        ["accuracy under load", "served accuracy", "accuracy when served"],
    ),
    _spec(
        "load_flip_rate",
        "share",
        False,
        "clopper_pearson",
        "clopper_pearson_union",
        _EVAL_SLICES,
        _POINT,
        "share of items whose correctness changed between this profile and the unloaded reference",
        ["load flip rate", "answers changed by load", "flips under load"],
    ),
    _spec(
        "batch_flip_rate",
        "share",
        False,
        "clopper_pearson",
        "clopper_pearson_union",
        ("batch_size", "concurrency"),
        "the largest batch size (in process) or concurrency (server) against 1",
        "share of items whose correctness differs between batch size / concurrency 1 and N (noise floor)",
        ["batch flip rate", "batch-size flip rate", "batching flips"],
    ),
    _spec(
        "peak_memory_mb",
        "MB",
        False,
        "single_measurement",
        "single_measurement",
        (),
        _ONCE,
        "peak resident memory of the serving process tree (psutil RSS)",
        ["peak memory", "peak memory use", "memory", "RAM", "resident memory"],
    ),
    _spec(
        "peak_gpu_memory_mb",
        "MB",
        False,
        "single_measurement",
        "single_measurement",
        (),
        _ONCE,
        "peak GPU memory of the serving processes (NVML or nvidia-smi)",
        ["peak GPU memory", "GPU memory", "VRAM"],
    ),
    _spec(
        "size_on_disk_mb",
        "MB",
        False,
        "single_measurement",
        "single_measurement",
        (),
        _ONCE,
        "size of the model's files on disk",
        ["size on disk", "model size", "disk footprint", "file size"],
    ),
    _spec(
        "cold_start_s",
        "s",
        False,
        "single_measurement",
        "single_measurement",
        (),
        _ONCE,
        "process start (or model load) to the first streamed token of the first request",
        ["cold start", "cold-start time", "startup time", "time to first token from cold"],
    ),
    _spec(
        "cost_per_request_usd",
        "USD",
        False,
        "garwood_poisson",
        "poisson_ratio_conditional",
        (),
        _POINT,
        "serving cost per request from the cost: block (hourly price / request rate, or token prices)",
        ["cost per request", "serving cost per request", "price per request"],
    ),
    _spec(
        "cost_per_1k_correct_usd",
        "USD",
        False,
        "union_product",
        "union",
        (),
        _POINT,
        "serving cost per 1,000 correct answers (cost per request x 1000 / accuracy under load)",
        [
            "cost per 1,000 correct answers",
            "cost per 1000 correct answers",
            "cost per thousand correct answers",
            "cost per correct answer",
        ],
    ),
]

#: Budget sentences the grammar should accept for these metrics (examples for its tests).
BUDGET_EXAMPLES = [
    "p95 first-token latency must stay below 400 ms",
    "throughput must be at least 2x the baseline",
    "peak memory must stay under 1.5 GB",
    "cost per 1,000 correct answers must drop by at least 30 percent",
    "error rate under load below 1 percent",
    "p99 end-to-end latency at 4 concurrent users below 3 s",
    "goodput must not drop",
    "batch flip rate below 2 percent",
]


def metric_names() -> list[str]:
    return [m["name"] for m in SERVING_METRICS]
