"""Text normalizers and detectors shared by the task scorers."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

_WS = re.compile(r"\s+")
_LETTER = re.compile(r"^\s*(?:answer\s*[:\-]?\s*)?[\(\[]?([A-Z])(?:[\)\]\.:,]|\s|$)", re.IGNORECASE)

REFUSAL_MARKERS = (
    # en
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "not able to help",
    "can't help with",
    "cannot help with",
    "can't assist",
    "cannot assist",
    "won't be able to",
    "against our policy",
    "not allowed to",
    "i must decline",
    "i have to decline",
    # es / de / fr
    "lo siento",
    "no puedo",
    "no es posible ayudarte",
    "es tut mir leid",
    "ich kann nicht",
    "ich kann ihnen dabei nicht",
    "kann ich nicht",
    "je suis désolé",
    "je ne peux pas",
    "désolé, je ne",
)


def fold(text: str) -> str:
    """Case-fold, NFKC-normalize and collapse whitespace."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def label_key(text: str) -> str:
    """A label as a comparable key: 'Order Status.' -> 'order_status'."""
    t = fold(text).strip(" .!?:;\"'`*")
    return re.sub(r"[\s\-/]+", "_", t)


def match_label(output: str, labels: list[str]) -> str | None:
    """The label the output names: exact (normalized) match, else the single label
    mentioned in it; ``None`` when none or several are mentioned."""
    keys = {label_key(lab): lab for lab in labels}
    first_line = output.strip().splitlines()[0] if output.strip() else ""
    for candidate in (output, first_line):
        if label_key(candidate) in keys:
            return keys[label_key(candidate)]
    norm = label_key(output)
    hits = {
        lab
        for key, lab in keys.items()
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", norm)
    }
    return hits.pop() if len(hits) == 1 else None


def match_choice(output: str, choices: list[str]) -> int | None:
    """Index of the option the output picks: a leading letter ('B', '(B)', 'Answer: B'),
    else an exact option text."""
    m = _LETTER.match(output)
    if m:
        idx = ord(m.group(1).upper()) - ord("A")
        if 0 <= idx < len(choices):
            return idx
    folded = fold(output).strip(" .")
    for i, c in enumerate(choices):
        if folded == fold(c).strip(" ."):
            return i
    return None


def is_refusal(output: str) -> bool:
    """Whether the output declines the request (phrase markers, en/es/de/fr)."""
    t = fold(output).replace("’", "'")
    return any(marker in t for marker in REFUSAL_MARKERS)


def parse_json_strict(output: str) -> tuple[Any, bool]:
    """Parse the whole output as JSON, no repair (fences or prose make it fail)."""
    try:
        return json.loads(output.strip()), True
    except (json.JSONDecodeError, ValueError):
        return None, False


def values_equal(expected: Any, got: Any) -> bool:
    """Reference vs predicted field value: None only equals None; scalars compare as
    folded text (so 3 == "3"); lists/dicts compare element-wise."""
    if expected is None or got is None:
        return expected is None and got is None
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(
            values_equal(v, got[k]) for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(
            values_equal(a, b) for a, b in zip(expected, got, strict=True)
        )
    if isinstance(expected, (dict, list)) or isinstance(got, (dict, list)):
        return False
    return fold(str(expected)).strip(" .") == fold(str(got)).strip(" .")
