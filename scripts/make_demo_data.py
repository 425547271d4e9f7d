#!/usr/bin/env python3
"""Build the demo eval set from real public data: CLINC150 intents and Restaurant-8k slots.

Two steps, both deterministic:

``--copy-from SHARED``
    copy the rows the demo uses from a shared-data folder (``intent_clinc150/`` and
    ``extraction_restaurant8k/``, each with its SOURCE.md) into ``data/demo/sources/``, so
    a clone needs nothing outside the repository. Rows are picked by
    ``sha256("demo|<id>")`` order within each intent; the first row of every intent is kept
    apart as the prompt's few-shot example and never evaluated.
default
    convert ``data/demo/sources/`` into ``data/demo/demo_eval.jsonl`` (the eval schema of
    ``docs/eval_schema.md``). The test suite checks the committed file equals a fresh
    conversion, so never edit the JSONL by hand.

Usage::

    python scripts/make_demo_data.py --copy-from ../shared/data   # refresh the copied rows
    python scripts/make_demo_data.py                              # -> data/demo/demo_eval.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SOURCES = DEMO / "sources"

#: CLINC150 intent -> the label the demo scores (a short phrase a 135M model can score).
INTENTS = {
    "restaurant_reservation": "book a table",
    "restaurant_reviews": "restaurant reviews",
    "how_busy": "how busy is it",
    "directions": "directions",
    "uber": "order a ride",
    "weather": "weather",
    "calories": "calories",
    # rare in production traffic and costly to miss (the study's eval_set.rare_labels); the
    # eval set oversamples them so that their recall is measured on 14 items, not 2
    "cancel_reservation": "cancel a booking",
    "report_fraud": "report fraud",
}
RARE = ("cancel_reservation", "report_fraud")
PER_COMMON, PER_RARE = 7, 7  # every row the shared sample has (8 an intent, 1 is few-shot)
N_EXTRACTION = 60
FIELDS = ["people", "date", "time", "first_name", "last_name"]
#: The demo's extractor fills a booking's date and time: the turns answering a question for
#: those slots only (66 rows of the sample). Names and party sizes are left out: on the
#: rows the demo does not use, SmolLM2-135M got 4 of 15 names and 1 of 8 party sizes exactly
#: (it copies the example's surname; Restaurant-8k's people spans read "3 people").
SLOTS = {"date", "time"}
#: The slot-filling prompt's examples: the first row (in sha256 order) asking for each of
#: these slot sets and giving every one of them.
FEWSHOT_SLOTS = (("time",), ("date",))


def _order(ns: str, row_id: str) -> str:
    return hashlib.sha256(f"{ns}|{row_id}".encode()).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def copy_sources(shared: Path) -> None:
    """Copy the demo's CLINC150 and Restaurant-8k rows (and SOURCE.md files) from ``shared``."""
    clinc = _read_jsonl(shared / "intent_clinc150" / "clinc150_test_sample.jsonl")
    picked = []
    for intent in INTENTS:
        rows = sorted(
            (r for r in clinc if r["label"] == intent), key=lambda r: _order("demo", r["id"])
        )
        n = 1 + (PER_RARE if intent in RARE else PER_COMMON)
        if len(rows) < n:
            sys.exit(f"CLINC150: intent {intent!r} has {len(rows)} rows, the demo needs {n}")
        picked += [{**r, "role": "fewshot" if i == 0 else "eval"} for i, r in enumerate(rows[:n])]
    _write_jsonl(SOURCES / "clinc150" / "clinc150_demo.jsonl", picked)
    shutil.copyfile(shared / "intent_clinc150" / "SOURCE.md", SOURCES / "clinc150" / "SOURCE.md")

    r8k = _read_jsonl(shared / "extraction_restaurant8k" / "restaurant8k_test_sample.jsonl")
    asked = [r for r in r8k if r["requested_slots"] and set(r["requested_slots"]) <= SLOTS]
    ordered = sorted(asked, key=lambda r: _order("demo", r["id"]))
    shots = [_first_asking(ordered, slots) for slots in FEWSHOT_SLOTS]
    rest = [r for r in ordered if r not in shots][:N_EXTRACTION]
    rows = [{**r, "role": "fewshot"} for r in shots] + [{**r, "role": "eval"} for r in rest]
    _write_jsonl(SOURCES / "restaurant8k" / "restaurant8k_demo.jsonl", rows)
    shutil.copyfile(
        shared / "extraction_restaurant8k" / "SOURCE.md", SOURCES / "restaurant8k" / "SOURCE.md"
    )


def _first_asking(rows: list[dict], slots: tuple[str, ...]) -> dict:
    for r in rows:
        if sorted(r["requested_slots"]) == sorted(slots) and all(r["fields"][k] for k in slots):
            return r
    sys.exit(f"Restaurant-8k: no row asks for exactly {slots}")


def build_items() -> list[dict]:
    """The demo's eval items from ``data/demo/sources/`` (classification, then extraction)."""
    items = []
    for r in _read_jsonl(SOURCES / "clinc150" / "clinc150_demo.jsonl"):
        if r["role"] != "eval":
            continue
        items.append(
            {
                "id": r["id"],
                "task": "classification",
                "input": r["text"],
                "label": INTENTS[r["label"]],
                "labels": list(INTENTS.values()),
                "language": r["language"],
                "source": "clinc150",
            }
        )
    for r in _read_jsonl(SOURCES / "restaurant8k" / "restaurant8k_demo.jsonl"):
        if r["role"] != "eval":
            continue
        asked = sorted(k for k in FIELDS if k in r["requested_slots"])  # the file sorts keys
        items.append(
            {
                "id": r["id"],
                "task": "extraction",
                "input": r["text"],
                # slot filling: the slots the assistant had just asked for
                "fields": {k: r["fields"][k] for k in asked},
                "language": "en",
                "source": "restaurant8k",
                "asked_for": ", ".join(asked),
            }
        )
    return items


def fewshot() -> list[dict]:
    """The few-shot example of each intent (CLINC150 rows kept out of the eval set)."""
    rows = _read_jsonl(SOURCES / "clinc150" / "clinc150_demo.jsonl")
    return [
        {"text": r["text"], "label": INTENTS[r["label"]]} for r in rows if r["role"] == "fewshot"
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copy-from", type=Path, help="shared-data folder to copy the rows from")
    ap.add_argument("--out", type=Path, default=DEMO / "demo_eval.jsonl")
    args = ap.parse_args(argv)
    if args.copy_from is not None:
        copy_sources(args.copy_from)
    _write_jsonl(args.out, build_items())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
