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
``seconds``, ``MB``/``GB``, ``tokens/s``, ``requests/s``, ``$``/``USD``, ``nats``; a bare number is
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

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticError

from kit.errors import CompkitError
from kit.evalset import TASKS
from kit.metrics import (
    LOAD_SLICES,
    METRICS,
    MetricSpec,
    format_limit,
    phrase_index,
    shift_metric,
)
from kit.metrics import metric as metric_spec
from kit.safeyaml import read_yaml

Op = Literal["<", "<=", ">", ">="]
ChangeKind = Literal["points", "absolute", "relative", "no_increase", "no_decrease"]
Verdict = Literal["pass", "fail", "inconclusive", "not measured"]

OP_SYMBOL = {"<": "<", "<=": "≤", ">": ">", ">=": "≥"}
#: Slice columns whose values are sets of gold labels (recall rules need one).
LABEL_SLICES = ("label_rarity",)
#: The slice column of perturbed items (kit.perturb); rules on it bound robustness metrics.
PERTURBATION_SLICE = "perturbation"


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
        return f"{OP_SYMBOL[self.op]} {format_limit(self.value, unit=unit, change=False)}"


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
        return f"{what}{OP_SYMBOL[self.op]} {format_limit(self.limit, unit=unit, change=self.kind)}"


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
    names = {_key(p): n for p, n in phrase_index().items()}
    candidates = [key, re.sub(r"s$", "", key), re.sub(r" rate$", "", key), f"{key} rate"]
    candidates.append(re.sub(r"s$", "", re.sub(r" rate$", "", key)))
    for k in candidates:
        if k in names:
            return names[k]
    return None


# --------------------------------------------------------------------------- slices


SliceVocabulary = Mapping[str, Sequence[str] | None]


