"""The acceptance budget: product-language rules, frozen before results, judged by their CIs.

A budget file lists rules a product owner can read, each with the product consequence that
motivates it::

    rules:
      - rule: JSON parse failures must stay under 0.5 percent
        why: an unparsable reply stalls the ticket
      - rule: rare-label recall cannot drop by more than 1 point
      - rule: accuracy may drop at most 2 percent relative
        id: acc-rel                      # optional; default R1, R2, ...

Each sentence parses (:func:`parse_rule`) into a small frozen value: :class:`Rule` with a
``metric``, an optional :class:`SliceRef` and either an :class:`AbsoluteBound` on the
candidate's value or a :class:`ChangeBound` on its change against the baseline. The
sentence is what the memo quotes; the value is what :func:`evaluate_rules` judges.

Grammar
-------
A sentence is ``<subject> [<slice>] <predicate> [<slice>]`` (case-insensitive, a final
period is ignored). Regular expressions only, no model.

*Subject*: a metric name or alias (``JSON parse failures``, ``unsafe compliance``,
``hallucinated fields``, ``ECE``, ``p95 first-token latency``, ``fallback rate``, ``flip
rate``; every registered name with ``_`` written as a space also works, plural or not),
optionally prefixed by ``rare-label``/``common-label`` (slice ``label_rarity``) or a task
name (``extraction accuracy`` = accuracy on ``task=extraction``). :data:`METRIC_ALIASES`
lists the phrases. ``rare-label recall`` is ``recall`` on ``label_rarity=rare``, judged
on that slice's accuracy rows (recall pooled over the rare labels' items, with a paired
CI); the registry's macro ``rare_label_recall`` is reachable through the structured form.

*Slice* (at most one per rule): ``on the <value> slice``, ``for <column>=<value>``,
``for rare labels``, ``on extraction items`` (also prompts/requests/examples/questions/
tickets/messages), ``in German``. A bare value is looked up among the known slice values.

*Predicate*, tried in this order:

1. change by an amount: ``cannot drop by more than 1 point`` (change >= -1 point),
   ``may drop at most 2 percent relative`` (relative change >= -2%), ``may rise by up to
   50 ms``, ``must not increase by more than 0.5 pp``, ``may drop by 1 point at most``.
   Verbs: drop/fall/decrease/decline/go down/lose, rise/increase/grow/go up/climb, and
   worsen/get worse/degrade/regress (direction from the metric registry). Amount words:
   with a negation ``more than``; without one ``at most``, ``no more than``, ``up to``
   (inclusive) or ``less than``/``under`` (strict). Units: ``points``/``point``/``pp``/
   ``percentage points`` (shares), ``N percent relative``/``N% relative``, or the metric's
   own unit (``ms``, ``seconds``, ``MB``...). A bare ``percent`` change of a share metric is
   ambiguous and is refused with a hint.
2. no change: ``must not increase``, ``cannot drop``, ``must never get worse``;
   ``must stay at or below the baseline``, ``no worse than the baseline``.
3. absolute level: ``[must|should|may|...] [not] [stay|remain|be] <comparator> <number>
   [unit]`` or the terse ``flip rate below 5 percent``. Comparators: ``under``/``below``/
   ``less than`` (<), ``at most``/``no more than``/``not above`` (<=), ``above``/``over``/
   ``more than`` (>), ``at least``/``no less than``/``not below`` (>=), the symbols, and the
   verbs ``exceed``, ``fall below``, ``rise above`` (``must not exceed 400 ms`` is <= 400).
   A negation flips the comparator. Also ``must be 80 percent or more``.

Numbers take ``%``/``percent`` (shares become fractions: 0.5 percent = 0.005), ``ms``/
``seconds``, ``MB``/``GB``, ``tokens/s``, ``requests/s``, ``$``/``USD``; a bare number is
read in the metric's own unit (a share must then be <= 1). Anything the grammar cannot say
goes in the structured form of a rule (``metric``, ``slice: column=value``, ``bound: {op,
value}`` or ``bound: {change: points|absolute|relative|no_increase|no_decrease, op, limit}``
in the metric's units, shares and relative changes as fractions); the sentence is still
the quoted form.

Verdicts
--------
:func:`evaluate_rules` reads the long comparison frame (``kit.analysis.compare.compare_models`` /
``kit.analysis.slices.slice_table`` rows, plus stage rows such as :func:`flip_rate_evidence` and
:func:`stage_evidence`) and gives one row per candidate and rule: ``pass`` when the whole
CI lies inside the bound, ``fail`` when it lies wholly outside, ``inconclusive`` otherwise
(with ``n_needed``), ``not measured`` when the evidence has no row for the metric and slice.
:func:`decide` turns those into ``accepted`` / ``rejected`` / ``inconclusive`` per candidate.

Example
-------
>>> rule = parse_rule("JSON parse failures must stay under 0.5 percent")
>>> rule.metric, rule.bound
('json_parse_failure', AbsoluteBound(op='<', value=0.005))
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticError

from kit import scoring
from kit.errors import CompkitError

Op = Literal["<", "<=", ">", ">="]
ChangeKind = Literal["points", "absolute", "relative", "no_increase", "no_decrease"]
Verdict = Literal["pass", "fail", "inconclusive", "not measured"]

OP_SYMBOL = {"<": "<", "<=": "≤", ">": ">", ">=": "≥"}
VERDICTS = ("pass", "fail", "inconclusive", "not measured")
DECISIONS = ("accepted", "rejected", "inconclusive")
#: Columns of :func:`evaluate_rules`, in order.
VERDICT_COLUMNS = [
    "candidate",
    "rule",
    "metric",
    "slice",
    "observed",
    "baseline",
    "threshold",
    "ci_low",
    "ci_high",
    "n",
    "verdict",
    "reason",
    "n_needed",
    "rule_id",
    "why",
    "quantity",
    "op",
    "unit",
]
DECISION_COLUMNS = [
    "candidate",
    "decision",
    "n_rules",
    "n_pass",
    "n_fail",
    "n_inconclusive",
    "n_not_measured",
    "reason",
]
#: Evidence columns :func:`evaluate_rules` needs; the others of the result shape are optional.
EVIDENCE_REQUIRED = ["model", "slice", "slice_value", "metric", "value"]
EVIDENCE_OPTIONAL = [
    "baseline_value",
    "delta",
    "ci_low",
    "ci_high",
    "n",
    "value_ci_low",
    "value_ci_high",
]


# --------------------------------------------------------------------------- stage metrics


@dataclass(frozen=True)
class StageMetric:
    """A metric a rule may name, with the stage that produces it.

    ``unit`` is ``share`` (a fraction shown as %), ``score`` (a 0-1 number shown plainly),
    or a physical unit (``ms``, ``tokens/s``, ``requests/s``, ``MB``, ``USD``).
    """

    name: str
    stage: str
    higher_is_better: bool
    unit: str
    description: str = ""
    aggregation: str = "mean"  # as kit.scoring.MetricInfo: mean of per-item values or not


#: Metrics computed by later stages (not by :mod:`kit.scoring`); rules on them read rows the
#: stage adds to the evidence, and are ``not measured`` until it does. ``error_rate`` is
#: also registered by scoring (failed requests of the eval run); that entry wins for lookup.
STAGE_METRICS: dict[str, StageMetric] = {
    m.name: m
    for m in [
        StageMetric("ttft_p50_ms", "serving", False, "ms", "median time to first token"),
        StageMetric("ttft_p95_ms", "serving", False, "ms", "95th percentile time to first token"),
        StageMetric("ttft_p99_ms", "serving", False, "ms", "99th percentile time to first token"),
        StageMetric("tokens_per_s", "serving", True, "tokens/s", "decode speed per request"),
        StageMetric("throughput_rps", "serving", True, "requests/s", "requests served per second"),
        StageMetric("peak_memory_mb", "serving", False, "MB", "peak accelerator/host memory"),
        StageMetric("cost_per_1k_requests", "serving", False, "USD", "serving cost per 1000"),
        StageMetric("error_rate", "serving", False, "share", "share of requests that failed"),
        StageMetric("fallback_rate", "routing", False, "share", "share routed to the fallback"),
        StageMetric("system_accuracy", "routing", True, "share", "accuracy of the routed system"),
        StageMetric("ece", "calibration", False, "score", "expected calibration error"),
        StageMetric("ece_adaptive", "calibration", False, "score", "ECE with quantile bins"),
        StageMetric("brier", "calibration", False, "score", "Brier score"),
        StageMetric("flip_rate", "comparison", False, "share", "right->wrong + wrong->right"),
    ]
}

#: ``recall`` of a set of gold labels is accuracy on the items with those labels, so a
#: recall rule on a label-defined slice (``label_rarity``) reads the ``accuracy`` rows of
#: that slice when the evidence has no ``recall`` rows: recall pooled over the slice's
#: items, with the paired CI of :func:`kit.analysis.slices.slice_table`. The phrase "rare-label
#: recall" means this; the registry's ``rare_label_recall`` (unweighted mean over the rare
#: labels, no paired CI yet) is available through the structured form. Used when the
#: scoring registry has no ``recall`` entry of its own.
RECALL = StageMetric("recall", "scoring", True, "share", "accuracy on items of the slice's labels")
LABEL_SLICES = ("label_rarity",)


def metric_spec(name: str) -> StageMetric:
    """Registry entry for a metric a rule may name (scoring first, then stage metrics).

    Raises
    ------
    CompkitError
        Listing every valid metric name.
    """
    if name in scoring.METRICS:
        info = scoring.METRICS[name]
        return StageMetric(
            name, "scoring", info.higher_is_better, "share", info.description, info.aggregation
        )
    if name == RECALL.name:
        return RECALL
    if name in STAGE_METRICS:
        return STAGE_METRICS[name]
    raise CompkitError(f"unknown metric {name!r}; valid metrics: {', '.join(known_metrics())}")


def known_metrics() -> list[str]:
    """Every metric name a rule may use: :data:`kit.scoring.METRICS` + stage metrics + recall."""
    return sorted({*scoring.METRICS, *STAGE_METRICS, RECALL.name})


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class SliceRef:
    """One slice: ``column=value`` (``label_rarity=rare``, ``task=extraction``)."""

    column: str
    value: str

    def __str__(self) -> str:
        return f"{self.column}={self.value}"


@dataclass(frozen=True)
class AbsoluteBound:
    """The candidate's value ``op value`` (in the metric's unit; shares as fractions)."""

    op: Op
    value: float

    @property
    def threshold(self) -> float:
        return self.value

    def describe(self, unit: str, *, short: bool = False) -> str:
        """``< 0.5%``, ``< 400 ms`` (``short`` is accepted for symmetry)."""
        return f"{OP_SYMBOL[self.op]} {_fmt_limit(self.value, unit, change=False)}"


@dataclass(frozen=True)
class ChangeBound:
    """The change against the baseline ``op limit``.

    ``points``: candidate - baseline of a share/score metric (fraction: -0.01 = -1 point);
    ``absolute``: the same in a physical unit (ms); ``relative``: (candidate - baseline) /
    baseline as a fraction; ``no_increase`` / ``no_decrease``: change <= 0 / >= 0.
    """

    kind: ChangeKind
    op: Op
    limit: float = 0.0

    @property
    def threshold(self) -> float:
        return self.limit

    def describe(self, unit: str, *, short: bool = False) -> str:
        """``change ≥ -1 point``; ``short`` leaves out the quantity (``≥ -1 point``)."""
        if self.kind == "no_increase":
            return "no increase (≤ 0)" if short else "no increase (change ≤ 0)"
        if self.kind == "no_decrease":
            return "no decrease (≥ 0)" if short else "no decrease (change ≥ 0)"
        what = "" if short else ("relative change " if self.kind == "relative" else "change ")
        return f"{what}{OP_SYMBOL[self.op]} {_fmt_limit(self.limit, unit, change=self.kind)}"


Bound = AbsoluteBound | ChangeBound


@dataclass(frozen=True)
class Rule:
    """One budget rule: the sentence as written and what it means."""

    text: str
    metric: str
    bound: Bound
    slice: SliceRef | None = None
    why: str | None = None
    id: str = ""

    @property
    def slice_label(self) -> str:
        """``column=value`` or ``overall``."""
        return str(self.slice) if self.slice else "overall"

    @property
    def quantity(self) -> str:
        """What the bound is on: ``value``, ``change`` or ``relative change``."""
        if isinstance(self.bound, AbsoluteBound):
            return "value"
        return "relative change" if self.bound.kind == "relative" else "change"

    def describe(self) -> str:
        """The parsed meaning, e.g. ``json_parse_failure < 0.5%``."""
        where = f" on {self.slice}" if self.slice else ""
        return f"{self.metric}{where}: {self.bound.describe(metric_spec(self.metric).unit)}"


@dataclass(frozen=True)
class Budget:
    """A parsed budget file: its rules, content hash and where it was read from."""

    rules: tuple[Rule, ...]
    sha256: str
    source: Path

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def frame(self) -> pd.DataFrame:
        """``rule_id, rule, why, metric, slice, limit`` for the memo's rules table."""
        return pd.DataFrame(
            [
                {
                    "rule_id": r.id,
                    "rule": r.text,
                    "why": r.why,
                    "metric": r.metric,
                    "slice": r.slice_label,
                    "limit": r.bound.describe(metric_spec(r.metric).unit),
                }
                for r in self.rules
            ],
            columns=["rule_id", "rule", "why", "metric", "slice", "limit"],
        )


