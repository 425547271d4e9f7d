"""The perturbation suite: each transformation, its protected spans, determinism, and the
derived items frozen with the baseline (hashed, re-checked by ``compkit check``)."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet
from kit.perturb import (
    DISTRACTORS,
    HOMOGLYPHS,
    INJECTIONS,
    NBSP,
    PERTURBATIONS,
    ZWSP,
    build_perturbed,
    perturb_item,
    protected_mask,
    resolved_params,
)
from kit.study import PerturbationsConfig

TEXT = "Hello, I ordered the Falcon Phone Case on order ORD-123456 and it never arrived here."
EXTRACTION = EvalItem(
    id="x1",
    task="extraction",
    input=TEXT + " Write to dana.kim@mail.example please.",
    fields={"order_id": "ORD-123456", "product": "Falcon Phone Case", "email": None},
)
CLASSIFY = EvalItem(id="c1", task="classification", input=TEXT, label="order_status")
CHAT = EvalItem(
    id="m1",
    task="classification",
    messages=[
        {"role": "user", "content": "earlier turn stays as it is"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "where is my parcel, it is very late"},
    ],
    label="order_status",
)
TEXT_KINDS = [k for k in PERTURBATIONS if k not in ("padding", "translation")]


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_every_text_perturbation_changes_the_input_and_keeps_the_reference(kind):
    for item in (EXTRACTION, CLASSIFY):
        out = perturb_item(item, kind=kind, name=kind, seed=0)
        assert out is not None and out.text != item.text, kind
        assert out.id == f"{item.id}~{kind}"
        keep = {"task", "label", "fields", "choices", "answer", "language", "slices", "context"}
        assert {k: getattr(out, k) for k in keep} == {k: getattr(item, k) for k in keep}
        # the same seed gives the same text, on any machine and in any order
        assert perturb_item(item, kind=kind, name=kind, seed=0).text == out.text


@pytest.mark.parametrize(
    "kind", ["typos", "casing", "whitespace", "nbsp", "zero_width", "homoglyphs"]
)
def test_noise_never_touches_protected_spans(kind):
    out = perturb_item(EXTRACTION, kind=kind, name=kind, seed=3)
    for value in ("ORD-123456", "Falcon Phone Case", "dana.kim@mail.example"):
        assert value in out.text, (kind, value, out.text)


def test_protected_mask_covers_digits_emails_and_reference_values():
    mask = protected_mask(EXTRACTION.text, EXTRACTION)
    text = EXTRACTION.text
    for value in ("ORD-123456", "falcon phone case", "dana.kim@mail.example"):
        start = text.lower().index(value.lower())
        assert all(mask[start : start + len(value)]), value
    assert not mask[text.index("Hello")]


def test_what_each_kind_writes():
    t = lambda kind, **p: perturb_item(CLASSIFY, kind=kind, name=kind, seed=1, params=p).text  # noqa: E731
    assert NBSP in t("nbsp") and ZWSP in t("zero_width")
    assert any(ch in t("homoglyphs") for ch in HOMOGLYPHS.values())
    assert unicodedata.normalize("NFKC", t("homoglyphs")) != TEXT  # NFKC does not undo them
    assert t("casing", mode="lower") == TEXT.lower().replace("ord-123456", "ORD-123456")
    assert t("casing").startswith("HELLO, I ORDERED THE FALCON")
    assert any(s in t("distractor") for s in DISTRACTORS)
    assert t("distractor", position="start").endswith(TEXT)
    assert any(t("injection").endswith(s) for s in INJECTIONS)
    assert any(c in t("whitespace") for c in ("  ", "\t", "\n"))
    typo = t("typos", rate=0.0)  # rate 0 still misspells one word
    assert sum(a != b for a, b in zip(typo.split(), TEXT.split(), strict=False)) == 1 or len(
        typo
    ) != len(TEXT)


def test_seed_and_name_change_the_draw_but_not_the_rest():
    a = perturb_item(CLASSIFY, kind="typos", name="typos", seed=1, params={"rate": 0.5})
    b = perturb_item(CLASSIFY, kind="typos", name="typos", seed=2, params={"rate": 0.5})
    c = perturb_item(CLASSIFY, kind="typos", name="typos2", seed=1, params={"rate": 0.5})
    assert a.text != b.text and a.text != c.text


def test_chat_items_perturb_their_last_user_turn_only():
    out = perturb_item(CHAT, kind="casing", name="casing", seed=0)
    assert out.messages[0].content == "earlier turn stays as it is"
    assert out.messages[-1].content == "WHERE IS MY PARCEL, IT IS VERY LATE"


def test_an_item_with_nothing_to_perturb_is_skipped_with_a_reason():
    digits = EvalItem(id="d", task="classification", input="ORD-1 ORD-2", label="x")
    assert perturb_item(digits, kind="typos", name="typos", seed=0) is None
    config = PerturbationsConfig(suite=["typos", "distractor"])
    built = build_perturbed(EvalSet("t", [digits], []), config)
    assert list(built.frame["perturbation"]) == ["distractor"]
    assert built.skipped.iloc[0]["reason"].startswith("nothing in the input")


def test_translation_reads_a_column_and_sets_the_language():
    item = EvalItem(
        id="t1",
        task="classification",
        input="Where is my parcel?",
        label="order_status",
        language="en",
        slices={"input_de": "Wo ist mein Paket?", "channel": "chat"},
    )
    config = PerturbationsConfig(
        suite=[
            {
                "kind": "translation",
                "name": "to_german",
                "params": {"column": "input_de", "language": "de"},
            }
        ]
    )
    built = build_perturbed(EvalSet("t", [item], ["input_de", "channel"]), config)
    (derived,) = built.items.items
    assert derived.text == "Wo ist mein Paket?" and derived.language == "de"
    assert derived.id == "t1~to_german" and derived.slices == {"channel": "chat"}
    assert built.items.slice_columns == ["channel"]  # a translation is no slice column


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("typoz", {}, "unknown perturbation 'typoz'; kinds:"),
        ("typos", {"ratio": 0.1}, "has no parameter(s) ['ratio']"),
        ("typos", {"rate": 2.0}, "must lie in [0.0, 1.0]"),
        ("casing", {"mode": "shout"}, "must be one of ['upper', 'lower', 'title', 'random']"),
        ("translation", {"column": "x"}, "needs params.language"),
    ],
)
def test_bad_parameters_are_refused_naming_what(kind, params, message):
    with pytest.raises(CompkitError, match=re.escape(message)):
        resolved_params(kind, params)


def test_padding_reaches_the_next_length_bucket_with_a_real_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def count(item: EvalItem) -> int:
        return len(tok(item.text).input_ids)

    items = [
        EvalItem(id="s", task="classification", input="where is my parcel", label="a"),
        EvalItem(id="l", task="classification", input="word " * 70, label="a"),
    ]
    config = PerturbationsConfig(suite=[{"kind": "padding", "params": {"max_tokens": 200}}])
    built = build_perturbed(
        EvalSet("t", items, []), config, count_tokens=count, length_edges=[16, 64]
    )
    (padded,) = built.items.items
    assert padded.id == "s~padding" and padded.text.endswith("where is my parcel")
    assert count(padded) >= 16  # the short item landed in the next bucket ...
    n = built.padding["padding"]["s"]
    shorter = build_perturbed(
        EvalSet("t", items[:1], []), config, padding={"padding": {"s": n - 1}}
    ).items.items[0]
    assert count(shorter) < 16  # ... with the fewest filler sentences that get it there
    assert "top length bucket" in built.skipped.iloc[0]["reason"]  # the long one is skipped
    again = build_perturbed(EvalSet("t", items, []), config, padding=built.padding)
    assert again.sha256 == built.sha256  # what compkit check rebuilds


# --------------------------------------------------------------------------- frozen with the baseline


ITEMS = [
    {"id": f"c{i}", "task": "classification", "input": text, "label": label}
    for i, (text, label) in enumerate(
        [
            ("where is my parcel please", "order_status"),
            ("someone stole my card yesterday", "fraud"),
            ("my refund never came back", "refund"),
        ]
    )
]


def write_suite_study(folder: Path, *, suite: list, predict_perturbed: bool = True) -> Path:
    """A predictions-runtime study with a perturbation suite; predictions cover every id."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (folder / "prompt.jinja").write_text("{{ input }}")
    config = PerturbationsConfig(suite=suite)
    items = EvalSet("x", [EvalItem(**r) for r in ITEMS], [])
    derived = build_perturbed(items, config).items.items if predict_perturbed else []
    rows = [{"id": it.id, "output": it.label} for it in [*items.items, *derived]]
    (folder / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = {
        "name": "suite",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja", "chat": False},
        "baseline": {"name": "base", "runtime": "predictions", "model": "base.jsonl"},
        "perturbations": {"suite": suite, "seed": 5},
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder / "study.yaml"


def test_derived_items_are_frozen_hashed_and_checked(tmp_path):
    from kit.run import Run
    from kit.stages.freeze import check_frozen, freeze_baseline

    study = write_suite_study(tmp_path / "s", suite=["typos", "nbsp"])
    manifest = freeze_baseline(study, tmp_path / "run", progress=False)
    run = Run.open(tmp_path / "run")
    assert manifest.inputs.perturbed_rows == 6 and manifest.inputs.perturbed_sha256
    assert run.perturbed.sha256 == manifest.inputs.perturbed_sha256
    assert sorted(run.perturbations()["id"]) == sorted(
        f"c{i}~{k}" for i in range(3) for k in ("typos", "nbsp")
    )
    assert len(run.eval_set) == 3 and len(run.scoring_set) == 9
    assert set(run.outputs(items="all")["item_id"]) == run.item_ids("all")
    assert set(run.outputs()["item_id"]) == {"c0", "c1", "c2"}  # other stages see clean items
    assert check_frozen(tmp_path / "run").ok
    # a changed seed changes every derived item: check names the suite and the items
    data = yaml.safe_load(study.read_text())
    data["perturbations"]["seed"] = 6
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    report = check_frozen(tmp_path / "run")
    changed = report.changed().set_index("input")
    assert not report.ok
    assert "perturbation suite" in changed.index and "perturbed items" in changed.index
    detail = changed.loc["perturbed items", "detail"]
    assert detail.split()[1] == "changed:" and int(detail.split()[0]) >= 4, detail


def test_an_edited_source_item_changes_its_derived_items(tmp_path):
    from kit.stages.freeze import check_frozen, freeze_baseline

    study = write_suite_study(tmp_path / "s", suite=["casing"])
    freeze_baseline(study, tmp_path / "run", progress=False)
    rows = [{**r, "input": r["input"] + " now"} if r["id"] == "c1" else r for r in ITEMS]
    (tmp_path / "s" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = check_frozen(tmp_path / "run").changed().set_index("input")
    assert changed.loc["perturbed items", "detail"] == "1 changed: c1~casing"


def test_a_predictions_file_without_the_perturbed_ids_is_refused_naming_them(tmp_path):
    from kit.validate import validate_study

    study = write_suite_study(tmp_path / "s", suite=["typos"], predict_perturbed=False)
    with pytest.raises(CompkitError, match="c0~typos"):
        validate_study(study)


def test_a_suite_entry_named_twice_or_a_missing_translation_column_fails_validation(tmp_path):
    from kit.validate import validate_study

    study = write_suite_study(tmp_path / "s", suite=["typos"])
    data = yaml.safe_load(study.read_text())
    data["perturbations"]["suite"] = [
        "typos",
        "typos",
        {"kind": "translation", "params": {"column": "input_fr", "language": "fr"}},
    ]
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(CompkitError) as err:
        validate_study(study, sources=False)
    assert "name 'typos' is used twice" in str(err.value)
    assert "perturbations.suite.1" in str(err.value)
