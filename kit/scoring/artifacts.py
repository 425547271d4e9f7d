"""Numerical and decoding artifacts of one output: where quantization damage shows first.

Scored for every output of every task, next to the task's own metrics (0/1 per output, NaN
where the check does not apply):

``empty_output``
    the answer is empty once whitespace and zero-width characters are removed (a request
    that failed is an ``error``, not an empty output: NaN).
``degenerate_repetition``
    the answer loops: at least :data:`MIN_UNITS` words (or generated tokens) and at least
    half of its 4-gram windows repeat an earlier one (word level, and token level where the
    generated ids were stored), or a unit of 1-20 characters repeated :data:`MIN_REPEATS`
    times covers at least half of an answer of :data:`MIN_CHARS`+ characters ("!!!!!!!!",
    "ababab..."). A short answer never counts.
``truncated``
    decoding stopped at ``max_new_tokens`` (``finish_reason == "length"``); NaN when the
    runtime does not say why it stopped (predictions files).
``nonfinite_logits``
    a decoding step's raw logits held a NaN or an inf (in-process runtimes: transformers,
    llama.cpp); NaN where the runtime exposes no logits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Fewest words / tokens before an answer can count as degenerate repetition.
MIN_UNITS = 12
#: Share of repeated 4-gram windows from which an answer counts as looping.
REPEATED_SHARE = 0.5
MIN_CHARS, MIN_REPEATS = 16, 4
_INVISIBLE = re.compile(r"[\s\u200b\u200c\u200d\u2060\ufeff]+")
_CHAR_LOOP = re.compile(r"(.{1,20}?)\1{" + str(MIN_REPEATS - 1) + ",}", re.DOTALL)
ARTIFACT_COLUMNS = ("empty_output", "degenerate_repetition", "truncated", "nonfinite_logits")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def repeated_share(units: Sequence[Any], n: int = 4) -> float:
    """Share of ``n``-gram windows of ``units`` that repeat an earlier window (0 if too short).

    Examples
    --------
    >>> repeated_share("a b c d a b c d a b c d".split())
    0.5555555555555556
    """
    windows = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if not windows:
        return 0.0
    return 1 - len(set(windows)) / len(windows)


def is_degenerate(text: str, token_ids: Sequence[int] | None = None) -> bool:
    """Whether an answer loops (see the module docstring)."""
    words = text.split()
    if len(words) >= MIN_UNITS and repeated_share(words) >= REPEATED_SHARE:
        return True
    if (
        token_ids is not None
        and len(token_ids) >= MIN_UNITS
        and repeated_share(list(token_ids)) >= REPEATED_SHARE
    ):
        return True
    compact = text.strip()
    if len(compact) >= MIN_CHARS:
        covered = sum(m.end() - m.start() for m in _CHAR_LOOP.finditer(compact))
        if covered >= len(compact) / 2:
            return True
    return False


def artifact_flags(record: Mapping[str, Any]) -> dict[str, float]:
    """The four artifact columns of one stored output row (``kit.execute.OUTPUT_COLUMNS``)."""
    failed = not _missing(record.get("error"))
    text = record.get("output")
    text = text if isinstance(text, str) else ""
    tokens = record.get("token_ids")
    tokens = None if _missing(tokens) else [int(t) for t in tokens]
    finish = record.get("finish_reason")
    bad = record.get("nonfinite_logits")
    if failed:
        empty = repetition = math.nan
    else:
        empty = float(not _INVISIBLE.sub("", text))
        repetition = float(is_degenerate(text, tokens))
    return {
        "empty_output": empty,
        "degenerate_repetition": repetition,
        "truncated": math.nan if failed or _missing(finish) else float(finish == "length"),
        "nonfinite_logits": math.nan if _missing(bad) else float(int(bad) > 0),
    }