# --------------------------------------------------------------------------- aliases


def _key(phrase: str) -> str:
    """Normalised phrase for lookups: lower case, ``-``/``_`` as spaces, no article."""
    text = re.sub(r"[-_]", " ", phrase.lower())
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"^(?:the|our|its|a|an) ", "", text)


_LATENCY_ALIASES = {
    f"{prefix} {what}": f"ttft_p{q}_ms"
    for q, prefixes in (
        ("50", ("p50", "median", "50th percentile")),
        ("95", ("p95", "95th percentile")),
        ("99", ("p99", "99th percentile")),
    )
    for prefix in prefixes
    for what in (
        "first token latency",
        "time to first token",
        "ttft",
        "latency",
        "first token time",
    )
}

#: Phrase (normalised by ``_key``) -> metric name. Registered names with spaces also match.
METRIC_ALIASES: dict[str, str] = {
    "json parse failure": "json_parse_failure",
    "json parse failure rate": "json_parse_failure",
    "json failure": "json_parse_failure",
    "parse failure": "json_parse_failure",
    "invalid json": "json_parse_failure",
    "unparsable json": "json_parse_failure",
    "unsafe compliance rate": "unsafe_compliance",
    "harmful compliance": "unsafe_compliance",
    "hallucinated field": "hallucinated_field_rate",
    "field hallucination": "hallucinated_field_rate",
    "missed field": "missed_field_rate",
    "refusal": "refusal_rate",
    "over refusal rate": "over_refusal",
    "false refusal": "over_refusal",
    "valid tool call": "valid_call",
    "exact argument": "args_exact",
    "partial argument": "args_partial",
    "chrf score": "chrf",
    "overall accuracy": "accuracy",
    "request error": "error_rate",
    "failed request": "error_rate",
    "expected calibration error": "ece",
    "calibration error": "ece",
    "adaptive ece": "ece_adaptive",
    "brier score": "brier",
    **_LATENCY_ALIASES,
    "tokens per second": "tokens_per_s",
    "tokens/s": "tokens_per_s",
    "decode speed": "tokens_per_s",
    "generation speed": "tokens_per_s",
    "throughput": "throughput_rps",
    "requests per second": "throughput_rps",
    "peak memory": "peak_memory_mb",
    "peak memory use": "peak_memory_mb",
    "peak memory usage": "peak_memory_mb",
    "memory": "peak_memory_mb",
    "cost per 1k requests": "cost_per_1k_requests",
    "cost per 1000 requests": "cost_per_1k_requests",
    "cost per thousand requests": "cost_per_1k_requests",
    "serving cost": "cost_per_1k_requests",
    "fallback": "fallback_rate",
    "fallback share": "fallback_rate",
    "system accuracy": "system_accuracy",
    "routed accuracy": "system_accuracy",
    "end to end accuracy": "system_accuracy",
    "flip": "flip_rate",
    "answer flip": "flip_rate",
}

_LANGUAGES = {
    "english": "en",
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "italian": "it",
    "portuguese": "pt",
    "dutch": "nl",
    "polish": "pl",
    "japanese": "ja",
    "chinese": "zh",
}


def _lookup_metric(key: str) -> str | None:
    names = {_key(n): n for n in known_metrics()}
    candidates = [key, re.sub(r"s$", "", key), re.sub(r" rate$", "", key), f"{key} rate"]
    candidates.append(re.sub(r"s$", "", re.sub(r" rate$", "", key)))
    for k in candidates:
        if k in names:
            return names[k]
        if k in METRIC_ALIASES:
            return METRIC_ALIASES[k]
    return None


