"""Exact match after normalization: an ``evaluate`` metric module shipped with compkit.

Metric card
===========

Metric description
------------------
``exact_match_normalized`` is the share of predictions that equal their reference after
both are normalized: Unicode NFKC, case folding, surrounding whitespace and punctuation
removed (``"  Paris."`` equals ``"paris"``), and runs of whitespace collapsed to one
space. Punctuation *inside* the text is kept (``"3.5"`` differs from ``"35"``).

How to use
----------
Load it from its local folder, offline (it never touches the Hugging Face Hub)::

    import evaluate
    em = evaluate.load("kit/scoring/evaluate_modules/exact_match_normalized")
    em.compute(predictions=["Paris.", "Lyon"], references=["paris", "Nice"])
    # {'exact_match_normalized': 0.5}

or as a compkit scorer::

    from kit.scoring.custom import evaluate_scorer
    scorer = evaluate_scorer("exact_match_normalized", task="generation",
                             metric_name="exact_match_normalized", higher_is_better=True)

Inputs
------
- **predictions** (*list of str*): model outputs.
- **references** (*list of str*): one reference per prediction.
- **keep_case** (*bool*, default ``False``): compare case-sensitively.

Output values
-------------
- **exact_match_normalized** (*float*, 0-1): the share of exact matches; for a single
  prediction it is 1.0 or 0.0. Higher is better.

Limitations
-----------
Paraphrases score 0; use it for short answers (names, numbers, labels), not free text.

Citation
--------
None; the normalization follows the usual SQuAD-style answer normalization without its
article removal (which is English-only).
"""

import re
import string
import unicodedata

import datasets
import evaluate

_DESCRIPTION = __doc__.split("Metric description\n------------------\n")[1].split("\n\n")[0]
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, the model outputs.
    references: list of str, one reference per prediction.
    keep_case: bool, default False; True compares case-sensitively.
Returns:
    exact_match_normalized: float in [0, 1], the share of normalized exact matches.
Examples:
    >>> em = evaluate.load("kit/scoring/evaluate_modules/exact_match_normalized")
    >>> em.compute(predictions=["Paris.", "Lyon"], references=["paris", "Nice"])
    {'exact_match_normalized': 0.5}
"""
_CITATION = ""

_WS = re.compile(r"\s+")
_EDGE = (
    string.punctuation + "\u00a1\u00bf\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u3002\uff01\uff1f"
)


def normalize(text, keep_case=False):
    """NFKC, case fold (unless keep_case), collapse whitespace, strip edge punctuation."""
    text = unicodedata.normalize("NFKC", text or "")
    if not keep_case:
        text = text.casefold()
    return _WS.sub(" ", text).strip().strip(_EDGE).strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatchNormalized(evaluate.Metric):
    """Share of predictions equal to their reference after normalization."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=[],
        )

    def _compute(self, predictions, references, keep_case=False):
        if not predictions:
            return {"exact_match_normalized": 0.0}
        hits = [
            normalize(p, keep_case) == normalize(r, keep_case)
            for p, r in zip(predictions, references, strict=True)
        ]
        return {"exact_match_normalized": sum(hits) / len(hits)}
