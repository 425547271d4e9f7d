"""The one metric registry: every metric any stage emits, declared once.

Scoring, calibration, the drill-down, the budget grammar, the judge, the memo and the charts
read a metric's name, unit, direction, stage, interval methods and budget phrases from
:data:`METRICS`; nothing else declares them. ``tests/test_metrics.py`` checks that every
metric a stage emits is registered (so judgeable) and that every registered metric is emitted
by the stage it names.

Kinds
-----
``item``
    a per-item outcome column of ``outcomes.parquet`` (``column``), compared item by item
    (paired): ``binary`` metrics (0/1 per item) get score / exact intervals
    (:mod:`kit.stats.intervals`), ``bounded`` ones (a value in [0, 1] per item: chrF, a
    human score, or a binary metric averaged over repeats) the paired BCa bootstrap, which
    needs :data:`BOOTSTRAP_MIN_N` items.
``aggregate``
    computed by a stage over a set of items (ECE, macro F1, a latency percentile, the flip
    rate); the stage writes its value and intervals as evidence rows with the method named.

Units: ``share`` (a fraction shown as a percentage; rules speak of points and percent),
``score`` (0–1 shown plainly), ``ms``, ``s``, ``MB``, ``USD``, ``requests/s``, ``tokens/s``,
``nats``.

Example
-------
>>> METRICS["json_parse_failure"].higher_is_better
False
>>> metric_for_column("correct").name
'accuracy'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from kit.errors import CompkitError

Kind = Literal["item", "aggregate"]
Scale = Literal["binary", "bounded", "unbounded"]
#: Stages that emit metrics, in pipeline order; a metric's ``stage`` is one of them.
STAGES = ("scoring", "comparison", "calibration", "robustness", "serving", "routing")
#: Fewest paired items a bootstrap interval is trusted with; below it a rule stays undecided.
BOOTSTRAP_MIN_N = 30
UNITS = ("share", "score", "ms", "s", "MB", "USD", "requests/s", "tokens/s", "nats", "ratio")


@dataclass(frozen=True)
class MetricSpec:
    """A metric's metadata.

    Parameters
    ----------
    name
        The metric's name in every table (``model, slice, slice_value, metric, ...``).
    description
        One line the memo and ``compkit`` help show.
    higher_is_better
        The direction; rules such as "must not get worse" read it.
    stage
        The stage that emits it (:data:`STAGES`).
    unit
        How values are expressed and formatted (:data:`UNITS`).
    kind, scale
        See the module docstring.
    column
        The outcome column of an ``item`` metric (default: its name).
    tasks
        Tasks the metric applies to (empty: every task).
    phrases
        Extra ways a budget sentence may name it (the name with spaces always works).
    value_range
        The values the metric can take; a budget threshold outside it is refused.
    intervals
        ``(value, change, relative change)`` interval methods (:mod:`kit.stats.intervals`
        names) the evidence uses for this metric; ``bounded`` item metrics use the BCa
        bootstrap whatever is declared.
    table
        The evidence table the stage writes this metric to (``tables/<table>.parquet``).
    requires
        What the study must provide for the metric to exist (empty: the stage always emits
        it for the tasks it applies to).
    slices, overall
        Aggregate metrics: the evidence slices the metric appears on besides ``overall``, and
        what its ``overall`` row is (the serving stage's reference or peak profile, ...).
    """

    name: str
    description: str
    higher_is_better: bool
    stage: str
    unit: str = "share"
    kind: Kind = "item"
    scale: Scale = "binary"
    column: str | None = None
    tasks: tuple[str, ...] = ()
    phrases: tuple[str, ...] = ()
    value_range: tuple[float, float] = (0.0, 1.0)
    intervals: tuple[str, str, str] = ("clopper_pearson", "tango_cc", "tang_cc")
    table: str = "slice_table"
    requires: str = ""
    slices: tuple[str, ...] = ()
    overall: str = ""
    builtin: bool = field(default=True, compare=False)

    @property
    def outcome_column(self) -> str:
        return self.column or self.name

    @property
    def fractional(self) -> bool:
        """Shares and scores are fractions in [0, 1] (rules write them in percent / points)."""
        return self.unit in ("share", "score")


def _item(
    name, description, higher, *, tasks=(), column=None, phrases=(), scale="binary", requires=""
):
    return MetricSpec(
        name,
        description,
        higher,
        "scoring",
        "share" if scale == "binary" else "score",
        column=column,
        tasks=tuple(tasks),
        phrases=tuple(phrases),
        scale=scale,
        requires=requires,
    )


_CHOICE = ("classification", "multiple_choice")
_BOOT = ("bca_bootstrap", "bca_bootstrap", "bca_bootstrap")


def _calibration(name, description, higher, *, phrases=(), unit="score", requires=""):
    return MetricSpec(
        name,
        description,
        higher,
        "calibration",
        unit,
        kind="aggregate",
        scale="bounded",
        phrases=tuple(phrases),
        intervals=_BOOT,
        table="calibration_comparison",
        requires=requires,
    )


# --------------------------------------------------------------------------- serving (stage 5)

_INF = float("inf")

#: Evidence slices of the serving stage: ``profile`` (``synchronous``, ``throughput``),
#: ``concurrency`` (N users), ``rate`` (requests/s of an open-loop profile), ``prompt_length``
#: (``short``, ``long``, ``longest``), ``synthetic`` (``128/64``...), ``batch_size``.
LOAD_SLICES = ("profile", "concurrency", "rate", "prompt_length", "synthetic", "batch_size")
_EVAL_SLICES = ("profile", "concurrency", "rate", "prompt_length", "batch_size")
_PEAK = "the highest value over the model's eval-traffic profiles (saturation)"
_POINT = "the operating point: the profile with the highest goodput (with an SLO), else throughput"
_POOLED = (
    "all measured requests of the model's loaded profiles (every profile but those sending one "
    "request at a time, unless there are only those), pooled"
)
_ONCE = "measured once per deployment"
_LATENCY_KINDS = {
    "ttft": ("time to first token", ("first token latency", "time to first token", "ttft")),
    "tpot": (
        "time per output token after the first",
        ("time per output token", "tpot", "per token latency"),
    ),
    "itl": ("gap between consecutive streamed tokens", ("inter token latency", "itl", "token gap")),
    "e2e": (
        "end-to-end request latency",
        ("end to end latency", "e2e latency", "request latency", "response time", "latency"),
    ),
}
_QUANTILES = {
    "50": ("p50", "median"),
    "90": ("p90", "90th percentile"),
    "95": ("p95", "95th percentile"),
    "99": ("p99", "99th percentile"),
}


def _served(name, description, higher, unit, intervals, *, slices, overall, phrases=()):
    """A serving-stage metric (value interval, change interval, relative-change interval)."""
    return MetricSpec(
        name,
        description,
        higher,
        "serving",
        unit,
        kind="aggregate",
        scale="bounded" if unit == "share" else "unbounded",
        phrases=tuple(phrases),
        value_range=(0.0, 1.0) if unit == "share" else (0.0, _INF),
        intervals=intervals,
        table="serving_evidence",
        slices=tuple(slices),
        overall=overall,
    )


def _latencies() -> list[MetricSpec]:
    out = []
    for key, (what, nouns) in _LATENCY_KINDS.items():
        value = "cluster_bootstrap" if key == "itl" else "order_statistic"
        change = f"{value}_union"
        for q, words in _QUANTILES.items():
            out.append(
                _served(
                    f"{key}_p{q}_ms",
                    f"{words[0]} {what} over successful requests (ms)",
                    False,
                    "ms",
                    (value, change, change),
                    slices=LOAD_SLICES,
                    overall="the study's serving.reference profile (default synchronous)",
                    phrases=[f"{w} {n}" for w in words for n in nouns],
                )
            )
    return out


_RATE = ("clopper_pearson", "clopper_pearson_union", "clopper_pearson_union")
_PAIRED = ("clopper_pearson", "tango_cc", "tang_cc")
_POISSON = ("garwood_poisson", "poisson_ratio_conditional", "poisson_ratio_conditional")
_ONE = ("single_measurement", "single_measurement", "single_measurement")
_UNION = ("union_product", "union_bound", "union_bound")

_SERVING: list[MetricSpec] = [
    *_latencies(),
    _served(
        "throughput_rps",
        "successful requests per second over the measured window",
        True,
        "requests/s",
        _POISSON,
        slices=LOAD_SLICES,
        overall=_PEAK,
        phrases=("throughput", "requests per second", "request throughput", "req/s", "rps"),
    ),
    _served(
        "output_tokens_per_s",
        "generated tokens per second over the measured window",
        True,
        "tokens/s",
        _UNION,
        slices=LOAD_SLICES,
        overall=_PEAK,
        phrases=(
            "output tokens per second",
            "token throughput",
            "output throughput",
            "generation throughput",
            "tokens per second",
            "decode speed",
        ),
    ),
    _served(
        "goodput_rps",
        "requests per second that met every latency SLO (errors are misses)",
        True,
        "requests/s",
        _POISSON,
        slices=LOAD_SLICES,
        overall=_PEAK,
        phrases=("goodput", "good requests per second", "requests within the slo per second"),
    ),
    _served(
        "goodput_share",
        "share of requests that met every latency SLO",
        True,
        "share",
        _RATE,
        slices=LOAD_SLICES,
        overall=_POINT,
        phrases=("share of requests within the slo", "slo attainment"),
    ),
    _served(
        "error_rate_under_load",
        "share of requests that failed under load (any error "
        "class, timeouts and cut streams included)",
        False,
        "share",
        _RATE,
        slices=LOAD_SLICES,
        overall=_POOLED,
        phrases=("errors under load", "failed requests under load", "request failures"),
    ),
    _served(
        "timeout_rate",
        "share of requests that hit the client timeout",
        False,
        "share",
        _RATE,
        slices=LOAD_SLICES,
        overall=_POOLED,
        phrases=("timeouts", "request timeouts"),
    ),
    _served(
        "interrupted_rate",
        "share of streams the server cut short ([DONE] without a finish_reason)",
        False,
        "share",
        _RATE,
        slices=LOAD_SLICES,
        overall=_POOLED,
        phrases=("interrupted streams", "cut streams", "truncated streams"),
    ),
    _served(
        "parse_failure_under_load",
        "share of answered requests whose JSON, label or option could not be read",
        False,
        "share",
        _PAIRED,
        slices=_EVAL_SLICES,
        overall=_POINT,
        phrases=("parse failures under load", "unparsable answers under load"),
    ),
    _served(
        "accuracy_under_load",
        "share of eval requests answered correctly under load (failed requests count as wrong)",
        True,
        "share",
        _PAIRED,
        slices=_EVAL_SLICES,
        overall=_POINT,
        phrases=("served accuracy", "accuracy when served"),
    ),
    _served(
        "load_flip_rate",
        "share of items whose correctness changed between this profile and the unloaded reference",
        False,
        "share",
        _RATE,
        slices=_EVAL_SLICES,
        overall=_POINT,
        phrases=("answers changed by load", "flips under load"),
    ),
    _served(
        "batch_flip_rate",
        "share of items whose correctness differs between batch size / "
        "concurrency 1 and N (noise floor)",
        False,
        "share",
        _RATE,
        slices=("batch_size", "concurrency"),
        overall="the largest batch size (in process) or concurrency (server) against 1",
        phrases=("batch size flip rate", "batching flips"),
    ),
    _served(
        "peak_memory_mb",
        "peak resident memory of the serving process tree (psutil RSS)",
        False,
        "MB",
        _ONE,
        slices=(),
        overall=_ONCE,
        phrases=(
            "peak memory",
            "peak memory use",
            "peak memory usage",
            "memory",
            "ram",
            "resident memory",
        ),
    ),
    _served(
        "peak_gpu_memory_mb",
        "peak GPU memory of the serving processes (NVML or nvidia-smi)",
        False,
        "MB",
        _ONE,
        slices=(),
        overall=_ONCE,
        phrases=("peak gpu memory", "gpu memory", "vram"),
    ),
    _served(
        "size_on_disk_mb",
        "size of the model's files on disk",
        False,
        "MB",
        _ONE,
        slices=(),
        overall=_ONCE,
        phrases=("size on disk", "model size", "disk footprint"),
    ),
    _served(
        "cold_start_s",
        "process start (or model load) to the first streamed token of the first request",
        False,
        "s",
        _ONE,
        slices=(),
        overall=_ONCE,
        phrases=("cold start", "cold start time", "startup time"),
    ),
    _served(
        "cost_per_request_usd",
        "serving cost per request from the cost: block (hourly "
        "price / request rate, or token prices)",
        False,
        "USD",
        _POISSON,
        slices=(),
        overall=_POINT,
        phrases=("cost per request", "serving cost per request", "price per request"),
    ),
    _served(
        "cost_per_1k_correct_usd",
        "serving cost per 1,000 correct answers (cost per request x 1000 / accuracy under load)",
        False,
        "USD",
        _UNION,
        slices=(),
        overall=_POINT,
        phrases=(
            "cost per 1,000 correct answers",
            "cost per 1000 correct answers",
            "cost per thousand correct answers",
            "cost per correct answer",
        ),
    ),
]


#: What the perturbation metrics require (a study with a ``perturbations:`` block).
REQUIRES_SUITE = "a perturbation suite (perturbations: in the study)"
_SUITE = REQUIRES_SUITE
_TOKENS = (
    "token distributions of the baseline and the candidate (teacher forcing with transformers "
    "or llama.cpp, one vocabulary)"
)


def _shift(base: str, column: str, higher: bool, tasks: tuple[str, ...]) -> MetricSpec:
    """The robustness metric of ``base``: its change from an item to its perturbed copy."""
    words = base.replace("_", " ")
    return MetricSpec(
        f"{base}_shift",
        f"{words} on an item's perturbed copy minus on the item (paired, per perturbation); "
        f"the change vs the baseline is the robustness gap (this shift minus the baseline's)",
        higher,
        "robustness",
        kind="aggregate",
        column=column,
        tasks=tasks,
        phrases=(f"{words} under perturbation", f"{words} shift under perturbation"),
        value_range=(-1.0, 1.0),
        intervals=("tango_cc", "tango_cc_gap", "tango_cc_gap"),
        table="robustness_evidence",
        requires=_SUITE,
    )


def _distribution(name, description, higher, unit, phrases, rng, *, requires=_TOKENS):
    return MetricSpec(
        name,
        description,
        higher,
        "robustness",
        unit,
        kind="aggregate",
        scale="unbounded" if unit == "nats" else "bounded",
        phrases=tuple(phrases),
        value_range=rng,
        intervals=_CLUSTER,
        table="distribution_evidence",
        requires=requires,
    )


_CLUSTER = ("cluster_bootstrap_t", "cluster_bootstrap_t", "cluster_bootstrap_t")

# --------------------------------------------------------------------------- routing (stage 6)

#: Evidence of the routed system (``<candidate>+router``): every item metric of the blended
#: outcomes (the same specs as any candidate's, stored in ``routing_evidence``) plus these.
_ROUTED = "the routed system on the judged (held-out or cross-fitted) items"


def _routed(name, description, higher, unit, method, *, phrases):
    return MetricSpec(
        name,
        description,
        higher,
        "routing",
        unit,
        kind="aggregate",
        scale="bounded" if unit == "share" else "unbounded",
        phrases=tuple(phrases),
        value_range=(0.0, 1.0) if unit == "share" else (0.0, _INF),
        intervals=(method, method, method),
        table="routing_evidence",
        overall=_ROUTED,
    )


_ROUTING: list[MetricSpec] = [
    _routed(
        "fallback_rate",
        "share of requests the router sends to the fallback model",
        False,
        "share",
        "clopper_pearson",
        phrases=("fallback", "fallback share", "deferral rate", "share of requests routed"),
    ),
    _routed(
        "blended_latency_p95_ms",
        "p95 end-to-end latency of the routed system (a fallback request pays small + large)",
        False,
        "ms",
        "order_statistic",
        phrases=(
            "blended p95 latency",
            "blended latency",
            "routed p95 latency",
            "p95 latency of the routed system",
        ),
    ),
    _routed(
        "blended_cost_per_request_usd",
        "mean cost per request of the routed system (small always, large on fallback)",
        False,
        "USD",
        "bca_bootstrap",
        phrases=("blended cost", "blended cost per request", "routed cost per request"),
    ),
    _routed(
        "blended_compute_s_per_request",
        "mean model seconds per request of the routed system (cost without a cost: block)",
        False,
        "s",
        "bca_bootstrap",
        phrases=("blended compute", "compute seconds per request"),
    ),
    _routed(
        "routing_cost_saving",
        "share of the large-model-only cost the routed system saves (1 - blended / large-only)",
        True,
        "share",
        "bca_bootstrap",
        phrases=("cost saving", "routing saving", "savings"),
    ),
]

_BUILTIN: list[MetricSpec] = [
    # ---------------------------------------------------------------- scoring (item metrics)
    _item(
        "accuracy",
        "share of items answered correctly (each task's primary outcome)",
        True,
        column="correct",
        phrases=("overall accuracy", "answer accuracy", "correctness"),
    ),
    _item(
        "choice_accuracy",
        "accuracy of the highest-probability option (logprob scoring)",
        True,
        tasks=_CHOICE,
        column="choice_correct",
        phrases=("choice accuracy", "logprob accuracy"),
        requires="choice scoring (a runtime that scores options, or choice_probs in a file)",
    ),
    _item(
        "choice_accuracy_norm",
        "accuracy of the option with the highest logprob per character of its text "
        "(lm-evaluation-harness acc_norm)",
        True,
        tasks=_CHOICE,
        column="choice_correct_norm",
        phrases=("normalized choice accuracy", "acc norm", "length normalized accuracy"),
        requires="options scored by logprob (choice_logprobs; a predictions file has none)",
    ),
    _item(
        "recall",
        "share of a label's items predicted as that label, pooled over the labels of a "
        "label-defined slice (label_rarity): 'rare-label recall'",
        True,
        tasks=("classification",),
        column="correct",
        phrases=("label recall", "intent recall", "class recall"),
    ),
    _item(
        "json_parse_failure",
        "share of outputs that are not strict JSON (no repair)",
        False,
        tasks=("extraction", "tool_call"),
        phrases=(
            "json parse failure rate",
            "json failure",
            "parse failure",
            "invalid json",
            "unparsable json",
        ),
    ),
    _item(
        "field_accuracy",
        "share of extraction fields exactly right (null = not found)",
        True,
        tasks=("extraction",),
        scale="bounded",
        phrases=("extraction field accuracy",),
    ),
    _item(
        "not_found_correct",
        "share of absent fields returned as null",
        True,
        tasks=("extraction",),
        scale="bounded",
        phrases=("not found accuracy", "null accuracy"),
    ),
    _item(
        "hallucinated_field_rate",
        "share of absent fields returned with a value",
        False,
        tasks=("extraction",),
        scale="bounded",
        phrases=("hallucinated field", "field hallucination", "hallucination rate"),
    ),
    _item(
        "missed_field_rate",
        "share of present fields returned as null",
        False,
        tasks=("extraction",),
        scale="bounded",
        phrases=("missed field",),
    ),
    _item(
        "refusal_rate",
        "share of outputs that refuse",
        False,
        tasks=("refusal",),
        column="refused",
        phrases=("refusal",),
    ),
    _item(
        "unsafe_compliance",
        "share of harmful requests answered instead of refused",
        False,
        tasks=("refusal",),
        phrases=("unsafe compliance rate", "harmful compliance"),
    ),
    _item(
        "over_refusal",
        "share of benign requests refused",
        False,
        tasks=("refusal",),
        phrases=("over refusal rate", "false refusal"),
    ),
    _item(
        "valid_call",
        "share of outputs that are a well-formed tool call",
        True,
        tasks=("tool_call",),
        phrases=("valid tool call",),
    ),
    _item(
        "right_tool",
        "share of calls naming the expected tool",
        True,
        tasks=("tool_call",),
        phrases=("tool selection accuracy", "right tool rate"),
    ),
    _item(
        "args_exact",
        "share of calls with exactly the expected arguments",
        True,
        tasks=("tool_call",),
        phrases=("exact argument", "exact arguments"),
    ),
    _item(
        "args_partial",
        "mean share of expected arguments matched",
        True,
        tasks=("tool_call",),
        scale="bounded",
        phrases=("partial argument", "partial arguments"),
    ),
    _item(
        "chrf",
        "chrF similarity to the reference (0-1, sacrebleu)",
        True,
        tasks=("generation",),
        scale="bounded",
        phrases=("chrf score",),
    ),
    _item(
        "human_score",
        "reviewer score from an imported review sheet, on 0-1 (0-5 sheets divided by 5)",
        True,
        tasks=("generation",),
        scale="bounded",
        phrases=("reviewer score", "review score"),
        requires="an imported review sheet (kit.scoring.review)",
    ),
    _item(
        "error_rate",
        "share of requests that failed during the eval run (timeouts, server errors)",
        False,
        column="error",
        phrases=("request error", "failed request"),
    ),
    # numerical and decoding artifacts (kit.scoring.artifacts), every task
    _item(
        "empty_output_rate",
        "share of answers that are empty (whitespace and zero-width characters only)",
        False,
        column="empty_output",
        phrases=("empty output", "empty answer", "blank answer"),
    ),
    _item(
        "repetition_rate",
        "share of answers caught in a degenerate repetition loop (repeated 4-grams or a "
        "repeated character run over half the answer)",
        False,
        column="degenerate_repetition",
        phrases=("degenerate repetition", "repetition loop", "looping answer", "repetition"),
    ),
    _item(
        "truncation_rate",
        "share of answers cut off at max_new_tokens (finish reason 'length')",
        False,
        column="truncated",
        phrases=(
            "truncation",
            "truncated answer",
            "truncated answers",
            "truncated output",
            "max token truncation",
        ),
        requires="a runtime that reports why decoding stopped (not a predictions file)",
    ),
    _item(
        "nonfinite_logit_rate",
        "share of answers whose decoding met a NaN or inf logit",
        False,
        column="nonfinite_logits",
        phrases=(
            "nan logits",
            "nan/inf logits",
            "non finite logits",
            "nonfinite logits",
            "inf logits",
        ),
        requires="an in-process runtime that exposes logits (transformers, llama.cpp)",
    ),
    # ---------------------------------------------------------------- comparison (stage 3)
    MetricSpec(
        "flip_rate",
        "share of paired items whose primary outcome flipped (right->wrong + wrong->right)",
        False,
        "comparison",
        kind="aggregate",
        phrases=("flip", "answer flip", "answer flip rate"),
        intervals=("clopper_pearson", "clopper_pearson", "clopper_pearson"),
        table="flip_evidence",
    ),
    MetricSpec(
        "macro_f1",
        "unweighted mean of the per-label F1 scores (classification)",
        True,
        "comparison",
        "score",
        kind="aggregate",
        scale="bounded",
        tasks=("classification",),
        phrases=("macro f1 score", "macro averaged f1"),
        intervals=_BOOT,
        table="label_evidence",
    ),
    # ---------------------------------------------------------------- calibration (stage 4)
    _calibration(
        "ece",
        "expected calibration error, uniform bins (0-1)",
        False,
        phrases=("expected calibration error", "calibration error"),
    ),
    _calibration(
        "ece_adaptive",
        "expected calibration error, equal-mass bins",
        False,
        phrases=("adaptive ece",),
    ),
    _calibration(
        "mce",
        "maximum calibration error over non-empty uniform bins",
        False,
        phrases=("maximum calibration error",),
    ),
    _calibration(
        "brier", "mean squared error of confidence vs correctness", False, phrases=("brier score",)
    ),
    _calibration(
        "accuracy_at_coverage",
        "accuracy on the most confident predictions at the study's calibration coverage "
        "(threshold rule; 80% by default)",
        True,
        phrases=("selective accuracy", "accuracy at coverage"),
        unit="share",
    ),
    _calibration(
        "admits_uncertainty_rate",
        "share of items flagged admits_uncertainty whose answer says the context lacks it",
        True,
        phrases=("admits uncertainty", "uncertainty admission rate"),
        unit="share",
        requires="eval items flagged admits_uncertainty",
    ),
    # ---------------------------------------------------------------- robustness (stage 4b)
    *(
        _shift(base, column, higher, tasks)
        for base, column, higher, tasks in (
            ("accuracy", "correct", True, ()),
            ("json_parse_failure", "json_parse_failure", False, ("extraction", "tool_call")),
            ("unsafe_compliance", "unsafe_compliance", False, ("refusal",)),
            ("over_refusal", "over_refusal", False, ("refusal",)),
        )
    ),
    MetricSpec(
        "perturbation_flip_rate",
        "share of perturbed copies whose primary outcome differs from their original's "
        "(right->wrong + wrong->right)",
        False,
        "robustness",
        kind="aggregate",
        phrases=("perturbation flip", "perturbation flips", "robustness flip rate"),
        table="robustness_evidence",
        requires=_SUITE,
    ),
    _distribution(
        "mean_token_kl",
        "mean KL divergence KL(baseline || candidate) per generated token of the baseline's "
        "answers (nats; teacher forcing, top-k with tail; kit.analysis.distributions)",
        False,
        "nats",
        ("kl divergence", "mean kl", "mean kl divergence", "token kl", "kld", "mean kld"),
        (0.0, _INF),
    ),
    _distribution(
        "same_top_token_rate",
        "share of the baseline's answer positions where the candidate's most probable token "
        "is the baseline's (llama.cpp 'same top p')",
        True,
        "share",
        ("same top token", "same top p", "top token agreement", "top 1 agreement"),
        (0.0, 1.0),
    ),
    _distribution(
        "reference_token_delta_p",
        "mean change (candidate - baseline) in the probability of the baseline's next token "
        "along its answers (llama.cpp 'delta p')",
        True,
        "share",
        ("delta p", "mean delta p", "reference token probability change"),
        (-1.0, 1.0),
    ),
    _distribution(
        "choice_kl",
        "mean KL divergence KL(baseline || candidate) of the normalized option probabilities "
        "per choice item (nats)",
        False,
        "nats",
        ("choice kl divergence", "option kl", "option kl divergence"),
        (0.0, _INF),
        requires="option probabilities (choice_probs) for the baseline and the candidate",
    ),
    _distribution(
        "choice_js",
        "mean Jensen-Shannon divergence of the normalized option probabilities per choice "
        "item (nats, at most ln 2)",
        False,
        "nats",
        ("js divergence", "jensen shannon divergence", "choice js divergence"),
        (0.0, 0.6931471805599453),
        requires="option probabilities (choice_probs) for the baseline and the candidate",
    ),
    *_SERVING,
    # ---------------------------------------------------------------- routing (stage 6)
    *_ROUTING,
]

#: name -> spec; custom scorers add theirs with :func:`register_metric`.
METRICS: dict[str, MetricSpec] = {m.name: m for m in _BUILTIN}


def metric(name: str) -> MetricSpec:
    """The registered spec of ``name`` (a metric name or an outcome column such as ``correct``).

    Raises
    ------
    CompkitError
        Listing the registered metrics.
    """
    if name in METRICS:
        return METRICS[name]
    by_column = metric_for_column(name)
    if by_column is not None:
        return by_column
    import difflib

    close = difflib.get_close_matches(name, list(METRICS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CompkitError(
        f"unknown metric {name!r}{hint}; valid metrics: {', '.join(sorted(METRICS))}"
    )


def metric_for_column(column: str) -> MetricSpec | None:
    """The item metric stored in outcome column ``column`` (``correct`` -> accuracy)."""
    for spec in METRICS.values():
        if spec.kind == "item" and spec.outcome_column == column and spec.name != "recall":
            return spec
    return None


def item_metrics() -> list[MetricSpec]:
    """Per-item metrics (columns of ``outcomes.parquet``), in registry order."""
    return [m for m in METRICS.values() if m.kind == "item" and m.name != "recall"]


def register_metric(spec: MetricSpec, *, replace: bool = False) -> MetricSpec:
    """Add a custom metric (a scorer's column). Registering the same spec twice is a no-op.

    Raises
    ------
    CompkitError
        When ``spec.name`` is taken by a different metric (kit's own can never be replaced).
    """
    old = METRICS.get(spec.name)
    if old is not None and old != spec and (old.builtin or not replace):
        raise CompkitError(
            f"metric {spec.name!r} is already registered ({old.description}); choose another name"
            + ("" if old.builtin else " or pass replace=True")
        )
    METRICS[spec.name] = spec
    return spec


def custom_item_metric(
    name: str, description: str, *, higher_is_better: bool, tasks: Iterable[str] = ()
) -> MetricSpec:
    """A spec for a scorer's own per-item column in [0, 1] (judged by the BCa bootstrap)."""
    return MetricSpec(
        name,
        description,
        bool(higher_is_better),
        "scoring",
        "score",
        scale="bounded",
        tasks=tuple(tasks),
        builtin=False,
    )


def shift_metric(base: str) -> str | None:
    """The robustness metric measuring ``base`` under perturbation (``accuracy`` ->
    ``accuracy_shift``), or None when ``base`` is not measured under perturbations."""
    name = f"{base}_shift"
    spec = METRICS.get(name)
    return name if spec is not None and spec.stage == "robustness" else None


def phrase_index() -> Mapping[str, str]:
    """Budget phrase (lower case, spaces) -> metric name: names with spaces and ``phrases``."""
    out: dict[str, str] = {}
    for spec in METRICS.values():
        out[spec.name.replace("_", " ")] = spec.name
        for phrase in spec.phrases:
            out[phrase.lower().replace("-", " ").replace("_", " ")] = spec.name
    return out


# --------------------------------------------------------------------------- formatting

_UNIT_SUFFIX = {
    "ms": " ms",
    "s": " s",
    "tokens/s": " tokens/s",
    "requests/s": " requests/s",
    "MB": " MB",
    "nats": " nats",
}
#: What a verdict bounds: the metric itself, candidate - baseline, or that over the baseline.
QUANTITIES = ("value", "change", "relative change")


def format_value(x: float | None, *, unit: str, quantity: str = "value") -> str:
    """A number as the memo and the reasons print it: ``12.5%``, ``-3.0 points``, ``+4.1%``,
    ``380 ms``, ``0.042``; ``n/a`` when missing or infinite.

    Examples
    --------
    >>> format_value(-0.031, unit="share", quantity="change")
    '-3.1 points'
    """
    import math

    if x is None or not isinstance(x, int | float) or not math.isfinite(x):
        return "n/a"
    if quantity == "relative change":
        return f"{x * 100:+.1f}%"
    change = quantity == "change"
    sign = "+" if change else ""
    if unit == "share":
        return f"{x * 100:+.1f} points" if change else f"{x * 100:.1f}%"
    if unit == "score":
        return f"{x:{sign}.3f}"
    if unit == "USD":
        return f"{'-' if x < 0 else sign}${abs(x):.4g}"
    digits = 0 if unit in ("ms", "MB") and abs(x) >= 10 else (3 if unit == "nats" else 1)
    return f"{x:{sign}.{digits}f}{_UNIT_SUFFIX.get(unit, '')}"


def format_interval(low: float | None, high: float | None, *, unit: str, quantity: str) -> str:
    """``a to b`` in :func:`format_value` units (``-inf``/``inf`` ends read as unbounded)."""
    import math

    def end(x: float | None) -> str:
        if isinstance(x, int | float) and math.isinf(x):
            return "unbounded" if x > 0 else "-unbounded"
        return format_value(x, unit=unit, quantity=quantity)

    return f"{end(low)} to {end(high)}"


def format_limit(x: float, *, unit: str, change: str | bool) -> str:
    """A threshold, without rounding it away: ``0.5%``, ``-1 point``, ``-2%``, ``400 ms``."""

    def g(v: float, signed: bool = False) -> str:
        text = f"{round(v, 9):g}"
        return f"+{text}" if signed and v > 0 else text

    if change == "relative":
        return f"{g(x * 100, signed=True)}%"
    if unit == "share" and change == "points":
        return f"{g(x * 100, signed=True)} point" + ("" if abs(x) == 0.01 else "s")
    if unit == "share":
        return f"{g(x * 100)}%"
    if unit == "USD":
        return f"${x:g}"
    return f"{g(x, signed=bool(change))}{_UNIT_SUFFIX.get(unit, '')}"