# --------------------------------------------------------------------------- slices


SliceVocabulary = Mapping[str, Sequence[str] | None]


def default_slice_vocabulary() -> dict[str, tuple[str, ...] | None]:
    """Known slice columns and values when no data is given (``None``: any value)."""
    return {
        "task": tuple(scoring.SCORERS),
        "language": None,
        "length_bucket": None,
        "label_rarity": ("rare", "common"),
    }


def slice_vocabulary(slices_frame: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Slice column -> values present, from a slices frame (``frozen/slices.parquet``)."""
    from kit.analysis.slices import default_slice_columns

    return {
        c: tuple(sorted(str(v) for v in slices_frame[c].dropna().unique()))
        for c in default_slice_columns(slices_frame)
    }


def _vocab(slices: SliceVocabulary | pd.DataFrame | None) -> dict[str, tuple[str, ...] | None]:
    if slices is None:
        return default_slice_vocabulary()
    if isinstance(slices, pd.DataFrame):
        return dict(slice_vocabulary(slices))
    return {c: (tuple(str(v) for v in vs) if vs is not None else None) for c, vs in slices.items()}


def _valid_slices(vocab: Mapping[str, tuple[str, ...] | None]) -> str:
    parts = []
    for column, values in vocab.items():
        shown = ", ".join(values) if values is not None else "any value"
        parts.append(f"{column} ({shown})")
    return "; ".join(parts)


def _resolve_slice(value: str, vocab, column: str | None = None) -> SliceRef:
    want = _key(value).replace(" ", "_")
    if column is not None:
        if column not in vocab:
            raise CompkitError(
                f"unknown slice column {column!r}; valid slices: {_valid_slices(vocab)} (a "
                "study's own slice columns are known once its slices are given: "
                "load_frozen_budget reads frozen/slices.parquet)"
            )
        values = vocab[column]
        if values is None:
            return SliceRef(column, value)
        for v in values:
            if _key(v).replace(" ", "_") == want:
                return SliceRef(column, v)
        raise CompkitError(
            f"unknown slice value {column}={value}; valid values of {column}: {', '.join(values)}"
        )
    found = []
    for col, values in vocab.items():
        for v in values or ():
            if _key(v).replace(" ", "_") in (want, re.sub(r"_labels?$", "", want)):
                found.append(SliceRef(col, v))
    code = _LANGUAGES.get(want, want if re.fullmatch(r"[a-z]{2}", want) else None)
    lang = vocab.get("language", ())
    if code and "language" in vocab and (lang is None or code in lang):
        found.append(SliceRef("language", code))
    found = list(dict.fromkeys(found))
    if len(found) == 1:
        return found[0]
    if found:
        raise CompkitError(
            f"slice {value!r} is ambiguous ({', '.join(map(str, found))}); write column=value"
        )
    raise CompkitError(
        f"unknown slice {value!r}; valid slices: {_valid_slices(vocab)}; or name the column: "
        f"'for <column>={value}'"
    )


_ON = r"\s+(?:on|for|in|within|across)\s+(?:the\s+)?"
_ITEMS = r"(?:items|prompts|requests|examples|questions|tickets|messages|inputs|cases|calls)"
_SLICE_PATTERNS = [
    re.compile(_ON + r"(?P<col>[a-z][a-z0-9_]*)\s*(?:==?|:)\s*(?P<val>[^\s,]+)(?:\s+slice)?"),
    re.compile(r"\s+(?:on|for|in|within)\s+the\s+(?P<val>[a-z0-9_\- ]+?)\s+(?:slice|subset)\b"),
    re.compile(r"\s+(?:on|for)\s+(?P<rarity>rare|common)[\s\-]+(?:labels?|classes|intents)\b"),
    re.compile(_ON + r"(?P<val>[a-z0-9_\-]+(?:[ \-][a-z0-9_\-]+)?)\s+" + _ITEMS + r"\b"),
    re.compile(r"\s+in\s+(?P<lang>" + "|".join(_LANGUAGES) + r")\b"),
]


def _extract_slice(text: str, vocab) -> tuple[str, SliceRef | None]:
    """Remove the slice phrase from ``text`` and resolve it."""
    found: list[SliceRef] = []
    for pattern in _SLICE_PATTERNS:
        match = pattern.search(text)
        if not match:
            continue
        groups = match.groupdict()
        if groups.get("rarity"):
            found.append(_resolve_slice(groups["rarity"], vocab, "label_rarity"))
        elif groups.get("lang"):
            found.append(_resolve_slice(groups["lang"], vocab))
        else:
            found.append(_resolve_slice(groups["val"], vocab, groups.get("col")))
        text = text[: match.start()] + text[match.end() :]
    if len(found) > 1:
        raise CompkitError(f"a rule names one slice; found {', '.join(map(str, found))}")
    return text, (found[0] if found else None)


def _resolve_subject(subject: str, vocab) -> tuple[str, SliceRef | None]:
    """Metric (and a slice named inside the subject: ``rare-label recall``)."""
    key = _key(subject)
    rarity = re.match(r"(rare|common) labels? (.+)$", key)
    if rarity and (metric := _lookup_metric(rarity.group(2))):
        return metric, _resolve_slice(rarity.group(1), vocab, "label_rarity")
    metric = _lookup_metric(key)
    if metric:
        return metric, None
    words = key.split(" ")
    for size in (1, 2):
        head, rest = " ".join(words[:size]), " ".join(words[size:])
        if rest and (metric := _lookup_metric(rest)):
            tasks = vocab.get("task") or ()
            for task in tasks:
                if _key(task) == head:
                    return metric, SliceRef("task", task)
    raise CompkitError(
        f"unknown metric {subject.strip()!r}; valid metrics: {', '.join(known_metrics())} "
        "(or phrases such as 'JSON parse failures', 'p95 first-token latency', "
        "'rare-label recall')"
    )


# --------------------------------------------------------------------------- numbers and units

_WORD_NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "ten": 10}
_NUM = (
    r"(?P<cur>\$\s*)?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
    r"|zero|one|two|three|four|five|ten)"
)
_UNIT = (
    r"(?:\s*(?P<unit>%|percentage\s+points?|percent\s+points?|percent|per\s+cent|pct|points?|pts?"
    r"|pp|p\.p\.|milliseconds?|msecs?|ms|seconds?|secs?|s|megabytes?|mib|mb|gigabytes?|gib|gb"
    r"|tokens?/s|tokens?\s+per\s+second|tok/s|requests?/s|requests?\s+per\s+second|req/s|rps"
    r"|usd|dollars?|cents?))?"
)
_REL = r"(?P<rel>\s+relative(?:ly)?(?:\s+to\s+(?:the\s+)?baseline)?)?"
_UNIT_WORDS = {
    "percent": ("%", "percent", "per cent", "pct"),
    "ms": ("ms", "msec", "msecs", "millisecond", "milliseconds"),
    "s": ("s", "sec", "secs", "second", "seconds"),
    "MB": ("mb", "mib", "megabyte", "megabytes"),
    "GB": ("gb", "gib", "gigabyte", "gigabytes"),
    "requests/s": ("rps", "req/s"),
    "tokens/s": ("tok/s",),
    "USD": ("usd", "dollar", "dollars"),
    "cent": ("cent", "cents"),
}
_UNIT_FAMILY = {word: family for family, words in _UNIT_WORDS.items() for word in words}


def _unit_family(unit: str | None, cur: str | None) -> str | None:
    if unit is None:
        return "USD" if cur else None
    u = re.sub(r"\s+", " ", unit)
    if re.fullmatch(r"(?:percentage |percent )?points?|pts?|pp|p\.p\.", u):
        return "points"
    if re.fullmatch(r"tokens? ?(?:/s|per second)", u):
        return "tokens/s"
    if re.fullmatch(r"requests? ?(?:/s|per second)", u):
        return "requests/s"
    return _UNIT_FAMILY[u]


def _number(text: str) -> float:
    if text in _WORD_NUMBERS:
        return float(_WORD_NUMBERS[text])
    return float(text.replace(",", ""))


_SCALE = {("ms", "s"): 1000.0, ("MB", "GB"): 1024.0, ("USD", "cent"): 0.01}


def _level(num: float, family: str | None, spec: StageMetric) -> float:
    """A number with its unit, in the metric's units (shares as fractions)."""
    fractional = spec.unit in ("share", "score")
    if family is None:
        if fractional and num > 1:
            raise CompkitError(
                f"{spec.name} is a share between 0 and 1; write {num:g} percent or {num / 100:g}"
            )
        return num
    if family == "percent" and fractional:
        return num / 100
    if family == spec.unit:
        return num
    if (spec.unit, family) in _SCALE:
        return num * _SCALE[(spec.unit, family)]
    if family == "points":
        raise CompkitError(
            "points describe a change against the baseline; write e.g. 'may drop by at most "
            "1 point', or give a level in percent"
        )
    raise CompkitError(f"{spec.name} is measured in {spec.unit}; a limit in {family} does not fit")


# --------------------------------------------------------------------------- predicates

_NEGATIONS = {
    "cannot": "can not",
    "can't": "can not",
    "mustn't": "must not",
    "shouldn't": "should not",
    "won't": "will not",
    "doesn't": "does not",
    "don't": "do not",
    "isn't": "is not",
    "aren't": "are not",
    "mayn't": "may not",
}
_AUX = (
    r"(?:must|should|shall|may|might|can|could|will|has\s+to|have\s+to|needs?\s+to|is\s+to"
    r"|are\s+to|does|do|not|never|always|stay|stays|remain|remains|be|is|are|keep|keeps"
    r"|kept|held|sit|sits|come\s+in|comes\s+in)"
)
_CHAIN = rf"(?P<chain>(?:{_AUX}\s+)*)"
_DOWN = (
    r"drops?|fall|falls|decreases?|declines?|go(?:es)?\s+down|shrinks?|sinks?|dips?|lose|loses"
    r"|slips?"
)
_UP = r"rises?|increases?|grows?|go(?:es)?\s+up|climbs?"
_WORSE = r"worsens?|gets?\s+worse|degrades?|regress(?:es)?|deteriorates?"
_VERB = rf"(?P<verb>{_DOWN}|{_UP}|{_WORSE})"
_AMOUNT = (
    r"(?:by\s+)?(?P<amt>more\s+than|at\s+most|no\s+more\s+than|not\s+more\s+than|up\s+to"
    r"|less\s+than|a\s+maximum\s+of)|by\s+(?P<amt_by>over|under)"
)
_CMP = {
    "<": r"under|below|less\s+than|lower\s+than|fewer\s+than|beneath|<|falls?\s+below"
    r"|drops?\s+below|go(?:es)?\s+below|dips?\s+below",
    "<=": r"at\s+most|no\s+more\s+than|not\s+more\s+than|no\s+higher\s+than|no\s+greater\s+than"
    r"|at\s+or\s+below|at\s+or\s+under|a\s+maximum\s+of|<=|=<",
    ">": r"above|over|more\s+than|greater\s+than|higher\s+than|>|exceeds?|rises?\s+above"
    r"|go(?:es)?\s+(?:above|over)|climbs?\s+above",
    ">=": r"at\s+least|no\s+less\s+than|not\s+less\s+than|no\s+lower\s+than|no\s+fewer\s+than"
    r"|at\s+or\s+above|a\s+minimum\s+of|>=|=>",
}
_ANY_CMP = "|".join(f"(?P<cmp{i}>{p})" for i, p in enumerate(_CMP.values()))
_OPS: tuple[Op, ...] = ("<", "<=", ">", ">=")
_NEGATED: dict[str, Op] = {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}

_CHANGE_RE = re.compile(rf"^(?P<subj>.+?)\s+{_CHAIN}{_VERB}\s+(?:{_AMOUNT})\s+{_NUM}{_UNIT}{_REL}$")
_CHANGE_TAIL_RE = re.compile(
    rf"^(?P<subj>.+?)\s+{_CHAIN}{_VERB}\s+(?:by\s+)?{_NUM}{_UNIT}{_REL}\s+"
    r"(?P<tail>at\s+most|at\s+the\s+most|or\s+less|max(?:imum)?)$"
)
_NO_CHANGE_RE = re.compile(rf"^(?P<subj>.+?)\s+{_CHAIN}{_VERB}(?:\s+at\s+all)?$")
_VS_BASELINE_RE = re.compile(
    rf"^(?P<subj>.+?)\s+{_CHAIN}(?:(?P<worse>no\s+worse\s+than)|{_ANY_CMP})\s+"
    r"(?:that\s+of\s+)?(?:the\s+)?baseline(?:'s)?(?:\s+value)?$"
)
_LEVEL_RE = re.compile(rf"^(?P<subj>.+?)\s+{_CHAIN}(?:{_ANY_CMP})\s+{_NUM}{_UNIT}$")
_OR_RE = re.compile(
    rf"^(?P<subj>.+?)\s+{_CHAIN}{_NUM}{_UNIT}\s+or\s+"
    r"(?P<or>less|lower|fewer|below|under|more|higher|greater|above|better|worse)$"
)


def _negated(chain: str) -> bool:
    return len(re.findall(r"\b(?:not|never)\b", chain or "")) % 2 == 1


def _matched_op(match: re.Match) -> Op:
    for i, op in enumerate(_OPS):
        if match.group(f"cmp{i}"):
            return op
    raise AssertionError("no comparator group matched")


def _direction(verb: str, spec: StageMetric) -> str:
    if re.fullmatch(_DOWN, verb):
        return "down"
    if re.fullmatch(_UP, verb):
        return "up"
    return "down" if spec.higher_is_better else "up"


def _change_amount(m: re.Match, spec: StageMetric) -> tuple[ChangeKind, float]:
    family = _unit_family(m.group("unit"), m.group("cur"))
    num = _number(m.group("num"))
    fractional = spec.unit in ("share", "score")
    if m.group("rel"):
        if family != "percent":
            raise CompkitError("a relative change is written in percent: '2 percent relative'")
        return "relative", num / 100
    if family == "percent" and fractional:
        raise CompkitError(
            f"'{num:g} percent' is ambiguous for a change of {spec.name}: write "
            f"'{num:g} points' (absolute) or '{num:g} percent relative'"
        )
    if family == "percent":
        return "relative", num / 100
    if family == "points":
        if not fractional:
            raise CompkitError(f"points apply to shares; {spec.name} is in {spec.unit}")
        return "points", num / 100
    return ("points" if fractional else "absolute"), _level(num, family, spec)


def _change_rule(m: re.Match, spec: StageMetric, *, amount_word: str) -> ChangeBound:
    neg = _negated(m.group("chain"))
    word = re.sub(r"\s+", " ", amount_word)
    inclusive = (
        "at most",
        "no more than",
        "not more than",
        "up to",
        "a maximum of",
        "at the most",
        "or less",
        "max",
        "maximum",
    )
    if (neg and word in ("more than", "over")) or (not neg and word in inclusive):
        strict = False
    elif not neg and word in ("less than", "under"):
        strict = True
    else:
        raise CompkitError(
            "cannot read the allowed amount; write e.g. 'cannot drop by more than 1 point' "
            "or 'may drop at most 1 point'"
        )
    kind, amount = _change_amount(m, spec)
    if _direction(m.group("verb"), spec) == "down":
        return ChangeBound(kind, ">" if strict else ">=", -amount)
    return ChangeBound(kind, "<" if strict else "<=", amount)


def _no_change_rule(m: re.Match, spec: StageMetric) -> ChangeBound:
    if not _negated(m.group("chain")):
        raise CompkitError(
            "a change without an amount must be forbidden ('must not increase'); to allow "
            "some change say how much ('may drop by at most 1 point')"
        )
    if _direction(m.group("verb"), spec) == "down":
        return ChangeBound("no_decrease", ">=", 0.0)
    return ChangeBound("no_increase", "<=", 0.0)


def _vs_baseline_rule(m: re.Match, spec: StageMetric) -> ChangeBound:
    if m.group("worse"):
        op: Op = ">=" if spec.higher_is_better else "<="
    else:
        op = _matched_op(m)
    if _negated(m.group("chain")):
        op = _NEGATED[op]
    if op == "<=":
        return ChangeBound("no_increase", "<=", 0.0)
    if op == ">=":
        return ChangeBound("no_decrease", ">=", 0.0)
    return ChangeBound("points" if spec.unit in ("share", "score") else "absolute", op, 0.0)


def _level_rule(m: re.Match, spec: StageMetric, op: Op) -> AbsoluteBound:
    if _negated(m.group("chain")):
        op = _NEGATED[op]
    family = _unit_family(m.group("unit"), m.group("cur"))
    return AbsoluteBound(op, _level(_number(m.group("num")), family, spec))


def _or_op(word: str, spec: StageMetric) -> Op:
    if word == "better":
        return ">=" if spec.higher_is_better else "<="
    if word == "worse":
        return "<=" if spec.higher_is_better else ">="
    return "<=" if word in ("less", "lower", "fewer", "below", "under") else ">="


def _normalise(text: str) -> str:
    t = text.lower().strip()
    for a, b in (("≤", "<="), ("≥", ">="), ("−", "-"), ("–", "-"), ("’", "'")):
        t = t.replace(a, b)
    t = re.sub(r"\s+", " ", t).rstrip(".!;").strip()
    for short, long in _NEGATIONS.items():
        t = re.sub(rf"\b{re.escape(short)}", long, t)
    return t


GRAMMAR_HINT = (
    "write e.g. 'JSON parse failures must stay under 0.5 percent', 'rare-label recall cannot "
    "drop by more than 1 point', 'accuracy may drop at most 2 percent relative', 'unsafe "
    "compliance must not increase' (grammar: kit.budget.grammar module docstring), or give the "
    "structured form (metric, slice, bound)"
)


def _parse_predicate(text: str, vocab) -> tuple[str, Bound, SliceRef | None]:
    """Match the predicate patterns; returns (metric, bound, slice from the subject)."""
    attempts = [
        (
            _CHANGE_RE,
            lambda m, s: _change_rule(m, s, amount_word=m.group("amt") or m.group("amt_by")),
        ),
        (_CHANGE_TAIL_RE, lambda m, s: _change_rule(m, s, amount_word=m.group("tail"))),
        (_NO_CHANGE_RE, _no_change_rule),
        (_VS_BASELINE_RE, _vs_baseline_rule),
        (_LEVEL_RE, lambda m, s: _level_rule(m, s, _matched_op(m))),
        (
            _OR_RE,
            lambda m, s: AbsoluteBound(
                _or_op(m.group("or"), s),
                _level(_number(m.group("num")), _unit_family(m.group("unit"), m.group("cur")), s),
            ),
        ),
    ]
    for pattern, build in attempts:
        match = pattern.match(text)
        if match:
            metric, subject_slice = _resolve_subject(match.group("subj"), vocab)
            return metric, build(match, metric_spec(metric)), subject_slice
    raise CompkitError(f"cannot read this sentence; {GRAMMAR_HINT}")


def parse_rule(
    text: str,
    *,
    why: str | None = None,
    id: str = "",
    slices: SliceVocabulary | pd.DataFrame | None = None,
) -> Rule:
    """Parse one product-language sentence into a :class:`Rule` (grammar: module docstring).

    Parameters
    ----------
    text
        The sentence, e.g. ``"rare-label recall cannot drop by more than 1 point"``.
    why, id
        Carried onto the rule.
    slices
        Known slice values: a slices frame (``frozen/slices.parquet``) or a mapping
        ``column -> values`` (``None``: any value). Default: :func:`default_slice_vocabulary`.

    Raises
    ------
    CompkitError
        Unreadable sentence, unknown metric (lists the valid ones) or unknown slice (lists
        the valid values).

    Examples
    --------
    >>> parse_rule("rare-label recall cannot drop by more than 1 point").bound
    ChangeBound(kind='points', op='>=', limit=-0.01)
    """
    vocab = _vocab(slices)
    rest, phrase_slice = _extract_slice(_normalise(text), vocab)
    metric, bound, subject_slice = _parse_predicate(rest.strip(), vocab)
    if phrase_slice and subject_slice and phrase_slice != subject_slice:
        raise CompkitError(f"a rule names one slice; found {subject_slice} and {phrase_slice}")
    chosen = phrase_slice or subject_slice
    _check_metric_slice(metric, chosen)
    return Rule(text=text.strip(), metric=metric, bound=bound, slice=chosen, why=why, id=id)


def _check_metric_slice(metric: str, chosen: SliceRef | None) -> None:
    if metric == RECALL.name and (chosen is None or chosen.column not in LABEL_SLICES):
        raise CompkitError(
            "recall needs a label slice ('rare-label recall', 'recall for rare labels'): "
            "it is measured as accuracy on the items whose gold label is in the slice"
        )


# --------------------------------------------------------------------------- budget files


class BoundSpec(BaseModel):
    """Structured bound: ``{op, value}`` (absolute) or ``{change, op, limit}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    op: Op | None = None
    value: float | None = None
    change: ChangeKind | None = None
    limit: float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> BoundSpec:
        if (self.value is None) == (self.change is None):
            raise ValueError("give either 'value' (absolute bound) or 'change' (vs the baseline)")
        if self.value is not None and self.op is None:
            raise ValueError("an absolute bound needs 'op' (<, <=, >, >=)")
        if self.change in ("points", "absolute", "relative") and (
            self.op is None or self.limit is None
        ):
            raise ValueError(f"a '{self.change}' change bound needs 'op' and 'limit'")
        return self

    def to_bound(self) -> Bound:
        if self.value is not None:
            return AbsoluteBound(self.op, float(self.value))  # type: ignore[arg-type]
        if self.change == "no_increase":
            return ChangeBound("no_increase", "<=", 0.0)
        if self.change == "no_decrease":
            return ChangeBound("no_decrease", ">=", 0.0)
        return ChangeBound(self.change, self.op, float(self.limit))  # type: ignore[arg-type]


class RuleSpec(BaseModel):
    """One entry of ``rules:``; ``metric``/``slice``/``bound`` replace parsing when given."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rule: str = Field(min_length=1)
    why: str | None = None
    id: str | None = None
    metric: str | None = None
    slice: str | None = Field(default=None, description="column=value")
    bound: BoundSpec | None = None

    @model_validator(mode="after")
    def _structured_complete(self) -> RuleSpec:
        if (self.metric or self.slice) and self.bound is None:
            raise ValueError("the structured form needs 'bound' (and 'metric')")
        if self.bound is not None and not self.metric:
            raise ValueError("the structured form needs 'metric'")
        return self


class BudgetFile(BaseModel):
    """The YAML file: ``rules:`` (at least one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rules: list[RuleSpec] = Field(min_length=1)


def _structured_rule(spec: RuleSpec, rule_id: str, vocab) -> Rule:
    metric = metric_spec(spec.metric).name  # type: ignore[arg-type]
    chosen = None
    if spec.slice:
        column, sep, value = spec.slice.partition("=")
        if not sep:
            raise CompkitError(f"slice {spec.slice!r} must read column=value")
        chosen = _resolve_slice(value.strip(), vocab, column.strip())
    _check_metric_slice(metric, chosen)
    bound = spec.bound.to_bound()  # type: ignore[union-attr]
    return Rule(spec.rule.strip(), metric, bound, chosen, spec.why, rule_id)


def _rule_from_spec(spec: RuleSpec, index: int, vocab) -> Rule:
    rule_id = spec.id or f"R{index}"
    if spec.bound is not None:
        return _structured_rule(spec, rule_id, vocab)
    return parse_rule(spec.rule, why=spec.why, id=rule_id, slices=vocab)


def _budget_problems(path: Path, raw: Any, exc: PydanticError) -> list[str]:
    rules = raw.get("rules") if isinstance(raw, dict) else None
    out = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = str(path)
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            i = loc[1]
            text = rules[i].get("rule") if isinstance(rules[i], dict) else rules[i]
            where += f", rule {i + 1}" + (f' "{text}"' if isinstance(text, str) else "")
            loc = loc[2:]
        field = ".".join(str(x) for x in loc)
        out.append(f"{where}{f' ({field})' if field else ''}: {err['msg']}")
    return out


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems)
        raise CompkitError(f"budget {path}: {len(problems)} problem(s)\n{shown}")


def load_budget(
    path: str | Path, *, slices: SliceVocabulary | pd.DataFrame | None = None
) -> Budget:
    """Read, validate and parse a budget file.

    Every problem is reported at once, each naming the file, the rule number (1-based) and
    the rule's text.

    Parameters
    ----------
    path
        The YAML file.
    slices
        Known slice values, as in :func:`parse_rule`.
    """
    path = Path(path)
    if not path.is_file():
        raise CompkitError(f"budget file {path} does not exist")
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CompkitError(f"budget {path}: not valid YAML: {exc}") from exc
    try:
        parsed = BudgetFile.model_validate(raw)
    except PydanticError as exc:
        _raise_problems(path, _budget_problems(path, raw, exc))
        raise  # unreachable: _raise_problems raised
    vocab = _vocab(slices)
    rules, problems = [], []
    for i, spec in enumerate(parsed.rules, start=1):
        try:
            rules.append(_rule_from_spec(spec, i, vocab))
        except CompkitError as exc:
            problems.append(f'{path}, rule {i} "{spec.rule}": {exc}')
    ids = [r.id for r in rules]
    problems += [
        f"{path}: rule id {d!r} is used twice" for d in sorted({i for i in ids if ids.count(i) > 1})
    ]
    _raise_problems(path, problems)
    return Budget(tuple(rules), hashlib.sha256(data).hexdigest(), path)


# --------------------------------------------------------------------------- frozen copy


@dataclass(frozen=True)
class BudgetStatus:
    """Whether the budget file changed since it was frozen.

    ``changed`` is True when the current file differs from the frozen copy (or is gone);
    ``diff`` is a unified diff frozen -> current; ``message`` is the banner line.
    ``frozen_intact`` is False when the frozen copy no longer matches the hash recorded at
    freeze time (the run folder was edited by hand).
    """

    frozen_path: Path | None
    current_path: Path | None
    frozen_sha256: str | None
    current_sha256: str | None
    changed: bool
    diff: str
    message: str
    frozen_intact: bool = True


def _sha(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_budgets(frozen: str | Path, current: str | Path | None) -> BudgetStatus:
    """Compare a frozen budget copy with the budget file as it is now.

    Examples
    --------
    >>> compare_budgets("runs/x/frozen/budget.yaml", "data/demo/budget.yaml")   # doctest: +SKIP
    """
    frozen = Path(frozen)
    current = Path(current) if current is not None else None
    if not frozen.is_file():
        raise CompkitError(f"no frozen budget at {frozen}")
    f_sha, c_sha = _sha(frozen), _sha(current)
    if c_sha is None:
        message = (
            f"the budget file {current} no longer exists; verdicts use the frozen copy ({frozen})"
        )
        return BudgetStatus(frozen, current, f_sha, None, True, "", message)
    if f_sha == c_sha:
        message = f"budget unchanged since freezing (sha256 {f_sha[:12]})"  # type: ignore[index]
        return BudgetStatus(frozen, current, f_sha, c_sha, False, "", message)
    diff = "".join(
        difflib.unified_diff(
            frozen.read_text(encoding="utf-8").splitlines(True),
            current.read_text(encoding="utf-8").splitlines(True),  # type: ignore[union-attr]
            str(frozen),
            str(current),
        )
    )
    message = (
        f"the budget {current} was edited after freezing: verdicts use the frozen copy "
        f"({frozen}); re-freeze the baseline to judge with the edited rules"
    )
    return BudgetStatus(frozen, current, f_sha, c_sha, True, diff, message)


def budget_status(run_dir: str | Path) -> BudgetStatus:
    """:func:`compare_budgets` for a frozen run: ``frozen/budget.yaml`` vs the study's budget.

    The path and hash of the budget at freeze time come from the run's manifest.
    """
    from kit.stages.freeze import BaselineManifest

    run_dir = Path(run_dir)
    manifest = BaselineManifest.load(run_dir)
    frozen = run_dir / "frozen" / "budget.yaml"
    if manifest.inputs.budget_sha256 is None or not frozen.is_file():
        message = f"{run_dir} was frozen without a budget; there are no rules to judge by"
        return BudgetStatus(None, None, None, None, False, "", message)
    current = Path(manifest.inputs.budget_path) if manifest.inputs.budget_path else None
    status = compare_budgets(frozen, current)
    if status.frozen_sha256 != manifest.inputs.budget_sha256:
        message = (
            f"{frozen} does not match the budget hash recorded at freeze time; the run folder "
            f"was edited by hand. {status.message}"
        )
        return replace(status, message=message, frozen_intact=False)
    return status


def load_frozen_budget(
    run_dir: str | Path, *, slices: SliceVocabulary | pd.DataFrame | None = None
) -> Budget:
    """The budget verdicts use: the run's frozen copy, checked against the manifest hash.

    ``slices`` defaults to the run's ``frozen/slices.parquet`` when present.
    """
    status = budget_status(run_dir)
    if status.frozen_path is None:
        raise CompkitError(status.message)
    if not status.frozen_intact:
        raise CompkitError(status.message)
    parquet = Path(run_dir) / "frozen" / "slices.parquet"
    if slices is None and parquet.is_file():
        slices = pd.read_parquet(parquet)
    return load_budget(status.frozen_path, slices=slices)


# --------------------------------------------------------------------------- evidence helpers


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a share ``p`` over ``n`` trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise CompkitError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def flip_rate_evidence(
    flips: pd.DataFrame,
    *,
    kinds: Sequence[str] = ("right_to_wrong", "wrong_to_right"),
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Evidence rows for ``flip_rate`` from :func:`kit.analysis.compare.flip_table`.

    ``flip_rate`` is the share of paired items whose outcome flipped (``kinds``: right->wrong
    + wrong->right, as in :func:`kit.analysis.compare.noise_floor`), with a Wilson CI in
    ``value_ci_low/value_ci_high`` (and ``ci_low/ci_high``; there is no baseline value).
    """
    z = _z(confidence)
    part = flips[flips["flip"].isin(list(kinds))]
    keys = ["model", "slice", "slice_value"]
    n = flips.groupby(keys, sort=False)["n"].first()
    count = part.groupby(keys, sort=False)["count"].sum().reindex(n.index, fill_value=0)
    rows = []
    for key, total in n.items():
        rate = float(count[key]) / float(total)
        low, high = _wilson(rate, float(total), z)
        rows.append(
            dict(
                zip(keys, key, strict=True),
                metric="flip_rate",
                value=rate,
                n=int(total),
                ci_low=low,
                ci_high=high,
                value_ci_low=low,
                value_ci_high=high,
            )
        )
    return _evidence_frame(rows)


def stage_evidence(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Evidence rows from a later stage (serving, routing, calibration).

    Each record needs ``model``, ``metric`` (a :data:`STAGE_METRICS` name) and ``value``;
    ``slice``/``slice_value`` default to ``overall``/``all``; optional ``baseline_value``,
    ``delta`` (default value - baseline_value), ``ci_low/ci_high`` (CI of the delta when a
    baseline is given, else of the value), ``value_ci_low/value_ci_high`` and ``n``.
    """
    rows = []
    for i, rec in enumerate(records, start=1):
        missing = [k for k in ("model", "metric", "value") if k not in rec]
        if missing:
            raise CompkitError(f"stage evidence record {i} lacks {missing}")
        if rec["metric"] not in STAGE_METRICS:
            raise CompkitError(
                f"stage evidence record {i}: {rec['metric']!r} is not a stage metric; "
                f"stage metrics: {', '.join(sorted(STAGE_METRICS))}"
            )
        row = {"slice": "overall", "slice_value": "all", **rec}
        if "delta" not in row and row.get("baseline_value") is not None:
            row["delta"] = row["value"] - row["baseline_value"]
        rows.append(row)
    return _evidence_frame(rows)


def _evidence_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = [*EVIDENCE_REQUIRED[:4], "value", *EVIDENCE_OPTIONAL, "p_value"]
    frame = pd.DataFrame(rows).reindex(columns=columns)
    frame["slice_value"] = frame["slice_value"].astype(str)
    return frame


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class _Measure:
    observed: float
    low: float
    high: float
    n: float
    baseline: float
    ci_source: str  # value | wilson | delta | none


def _num(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out


def _value_ci(row, spec: StageMetric, z: float) -> tuple[float, float, str]:
    """CI of the candidate's value; the order of preference is documented in evaluate_rules."""
    value, base, n = _num(row, "value"), _num(row, "baseline_value"), _num(row, "n")
    lo, hi = _num(row, "value_ci_low"), _num(row, "value_ci_high")
    if np.isfinite([lo, hi]).all():
        return lo, hi, "value"
    lo, hi = _num(row, "ci_low"), _num(row, "ci_high")
    if not np.isfinite(base) and np.isfinite([lo, hi]).all():
        return lo, hi, "value"
    per_item = spec.unit in ("share", "score") and spec.aggregation == "mean"
    if per_item and np.isfinite(n) and n > 0 and 0 <= value <= 1:
        low, high = _wilson(value, n, z)
        return low, high, "wilson"
    if np.isfinite([base, lo, hi]).all():
        return base + lo, base + hi, "delta"
    return math.nan, math.nan, "none"


def _measure(rule: Rule, row: Mapping[str, Any], z: float) -> _Measure | str:
    """The quantity the rule bounds, with its CI; a string says why it cannot be measured."""
    spec = metric_spec(rule.metric)
    value, base, n = _num(row, "value"), _num(row, "baseline_value"), _num(row, "n")
    if isinstance(rule.bound, AbsoluteBound):
        lo, hi, source = _value_ci(row, spec, z)
        return _Measure(value, lo, hi, n, base, source)
    if not np.isfinite(base):
        return "the evidence has no baseline value, so the change cannot be measured"
    delta = _num(row, "delta")
    delta = delta if np.isfinite(delta) else value - base
    lo, hi = _num(row, "ci_low"), _num(row, "ci_high")
    source = "delta" if np.isfinite([lo, hi]).all() else "none"
    per_item = (
        rule.metric in scoring.METRICS
        and spec.unit in ("share", "score")
        and spec.aggregation == "mean"
    )
    if source == "delta" and per_item and hi - lo <= 1e-12 and np.isfinite(n) and n > 0:
        # No item changed, so the paired bootstrap has nothing to resample: its CI collapses to
        # a point. Seeing 0 changes in n items only bounds the change rate by the zero-event
        # (Wilson) limit z^2/(n + z^2): 0.66 for n=2, 0.04 for n=90.
        width = z * z / (n + z * z)
        lo, hi, source = delta - width, delta + width, "zero-event"
    if rule.bound.kind != "relative":
        return _Measure(delta, lo, hi, n, base, source)
    if base <= 0:
        return "relative change is undefined: the baseline's value is 0; write the rule in points"
    return _Measure(delta / base, lo / base, hi / base, n, base, source)


def _inside(x: float, op: Op, t: float) -> bool:
    tol = 1e-9 * max(1.0, abs(t))
    if op == "<":
        return x < t - tol
    if op == "<=":
        return x <= t + tol
    if op == ">":
        return x > t + tol
    return x >= t - tol


def judge(low: float, high: float, op: Op, threshold: float) -> str:
    """``pass`` if all of [low, high] satisfies ``op threshold``, ``fail`` if none of it does,
    else ``inconclusive``. The bound's own inclusivity decides a CI end on the threshold
    (values within 1e-9 of it count as on it)."""
    far, near = (high, low) if op in ("<", "<=") else (low, high)
    if _inside(far, op, threshold):
        return "pass"
    if not _inside(near, op, threshold):
        return "fail"
    return "inconclusive"


def _n_needed(m: _Measure, op: Op, t: float, z: float, wilson: bool) -> float:
    """Items at which the CI would exclude the threshold if the observed value held."""
    margin = abs(m.observed - t)
    if not np.isfinite(m.n) or m.n <= 0 or margin <= 1e-9 * max(1.0, abs(t)):
        return math.nan
    if wilson:
        return _wilson_n_needed(m.observed, m.n, op, t, z)
    half = (m.high - m.observed) if t > m.observed else (m.observed - m.low)
    if not np.isfinite(half) or half <= 0:
        return math.nan
    return float(math.floor(m.n * (half / margin) ** 2) + 1)


def _wilson_n_needed(p: float, n: float, op: Op, t: float, z: float) -> float:
    def decided(size: int) -> bool:
        return judge(*_wilson(p, size, z), op, t) != "inconclusive"

    low, high = int(n), int(n) * 2
    while not decided(high):
        if high > 10**12:
            return math.nan
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decided(mid) else (mid, high)
    return float(high)


def evaluate_rules(
    rules: Budget | Sequence[Rule],
    *,
    evidence: pd.DataFrame,
    candidates: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Judge every rule for every candidate: one verdict row each (:data:`VERDICT_COLUMNS`).

    Parameters
    ----------
    rules
        A :class:`Budget` (normally :func:`load_frozen_budget`) or rules.
    evidence
        Long result frame (``model, slice, slice_value, metric, value`` + optional
        ``baseline_value, delta, ci_low, ci_high, n, value_ci_low, value_ci_high``):
        :func:`kit.analysis.compare.compare_models` / :func:`kit.analysis.slices.slice_table` rows plus
        :func:`flip_rate_evidence` and :func:`stage_evidence` rows. One row per
        candidate, metric and slice; duplicates are an error.
    candidates
        Default: every model in ``evidence`` (in order). A candidate without rows gets
        ``not measured`` verdicts.
    confidence
        Level of the CIs computed here (Wilson); the evidence's CIs should share it.

    Returns
    -------
    DataFrame
        ``candidate, rule, metric, slice, observed, baseline, threshold, ci_low, ci_high,
        n, verdict, reason, n_needed, rule_id, why, quantity, op, unit``. ``observed`` and
        its CI are the bounded quantity: the candidate's value, its change (candidate -
        baseline), or its relative change (change / baseline), shares as fractions.

    Notes
    -----
    *CI of an absolute bound* (the candidate's own value), first available of: explicit
    ``value_ci_low/value_ci_high``; ``ci_low/ci_high`` of a row without a baseline value
    (stage rows state the value's CI); a Wilson interval from ``value`` and ``n`` for share
    and score metrics (per-item values in [0, 1] have variance <= p(1-p), so this is
    conservative for averaged repeats); ``baseline_value + [ci_low, ci_high]`` (the delta
    CI shifted, baseline taken as fixed). Deriving it from the paired delta CI alone would
    be too narrow when the two models agree item by item, hence Wilson first.

    *CI of a change bound*: the delta CI; relative: the delta CI divided by the baseline
    value (taken as fixed; undefined when it is 0, which gives ``inconclusive``).

    *Verdict* (:func:`judge`): ``pass`` when the whole CI satisfies the bound, ``fail`` when
    none of it does, else ``inconclusive``. A CI end exactly on the threshold is judged by
    the bound itself: "under 0.5%" (<) is not satisfied at 0.5%, "at most"/"cannot drop by
    more than"/"must not increase" (<=, >=) are. A row without any CI is ``inconclusive``:
    pass needs a CI (supply a zero-width ``value_ci_low/high`` for an exact number).

    *n_needed* (inconclusive only): the number of items at which the CI would exclude the
    threshold if the observed value stayed where it is. For Wilson CIs it is solved
    exactly; otherwise the CI's half-width towards the threshold ``h`` is scaled as
    1/sqrt(n): ``floor(n * (h / |observed - threshold|)**2) + 1``. A rerun of that size
    decides about half the time (the estimate moves); for 80% power multiply by about 2.
    NaN when the observed value sits on the threshold or ``n`` is unknown.
    """
    rule_list = list(rules.rules if isinstance(rules, Budget) else rules)
    frame = _check_evidence(evidence)
    models = list(candidates) if candidates is not None else list(dict.fromkeys(frame["model"]))
    if not models:
        raise CompkitError("no candidate to judge: the evidence is empty and no candidates given")
    z = _z(confidence)
    index = _index_evidence(frame)
    rows = [
        _verdict_row(rule, model, index, z, confidence) for model in models for rule in rule_list
    ]
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _check_evidence(evidence: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in EVIDENCE_REQUIRED if c not in evidence.columns]
    if missing:
        raise CompkitError(
            f"evidence lacks column(s) {missing}; expected the long result frame of "
            "kit.analysis.compare.compare_models (model, slice, slice_value, metric, value, ...)"
        )
    frame = evidence.reindex(columns=[*dict.fromkeys([*evidence.columns, *EVIDENCE_OPTIONAL])])
    frame = frame.assign(slice_value=frame["slice_value"].astype(str))
    dup = frame.duplicated(["model", "metric", "slice", "slice_value"], keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        raise CompkitError(
            f"evidence has {int(dup.sum())} duplicated rows, e.g. model {first['model']!r}, "
            f"metric {first['metric']!r}, slice {first['slice']}={first['slice_value']}; "
            "give one row per candidate, metric and slice"
        )
    return frame


def _index_evidence(frame: pd.DataFrame) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    records = frame.to_dict("records")
    return {
        (str(r["model"]), str(r["metric"]), str(r["slice"]), str(r["slice_value"])): r
        for r in records
    }


def _find_row(rule: Rule, model: str, index) -> dict[str, Any] | None:
    where = (rule.slice.column, rule.slice.value) if rule.slice else ("overall", "all")
    names = [rule.metric]
    if rule.metric == RECALL.name:
        names.append("accuracy")
    for name in names:
        row = index.get((model, name, *where))
        if row is not None:
            return row
    return None


def _verdict_row(rule: Rule, model: str, index, z: float, confidence: float) -> dict[str, Any]:
    spec = metric_spec(rule.metric)
    base = {
        "candidate": model,
        "rule": rule.text,
        "metric": rule.metric,
        "slice": rule.slice_label,
        "threshold": rule.bound.threshold,
        "rule_id": rule.id,
        "why": rule.why,
        "quantity": rule.quantity,
        "op": rule.bound.op,
        "unit": spec.unit,
        "n_needed": math.nan,
    }
    row = _find_row(rule, model, index)
    if row is None:
        return {**base, "verdict": "not measured", "reason": _missing_reason(rule, spec)}
    m = _measure(rule, row, z)
    if isinstance(m, str):
        verdict = "not measured" if "no baseline" in m else "inconclusive"
        return {**base, "n": _num(row, "n"), "verdict": verdict, "reason": m}
    out = {
        **base,
        "observed": m.observed,
        "baseline": m.baseline,
        "ci_low": m.low,
        "ci_high": m.high,
        "n": m.n,
    }
    if m.ci_source == "none":
        return {**out, "verdict": "inconclusive", "reason": _no_ci_reason(rule, m, spec)}
    verdict = judge(m.low, m.high, rule.bound.op, rule.bound.threshold)
    if verdict == "inconclusive":
        out["n_needed"] = _n_needed(
            m, rule.bound.op, rule.bound.threshold, z, m.ci_source == "wilson"
        )
    return {
        **out,
        "verdict": verdict,
        "reason": _reason(rule, m, spec, verdict, out["n_needed"], confidence),
    }


def decide(verdicts: pd.DataFrame) -> pd.DataFrame:
    """One decision per candidate from :func:`evaluate_rules` rows.

    ``rejected`` if any rule fails; else ``inconclusive`` if any rule is inconclusive or
    not measured; else ``accepted`` (every rule passed).

    Returns
    -------
    DataFrame
        ``candidate, decision, n_rules, n_pass, n_fail, n_inconclusive, n_not_measured,
        reason`` in the order candidates first appear.
    """
    rows = []
    for candidate, group in verdicts.groupby("candidate", sort=False):
        counts = {v: int((group["verdict"] == v).sum()) for v in VERDICTS}
        if counts["fail"]:
            decision = "rejected"
        elif counts["inconclusive"] or counts["not measured"]:
            decision = "inconclusive"
        else:
            decision = "accepted"
        rows.append(
            {
                "candidate": candidate,
                "decision": decision,
                "n_rules": len(group),
                "n_pass": counts["pass"],
                "n_fail": counts["fail"],
                "n_inconclusive": counts["inconclusive"],
                "n_not_measured": counts["not measured"],
                "reason": _decision_reason(decision, group),
            }
        )
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


def _decision_reason(decision: str, group: pd.DataFrame) -> str:
    if decision == "accepted":
        return f"passes all {len(group)} rule(s)"
    parts = []
    for verdict, label in (
        ("fail", "fails"),
        ("inconclusive", "undecided"),
        ("not measured", "not measured"),
    ):
        rules = group.loc[group["verdict"] == verdict, "rule"]
        if len(rules):
            parts.append(f"{label}: " + ", ".join(f"'{r}'" for r in rules))
    return "; ".join(parts)


# --------------------------------------------------------------------------- reason text


def _missing_reason(rule: Rule, spec: StageMetric) -> str:
    where = f" on {rule.slice}" if rule.slice else ""
    if rule.metric == "recall":
        where += " (nor accuracy, which is recall on a label slice)"
    if spec.stage not in ("scoring",):
        return (
            f"not measured: the evidence has no {spec.name}{where} for this candidate "
            f"(the {spec.stage} stage has not reported it)"
        )
    return f"not measured: the evidence has no {spec.name}{where} for this candidate"


def _no_ci_reason(rule: Rule, m: _Measure, spec: StageMetric) -> str:
    kind = _kind(rule)
    return (
        f"{_label(rule)} {_fmt(m.observed, spec.unit, kind)} vs limit "
        f"{rule.bound.describe(spec.unit, short=True)}: no CI was supplied, so the rule cannot "
        "be judged; "
        "add ci_low/ci_high (or value_ci_low/value_ci_high)"
    )


def _kind(rule: Rule) -> str | bool:
    """Formatting kind: False for a value, else the change kind."""
    if isinstance(rule.bound, AbsoluteBound):
        return False
    return "relative" if rule.bound.kind == "relative" else "points"


def _label(rule: Rule) -> str:
    return {"value": "observed"}.get(rule.quantity, rule.quantity)


def _reason(
    rule: Rule, m: _Measure, spec: StageMetric, verdict: str, n_needed: float, confidence: float
) -> str:
    kind = _kind(rule)
    level = f"{confidence * 100:g}%"
    head = (
        f"{_label(rule)} {_fmt(m.observed, spec.unit, kind)} ({level} CI "
        f"{_fmt_range(m.low, m.high, spec.unit, kind)}) vs limit "
        f"{rule.bound.describe(spec.unit, short=True)}"
    )
    upper = rule.bound.op in ("<", "<=")
    if verdict == "pass":
        side = "below" if upper else "above"
        edge = " or on" if _touches(m, rule) else ""
        return f"{head}: the whole CI is {side}{edge} the limit"
    if verdict == "fail":
        side = "above" if upper else "below"
        edge = " or on" if _touches(m, rule) else ""
        return f"{head}: the whole CI is {side}{edge} the limit"
    if np.isfinite(n_needed):
        more = f"about {int(n_needed):,} items (now {int(m.n):,}) would decide it"
    else:
        more = "the observed value sits on the limit, so more items alone will not decide it"
    return f"{head}: the CI straddles the limit; {more}"


def _touches(m: _Measure, rule: Rule) -> bool:
    t = rule.bound.threshold
    tol = 1e-9 * max(1.0, abs(t))
    return abs(m.low - t) <= tol or abs(m.high - t) <= tol


_UNIT_SUFFIX = {"ms": " ms", "tokens/s": " tokens/s", "requests/s": " requests/s", "MB": " MB"}


def _fmt(x: float, unit: str, kind: str | bool) -> str:
    """A value (kind False), a change (``points``) or a relative change (``relative``)."""
    if not np.isfinite(x):
        return "n/a"
    if kind == "relative":
        return f"{x * 100:+.1f}%"
    sign = "+" if kind else ""
    if unit == "share":
        if kind:
            return f"{x * 100:+.1f} points"
        return f"{x * 100:.1f}%"
    if unit == "score":
        return f"{x:{sign}.3f}"
    if unit == "USD":
        return f"{'-' if x < 0 else sign}${abs(x):.2f}"
    digits = 0 if unit in ("ms", "MB") and abs(x) >= 10 else 1
    return f"{x:{sign}.{digits}f}{_UNIT_SUFFIX.get(unit, '')}"


def _fmt_range(low: float, high: float, unit: str, kind: str | bool) -> str:
    if not kind and unit == "share":
        return f"{low * 100:.1f}–{high * 100:.1f}%"
    if not kind and unit in _UNIT_SUFFIX:
        a, b = _fmt(low, unit, kind), _fmt(high, unit, kind)
        return f"{a.removesuffix(_UNIT_SUFFIX[unit])}–{b}"
    if kind == "points" and unit == "share":
        return f"{low * 100:+.1f} to {high * 100:+.1f} points"
    return f"{_fmt(low, unit, kind)} to {_fmt(high, unit, kind)}"


def _fmt_limit(x: float, unit: str, *, change: str | bool) -> str:
    """A threshold, without rounding it away: ``0.5%``, ``-1 point``, ``-2%``, ``400 ms``."""
    if change == "relative":
        return f"{_g(x * 100, signed=True)}%"
    if unit in ("share", "score") and change in ("points",):
        pts = _g(x * 100, signed=True)
        return f"{pts} point" + ("" if abs(x) == 0.01 else "s")
    if unit == "share":
        return f"{_g(x * 100)}%"
    if unit == "USD":
        return f"${x:g}"
    return f"{_g(x, signed=bool(change))}{_UNIT_SUFFIX.get(unit, '')}"


def _g(x: float, *, signed: bool = False) -> str:
    text = f"{round(x, 9):g}"
    return f"+{text}" if signed and x > 0 else text