def default_slice_vocabulary() -> dict[str, tuple[str, ...] | None]:
    """Known slice columns and values when no data is given (``None``: any value)."""
    from kit.perturb import PERTURBATIONS

    return {
        "task": tuple(TASKS),
        "language": None,
        "length_bucket": None,
        "label_rarity": ("rare", "common"),
        PERTURBATION_SLICE: tuple(PERTURBATIONS),
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
        vocab = default_slice_vocabulary()
    elif isinstance(slices, pd.DataFrame):
        vocab = dict(slice_vocabulary(slices))
    else:
        vocab = {
            c: (tuple(str(v) for v in vs) if vs is not None else None) for c, vs in slices.items()
        }
    for column in LOAD_SLICES:  # load conditions are named by the serving settings, any value
        vocab.setdefault(column, None)
    return vocab


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
    re.compile(
        r"\s+(?:at|with|under)\s+(?P<conc>\d+)\s+(?:concurrent|parallel|simultaneous)\s+"
        r"(?:users?|requests?|clients?|streams?)\b"
    ),
    re.compile(r"\s+at\s+(?P<rate>\d+(?:\.\d+)?)\s+(?:requests?\s+per\s+second|req/s|rps)\b"),
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
        if groups.get("conc"):
            found.append(SliceRef("concurrency", groups["conc"]))
        elif groups.get("rate"):
            found.append(SliceRef("rate", f"{float(groups['rate']):g}"))
        elif groups.get("rarity"):
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
        f"unknown metric {subject.strip()!r}; valid metrics: {', '.join(sorted(METRICS))} "
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
    r"|usd|dollars?|cents?|nats?))?"
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
    "nats": ("nat", "nats"),
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


def _level(num: float, family: str | None, spec: MetricSpec) -> float:
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
    r"|less\s+than|a\s+maximum\s+of|at\s+least|a\s+minimum\s+of|no\s+less\s+than)"
    r"|by\s+(?P<amt_by>over|under)"
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
_TIMES_RE = re.compile(
    rf"^(?P<subj>.+?)\s+{_CHAIN}(?:{_ANY_CMP})\s+(?P<times>\d+(?:\.\d+)?)\s*(?:x|times)\s+"
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


def _direction(verb: str, spec: MetricSpec) -> str:
    if re.fullmatch(_DOWN, verb):
        return "down"
    if re.fullmatch(_UP, verb):
        return "up"
    return "down" if spec.higher_is_better else "up"


def _change_amount(m: re.Match, spec: MetricSpec) -> tuple[ChangeKind, float]:
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


def _change_rule(m: re.Match, spec: MetricSpec, *, amount_word: str) -> ChangeBound:
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
    kind, amount = _change_amount(m, spec)
    down = _direction(m.group("verb"), spec) == "down"
    if not neg and word in ("at least", "a minimum of", "no less than"):
        # a required change: "cost must drop by at least 30 percent" is change <= -30%
        return ChangeBound(kind, "<=", -amount) if down else ChangeBound(kind, ">=", amount)
    if (neg and word in ("more than", "over")) or (not neg and word in inclusive):
        strict = False
    elif not neg and word in ("less than", "under"):
        strict = True
    else:
        raise CompkitError(
            "cannot read the allowed amount; write e.g. 'cannot drop by more than 1 point' "
            "or 'may drop at most 1 point'"
        )
    if down:
        return ChangeBound(kind, ">" if strict else ">=", -amount)
    return ChangeBound(kind, "<" if strict else "<=", amount)


def _no_change_rule(m: re.Match, spec: MetricSpec) -> ChangeBound:
    if not _negated(m.group("chain")):
        raise CompkitError(
            "a change without an amount must be forbidden ('must not increase'); to allow "
            "some change say how much ('may drop by at most 1 point')"
        )
    if _direction(m.group("verb"), spec) == "down":
        return ChangeBound("no_decrease", ">=", 0.0)
    return ChangeBound("no_increase", "<=", 0.0)


def _vs_baseline_rule(m: re.Match, spec: MetricSpec) -> ChangeBound:
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


def _times_rule(m: re.Match, spec: MetricSpec) -> ChangeBound:
    """``at least 2x the baseline``: the candidate's value over the baseline's, as a relative
    change (2x = +100%)."""
    op = _matched_op(m)
    if _negated(m.group("chain")):
        op = _NEGATED[op]
    times = float(m.group("times"))
    if times <= 0:
        raise CompkitError("a multiple of the baseline must be positive")
    return ChangeBound("relative", op, times - 1.0)


def _level_rule(m: re.Match, spec: MetricSpec, op: Op) -> AbsoluteBound:
    if _negated(m.group("chain")):
        op = _NEGATED[op]
    family = _unit_family(m.group("unit"), m.group("cur"))
    return AbsoluteBound(op, _level(_number(m.group("num")), family, spec))


def _or_op(word: str, spec: MetricSpec) -> Op:
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
        (_TIMES_RE, _times_rule),
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
    rest, perturbation, perturbed = _extract_perturbation(_normalise(text), vocab)
    rest, phrase_slice = _extract_slice(rest, vocab)
    if perturbed:
        metric, bound, subject_slice = _parse_perturbed(rest.strip(), vocab)
    else:
        metric, bound, subject_slice = _parse_predicate(rest.strip(), vocab)
    found = list(dict.fromkeys(s for s in (perturbation, phrase_slice, subject_slice) if s))
    if len(found) > 1:
        raise CompkitError(f"a rule names one slice; found {', '.join(map(str, found))}")
    chosen = found[0] if found else None
    if not perturbed and chosen is not None and chosen.column == PERTURBATION_SLICE:
        metric, bound = _under_perturbation(metric, bound)
    _check_metric_slice(metric, chosen)
    _check_threshold(metric, bound)
    return Rule(text=text.strip(), metric=metric, bound=bound, slice=chosen, why=why, id=id)


# --------------------------------------------------------------------------- perturbations

_THAN_BASELINE = (
    r"(?:more|further|beyond)\s+than\s+(?:that\s+of\s+|those\s+of\s+)?(?:the\s+)?"
    r"baseline(?:'s)?(?:\s+(?:does|did|drop|drops|change|shift|one))?"
)
_GAP_RE = re.compile(
    rf"^(?P<subj>.+?)\s+{_CHAIN}{_VERB}\s+(?:{_AMOUNT})\s+{_NUM}{_UNIT}{_REL}\s+{_THAN_BASELINE}$"
)
_GAP_NONE_RE = re.compile(rf"^(?P<subj>.+?)\s+{_CHAIN}{_VERB}\s+(?:any\s+)?{_THAN_BASELINE}$")
_LEVEL_HINT = (
    "bound its drop ('accuracy under typos may drop at most 5 points') or its gap to the "
    "baseline's ('accuracy under typos may drop at most 3 points more than the baseline's')"
)


def _extract_perturbation(text: str, vocab) -> tuple[str, SliceRef | None, bool]:
    """``under <perturbation>`` / ``with <perturbation>`` (one of the suite's names), or
    ``under perturbations`` (pooled over the suite): the rest of the text, the slice, and
    whether the rule is about perturbed copies."""
    names = [str(v) for v in (vocab.get(PERTURBATION_SLICE) or ())]
    if names:
        alternatives = sorted(
            (re.escape(_key(n)).replace(r"\ ", r"[ _\-]") for n in names), key=len, reverse=True
        )
        named = re.compile(
            r"\s+(?:under|with)\s+(?:the\s+)?(?:perturbation\s+)?"
            rf"(?P<name>{'|'.join(alternatives)})(?:\s+perturbations?)?\b"
        )
        m = named.search(text)
        if m:
            want = re.sub(r"[ _\-]", " ", m.group("name"))
            value = next(n for n in names if _key(n) == want)
            return text[: m.start()] + text[m.end() :], SliceRef(PERTURBATION_SLICE, value), True
    pooled = re.compile(r"\s+(?:under|with|across)\s+(?:(?:any|all|every|the)\s+)?perturbations?\b")
    m = pooled.search(text)
    if m:
        return text[: m.start()] + text[m.end() :], None, True
    return text, None, False


def _shift_spec(metric: str) -> MetricSpec:
    spec = metric_spec(metric)
    if spec.stage == "robustness":
        return spec
    name = shift_metric(metric)
    if name is None:
        shifts = sorted(m.removesuffix("_shift") for m in METRICS if m.endswith("_shift"))
        raise CompkitError(
            f"{metric} is not measured under perturbations; the robustness stage measures "
            f"{', '.join(shifts)} (and the perturbation flip rate)"
        )
    return METRICS[name]


def _parse_perturbed(text: str, vocab) -> tuple[str, Bound, SliceRef | None]:
    """A rule about perturbed copies: the gap form, else any predicate on the shift."""
    for pattern in (_GAP_RE, _GAP_NONE_RE):
        m = pattern.match(text)
        if not m:
            continue
        base, subject_slice = _resolve_subject(m.group("subj"), vocab)
        spec = _shift_spec(base)
        if pattern is _GAP_NONE_RE:
            return spec.name, _no_change_rule(m, spec), subject_slice
        amount = m.group("amt") or m.group("amt_by")
        bound = _change_rule(m, spec, amount_word=amount)
        if bound.kind == "relative":
            raise CompkitError(
                "a robustness gap is bounded in points, not relative to the baseline"
            )
        return spec.name, bound, subject_slice
    metric, bound, subject_slice = _parse_predicate(text, vocab)
    metric, bound = _under_perturbation(metric, bound)
    return metric, bound, subject_slice


def _under_perturbation(metric: str, bound: Bound) -> tuple[str, Bound]:
    """A predicate on a metric under a perturbation bounds the candidate's own shift (its
    value): "accuracy under typos may drop at most 5 points" is shift >= -5 points."""
    spec = metric_spec(metric)
    if spec.stage == "robustness":
        return metric, bound
    shift = _shift_spec(metric)
    if isinstance(bound, AbsoluteBound):
        raise CompkitError(f"a level of {metric} under a perturbation is not judged; {_LEVEL_HINT}")
    if bound.kind == "relative":
        raise CompkitError(f"a relative change under a perturbation is not judged; {_LEVEL_HINT}")
    if bound.kind == "no_decrease":
        return shift.name, AbsoluteBound(">=", 0.0)
    if bound.kind == "no_increase":
        return shift.name, AbsoluteBound("<=", 0.0)
    return shift.name, AbsoluteBound(bound.op, bound.limit)


def _check_threshold(name: str, bound: Bound) -> None:
    """Refuse limits the metric can never reach (a share above 100%, a drop of 150 points)."""
    spec = metric_spec(name)
    low, high = spec.value_range
    span = high - low
    unit = "%" if spec.unit == "share" else f" {spec.unit}"
    scale = 100 if spec.unit == "share" else 1

    def show(x: float) -> str:
        return f"{x * scale:g}{unit}"

    if isinstance(bound, AbsoluteBound):
        if not low <= bound.value <= high:
            raise CompkitError(
                f"{name} lies between {show(low)} and {show(high)}; a limit of "
                f"{show(bound.value)} can never be reached or always is"
            )
        return
    if bound.kind == "relative" and bound.limit < -1:
        raise CompkitError(
            f"a relative change below -100% is impossible ({bound.limit * 100:g}% given)"
        )
    if bound.kind in ("points", "absolute") and abs(bound.limit) > span:
        what = f"{abs(bound.limit) * 100:g} points" if spec.unit == "share" else show(bound.limit)
        raise CompkitError(
            f"{name} lies between {show(low)} and {show(high)}; a change of {what} is impossible"
        )


def _check_metric_slice(metric: str, chosen: SliceRef | None) -> None:
    if metric == "recall" and (chosen is None or chosen.column not in LABEL_SLICES):
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
    _check_threshold(metric, bound)
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
    raw = read_yaml(path, what="budget")
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
