"""Offline chart rendering, the paired-items compute, the explorer's wiring (headless), the
progress relay, notebook parameters (``papermill --help-notebook``, defaults from a study
path alone) and ``compkit new``."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline import TEMPLATES, _expand, build_judged_run, write_study

from kit.cli import main
from kit.errors import CompkitError

ROOT = Path(__file__).resolve().parent.parent
#: The eight item templates once (ids ``c1-00`` ...): a study small enough to reason about.
ITEMS = _expand(TEMPLATES, copies=1)
PAYLOAD = "</script><script>alert(1)</script> <img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    items = [dict(i) for i in ITEMS]
    for item in items:
        if item["id"] == "g1-00":
            item["input"] = f"Apologise for the delay.\n\n{PAYLOAD}"
    return build_judged_run(tmp_path_factory.mktemp("jupyter"), items=items)


@pytest.fixture(scope="module")
def inputs(run_dir):
    from kit.stages.drilldown import explorer_inputs

    return explorer_inputs(run_dir)


# --------------------------------------------------------------------------- charts


def _layered():
    import altair as alt

    frame = pd.DataFrame({"a": ["x", PAYLOAD], "b": [1, 2]})
    base = alt.Chart(frame)
    return alt.layer(base.mark_bar().encode(x="a:N", y="b:Q"), base.mark_point()).properties(
        title="t"
    )


def test_static_renderer_draws_svg_and_png_with_data_escaped():
    from kit.report.charts.display import STATIC, static_bundle, use_charts

    bundle = static_bundle(_layered().to_dict())
    svg = bundle["image/svg+xml"]
    import xml.etree.ElementTree as ET

    tree = ET.fromstring(svg)  # the payload stays text: no element, no event attribute
    tags = {el.tag.rsplit("}", 1)[-1] for el in tree.iter()}
    assert not tags & {"script", "img", "foreignObject", "iframe"}
    assert not [a for el in tree.iter() for a in el.attrib if a.lower().startswith("on")]
    assert any("</script><script>" in (el.text or "") for el in tree.iter())  # an axis label
    import base64

    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert bundle["text/plain"] == "<compkit chart: t>"
    assert use_charts() == STATIC  # outside a kernel: no person is clicking
    assert use_charts("no") == STATIC
    with pytest.raises(CompkitError, match="interactive='maybe'"):
        use_charts("maybe")


def test_interactive_renderer_is_an_offline_vega_widget():
    import altair as alt

    from kit.report.charts.display import INTERACTIVE, chart_from_spec, use_charts

    try:
        assert use_charts(True) == INTERACTIVE
        bundle = alt.renderers.get()(_layered().to_dict())
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert alt.JupyterChart._is_offline
        esm = alt.JupyterChart._esm
        assert len(esm) > 100_000 and "cdn.jsdelivr" not in esm and "unpkg.com" not in esm
    finally:
        use_charts(False)
    spec = alt.vconcat(_layered(), _layered()).to_dict()
    assert type(chart_from_spec(spec)).__name__ == "VConcatChart"


def test_note_is_escaped_html():
    from kit.report.charts.display import note

    html = note(PAYLOAD)._repr_html_()
    assert "<script>" not in html and "&lt;/script&gt;" in html
    with pytest.raises(CompkitError, match="note kind"):
        note("x", kind="shout")


def test_notebook_exports_load_no_script_and_no_cdn(run_dir):
    import nbformat

    from kit.pipeline import export_html

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells = [nbformat.v4.new_markdown_cell("$x$ and `code`")]
    path = run_dir / "exported.ipynb"
    nbformat.write(nb, path)
    html = export_html(path).read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    for host in ("cdn.jsdelivr", "unpkg.com", "cdnjs", "require.js", "mathjax"):
        assert host not in html.lower(), host
    assert "<title>exported</title>" in html


# --------------------------------------------------------------------------- items


def test_paired_items_lay_both_models_side_by_side(inputs):
    items = inputs.items(candidate="worse", metric="accuracy")
    assert items["item_id"].tolist() == sorted(i["id"] for i in ITEMS)
    flips = dict(zip(items["item_id"], items["flip"], strict=True))
    assert {k for k, v in flips.items() if v == "right_to_wrong"} == {"c1-00", "g1-00", "m1-00"}
    g1 = items.set_index("item_id").loc["g1-00"]
    assert g1["baseline_output"] == "Sorry for the delay." and g1["candidate_output"] == "No."
    assert PAYLOAD in g1["input"]
    c1 = items.set_index("item_id").loc["c1-00"]
    assert (c1["baseline_confidence"], c1["candidate_confidence"]) == pytest.approx((0.8, 0.7))
    assert {"channel", "task", "length_bucket"} <= set(items.columns)
    assert "label" not in items.columns[14:]  # raw labels are not a slice column
    choice = inputs.items(candidate="worse", metric="choice_accuracy")
    assert set(choice["item_id"]) == {
        "c1-00",
        "c2-00",
        "c3-00",
        "c4-00",
        "m1-00",
        "m2-00",
    }  # choice tasks only
    graded = inputs.items(candidate="worse", metric="chrf")
    assert set(graded["flip"]) <= {"worse", "better", "unchanged"}
    assert graded.set_index("item_id").loc["g1-00", "flip"] == "worse"


def test_select_items_filters_by_slice_flip_search_and_confidence_bin(inputs):
    from kit.analysis.calibration import reliability_table
    from kit.analysis.items import flip_counts, select_items

    items = inputs.items(candidate="worse", metric="accuracy")
    email = select_items(items, slice="channel=email")
    assert set(email["item_id"]) == {"c1-00", "c3-00", "g1-00", "m1-00"}
    assert select_items(items, slice={"channel": "email", "task": "generation"})[
        "item_id"
    ].tolist() == ["g1-00"]
    r2w = select_items(email, flips=["right_to_wrong"])
    assert set(r2w["item_id"]) == {"c1-00", "g1-00", "m1-00"}
    assert select_items(items, search="DELAY")["item_id"].tolist() == ["g1-00"]
    assert select_items(items, search="no.")["item_id"].tolist() == ["g1-00"]  # candidate output
    assert dict(flip_counts(items).itertuples(index=False))["right_to_wrong"] == 3
    # every reliability bin holds exactly its n items
    conf = inputs.confidence
    for model, which in (("base", "baseline"), ("worse", "candidate")):
        rows = conf[(conf["model"] == model) & conf["confidence"].notna()]
        table = reliability_table(rows["correct"], rows["confidence"], n_bins=10)
        for b in table.itertuples():
            picked = select_items(
                items,
                confidence_of=which,
                confidence_range=(b.lower, b.upper),
                first_bin=b.bin == 0,
            )
            assert len(picked) == b.n, (model, b.bin)
    with pytest.raises(CompkitError, match="slice column 'nope'"):
        select_items(items, slice="nope=1")
    with pytest.raises(CompkitError, match="confidence_of"):
        select_items(items, confidence_range=(0, 1))


# --------------------------------------------------------------------------- explorer


def test_explorer_wires_picks_filters_and_search(inputs):
    from kit.report.widgets import Explorer

    e = Explorer(inputs, page_size=2)
    assert e.candidate.value == "edge" and e.metric.value == "accuracy"  # the first, by name
    assert "choice_accuracy" in e.metric.options
    e.candidate.value = "worse"
    assert e.status.value.startswith('<div class="ck-status">8 of 8 items of worse')
    assert e.more.layout.display is None  # 8 items, a page of 2
    e.column.value = "channel"
    e._on_slice_click({"new": type("Sel", (), {"value": [{"slice_value": "email"}]})()})
    assert "4 of 8 items" in e.status.value and "slice channel=email" in e.status.value
    assert e.table.value.count("<tr data-item") == 2
    e.more.click()
    assert e.table.value.count("<tr data-item") == 4
    e.flips.value = "right_to_wrong"
    assert "3 of 8 items" in e.status.value
    e.search.value = "delay"
    assert "1 of 8 items" in e.status.value and "containing" in e.status.value
    html = e.table.value
    assert "<script>alert" not in html and "&lt;/script&gt;&lt;script&gt;alert(1)" in html
    assert "\\n\\n" not in html  # newlines are kept as newlines (pre-wrap), not escaped
    assert "table-layout: fixed" in html and "overflow-wrap: anywhere" in html
    e.clear.click()
    assert "slice" not in e.status.value.split("·", 1)[-1]
    e.search.value, e.flips.value = "", "all"
    definition = e.discovered.options[0][1]
    e.discovered.value = definition
    assert f"slice {definition}" in e.status.value.replace("&amp;", "&")
    e.clear.click()
    e._on_bin_click({"new": type("Sel", (), {"value": [{"model": "worse", "bin": 6}]})()})
    assert "worse confidence in (0.60, 0.70]" in e.status.value
    e.pick_bin(None)
    e._on_slice_click({"new": type("Sel", (), {"value": [{"slice_value": "nowhere"}]})()})
    assert "0 of 8 items" in e.status.value and "no items match" in e.table.value
    e.metric.value = "choice_accuracy"
    assert "6 of 6 items of worse on choice_accuracy" in e.status.value


def test_slice_explorer_needs_the_drilldown_tables(tmp_path):
    from kit.report.widgets import slice_explorer

    run = build_judged_run(tmp_path)
    (run / "tables" / "slice_table.parquet").unlink()
    with pytest.raises(CompkitError, match="run write_drilldown_tables"):
        slice_explorer(run)


# --------------------------------------------------------------------------- progress


def test_task_progress_is_silent_without_a_relay(monkeypatch, tmp_path):
    from kit.progress import ENV, task_progress

    monkeypatch.delenv(ENV, raising=False)
    with task_progress("m", total=3) as p:
        p.update(3)
    target = tmp_path / "events.jsonl"
    monkeypatch.setenv(ENV, str(target))
    with task_progress("m", total=4, initial=1) as p:
        p.update(1)  # throttled: within MIN_INTERVAL_S of the first event
        p.update(2)  # the last one is always written
    events = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(e["done"], e["total"]) for e in events] == [(1, 4), (4, 4), (4, 4)]


def test_relay_prints_rate_and_eta_and_restores_the_environment(monkeypatch):
    from kit.progress import ENV, ProgressRelay, format_progress

    monkeypatch.delenv(ENV, raising=False)
    assert (
        format_progress("q4", 40, 90, "item", 3.2, 12) == "q4: 40/90 items · 3.2 items/s · ETA 16s"
    )
    assert (
        format_progress("q4", 90, 90, "item", 3.0, 75)
        == "q4: 90/90 items · 3.0 items/s · done in 1m15s"
    )
    clock = iter([0.0, 1.0, 2.0, 30.0, 31.0]).__next__
    out = io.StringIO()
    with ProgressRelay("[candidates]", stream=out, live=False, clock=clock) as relay:
        assert os.environ[ENV] == str(relay.path)
        for done, t in ((0, 100.0), (10, 102.0), (20, 104.0), (30, 106.0), (60, 112.0)):
            relay.handle({"task": "q4", "done": done, "total": 60, "unit": "item", "t": t})
    assert ENV not in os.environ and not relay.path.exists()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[candidates] q4: 0/60 items",
        "[candidates] q4: 30/60 items · 5.0 items/s · ETA 6s",
        "[candidates] q4: 60/60 items · 5.0 items/s · done in 12s",
    ]
    live = io.StringIO()
    with ProgressRelay("[x]", stream=live, live=True) as relay:
        relay.handle({"task": "m", "done": 5, "total": 10, "unit": "item", "t": 1.0})
    assert "[x] m" in live.getvalue() and "5/10" in live.getvalue()


@pytest.mark.notebooks
def test_compkit_run_relays_each_models_progress_without_changing_parameters(tmp_path, capsys):
    from kit.pipeline import PipelineRecord, run_pipeline

    study = write_study(tmp_path / "study", items=ITEMS)
    out = tmp_path / "runs" / "tiny"
    run_pipeline(study, out, stages=["freeze", "candidates"], progress=True)
    err = capsys.readouterr().err
    assert "  [freeze] base: 8/8 items" in err
    for name in ("same", "worse", "fixer", "edge"):
        assert f"  [candidates] {name}: 8/8 items" in err
    loud = PipelineRecord.load(out).stages["candidates"].parameters
    run_pipeline(study, out, stages=["candidates"], progress=False)
    assert PipelineRecord.load(out).stages["candidates"].parameters == loud
    assert "progress" not in json.dumps(loud) or loud["progress"] is False


# --------------------------------------------------------------------------- notebooks


def _help(notebook: Path) -> str:
    """What ``papermill --help-notebook NOTEBOOK`` prints (its click command, in process)."""
    from click.testing import CliRunner
    from papermill.cli import papermill

    result = CliRunner().invoke(papermill, ["--help-notebook", str(notebook)])
    assert result.exit_code == 0, result.output
    return result.output


def test_every_stage_notebook_documents_typed_parameters():
    import papermill as pm

    from kit.pipeline import NOTEBOOKS_DIR, STAGES

    for s in STAGES:
        path = NOTEBOOKS_DIR / s.notebook
        declared = pm.inspect_notebook(str(path))
        assert "study" in declared and ("run" in declared or "out" in declared), s.name
        for name, p in declared.items():
            assert p["inferred_type_name"] in {"str", "int", "float", "bool"}, (s.name, name)
            assert len(p["help"]) > 10, (s.name, name)
        text = _help(path)
        for name, p in declared.items():
            assert f"  {name}: {p['inferred_type_name']} (default {p['default']})" in text
            assert p["help"][:30] in " ".join(text.split())


@pytest.mark.notebooks
def test_stage_notebooks_run_with_defaults_from_a_study_path_alone(tmp_path):
    import papermill as pm

    from kit.pipeline import NOTEBOOKS_DIR, STAGES

    study = write_study(tmp_path / "study")
    work = tmp_path / "work"
    work.mkdir()
    cwd = Path.cwd()
    os.chdir(work)  # runs/<study name> lands here
    try:
        for s in STAGES:
            pm.execute_notebook(
                str(NOTEBOOKS_DIR / s.notebook),
                str(tmp_path / f"out-{s.notebook}"),
                parameters={"study": str(study)},
                kernel_name="python3",
                progress_bar=False,
                cwd=str(work),
            )
    finally:
        os.chdir(cwd)
    run = work / "runs" / "tiny"
    assert (run / "manifest.json").is_file() and (run / "memo.html").is_file()
    assert (run / "tables" / "slice_table.parquet").is_file()
    assert (run / "tables" / "reliability.parquet").is_file()


# --------------------------------------------------------------------------- compkit new


def _eval_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


def test_compkit_new_writes_a_valid_study_and_prints_the_next_command(tmp_path, capsys):
    eval_file = _eval_file(tmp_path)
    target = tmp_path / "mine"
    code = main(
        [
            "new",
            "mine",
            "--eval-set",
            str(eval_file),
            "--baseline",
            "builtin:smollm2-135m-instruct",
            "--dir",
            str(target),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "study 'mine': valid" in printed
    assert f"compkit run {(target / 'study.yaml').as_posix()} --out runs/mine" in printed
    study = yaml.safe_load((target / "study.yaml").read_text())
    assert study["eval_set"]["path"] == "../eval.jsonl"
    assert study["baseline"] == {
        "name": "smollm2-135m-instruct",
        "runtime": "transformers",
        "model": "builtin:smollm2-135m-instruct",
    }
    assert study["candidates"][0]["recipe"] == "int8_dynamic"
    budget = (target / "budget.yaml").read_text()
    for rule in (
        "JSON parse failures must stay under 0.5 percent",
        "rare-label recall cannot drop by more than 1 point",
        "p95 first-token latency must stay below 400 ms",
        "fallback rate must stay under 10 percent",
    ):
        assert f"  # - rule: {rule}" in budget
    assert len(yaml.safe_load(budget)["rules"]) == 1
    assert main(["validate", str(target / "study.yaml")]) == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    capsys.readouterr()
    again = [
        "new",
        "mine",
        "--eval-set",
        str(eval_file),
        "--baseline",
        "builtin:smollm2-135m-instruct",
        "--dir",
        str(target),
    ]
    assert main(again) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_compkit_new_leaves_nothing_behind_on_bad_input(tmp_path, capsys):
    eval_file = _eval_file(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "input": "no task"}\n')
    cases = [
        (["--eval-set", str(bad), "--baseline", "builtin:smollm2-135m-instruct"], "missing 'task'"),
        (["--eval-set", str(eval_file), "--baseline", "missing-folder"], "no such file"),
        (["--eval-set", str(eval_file), "--baseline", "builtin:nope"], "unknown builtin"),
        (["--eval-set", str(tmp_path / "nope.jsonl"), "--baseline", "x"], "no such file"),
    ]
    for i, (args, message) in enumerate(cases):
        target = tmp_path / f"s{i}"
        assert main(["new", f"s{i}", *args, "--dir", str(target)]) == 2
        assert message in capsys.readouterr().err
        assert not target.exists()
    assert main(["new", "bad name", "--eval-set", str(eval_file), "--baseline", "x"]) == 2


def test_compkit_new_with_a_predictions_baseline_freezes(tmp_path):
    from kit.stages.freeze import freeze_baseline

    eval_file = _eval_file(tmp_path)
    preds = tmp_path / "base.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "output": "x"}) + "\n" for r in ITEMS))
    assert (
        main(
            [
                "new",
                "p",
                "--eval-set",
                str(eval_file),
                "--baseline",
                str(preds),
                "--dir",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    study = yaml.safe_load((tmp_path / "p" / "study.yaml").read_text())
    assert study["baseline"]["runtime"] == "predictions" and study["candidates"] == []
    manifest = freeze_baseline(
        tmp_path / "p" / "study.yaml", tmp_path / "runs" / "p", progress=False
    )
    assert manifest.outputs.items == len(ITEMS)
