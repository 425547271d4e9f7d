"""The Jupyter experience in a real browser (marker ``browser``, part of ``make test``).

1. The HTML exports of a piped run open offline in headless Chromium: every chart is drawn
   (SVG images that decoded), no error text, no script at all, no request leaves the page,
   and none of the hostile strings planted in eval inputs, outputs and slice values runs.
2. JupyterLab (started here on 127.0.0.1) opens notebook 03, runs it, draws the charts as
   offline Vega widgets, and the explorer answers a dropdown change, a click on a slice of
   its chart, a flip filter, a text search, a discovered slice and a click on a reliability
   bin - each asserted on the page.

Both run on one tiny predictions study whose texts carry injection payloads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from browser import ERROR_TEXTS, chromium, jupyterlab, require_browser, watch
from playwright.sync_api import expect
from test_pipeline import BUDGET, CANDIDATES, TEMPLATES, _expand, write_study

from kit.cli import main

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "</script><script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
SVG = "<svg onload=alert(1)>"
CDN = re.compile(r"cdn\.jsdelivr|unpkg\.com|cdnjs\.cloudflare")


def hostile_study(folder: Path) -> Path:
    """The eight item templates once (ids ``c1-00`` ...), with payloads planted."""
    items = _expand(TEMPLATES, copies=1)
    for item in items:
        if item["id"] == "g1-00":
            item["input"] = f"Apologise for the delay. {SCRIPT} {SVG}"
        if item["id"] == "c1-00":
            item["input"] = f"where is my parcel {IMG}"
        if item["channel"] == "email":
            item["channel"] = f"email {IMG}"
        else:
            item["channel"] = f"chat {SVG}"
    candidates = dict(CANDIDATES)
    candidates["worse"] = (
        {"c1-00": f"refund {IMG}", "m1-00": "A", "g1-00": f"No. {SCRIPT}"},
        {"c1-00": [0.1, 0.2, 0.7], "m1-00": [0.7, 0.3]},
    )
    return write_study(folder, items=items, candidates=candidates, budget=BUDGET)


@pytest.fixture(scope="module")
def piped(tmp_path_factory) -> Path:
    require_browser()
    root = tmp_path_factory.mktemp("browser")
    study = hostile_study(root / "study")
    out = root / "runs" / "tiny"
    assert main(["run", str(study), "--out", str(out), "--quiet"]) == 0
    return out


# --------------------------------------------------------------------------- exports


CHARTS = {"03_slice_drilldown": 5, "04_calibration": 5}


def test_exports_draw_every_chart_offline_and_run_no_payload(piped, tmp_path):
    exports = sorted((piped / "notebooks").glob("*.html"))
    assert [p.stem for p in exports] == [
        "01_freeze_baseline",
        "02_run_candidates",
        "03_slice_drilldown",
        "04_calibration",
        "04b_robustness",
        "05_serving",
        "06_routing",
        "07_acceptance_memo",
    ]
    with chromium() as browser:
        for export in exports:
            text = export.read_text(encoding="utf-8")
            assert not CDN.search(text), f"{export.name} names a CDN"
            assert "<script" not in text.lower(), f"{export.name} holds a script"
            page = browser.new_page()
            log = watch(page)
            page.goto(export.as_uri())
            page.wait_for_load_state("load")
            facts = page.evaluate(
                """() => ({
                  title: document.title,
                  body: document.body.innerText,
                  charts: [...document.images].filter(i => i.src.startsWith('data:image/svg+xml')
                      && i.complete && i.naturalWidth > 100 && i.naturalHeight > 40).length,
                  broken: [...document.images].filter(i => i.complete && i.naturalWidth === 0).length,
                })"""
            )
            page.close()
            assert log.dialogs == [] and log.page_errors == [], export.name
            assert log.console_errors == [] and log.blocked == [], export.name
            assert facts["broken"] == 0, export.name
            assert facts["charts"] >= CHARTS.get(export.stem, 0), (export.name, facts["charts"])
            for error in ERROR_TEXTS:
                assert error not in facts["body"], (export.name, error)
            assert facts["title"] == export.stem
    drilldown = (piped / "notebooks" / "03_slice_drilldown.html").read_text(encoding="utf-8")
    assert "&lt;img src=x onerror=alert(1)&gt;" in drilldown  # shown as text, escaped
    assert "\\n\\n" not in drilldown


# --------------------------------------------------------------------------- JupyterLab


def _lab_notebook(run: Path, folder: Path) -> str:
    """Notebook 03 with its parameters pointing at ``run`` (what a user edits first)."""
    nb = nbformat.read(ROOT / "notebooks" / "03_slice_drilldown.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = (
        f"run: str = {json.dumps(str(run))}\nstudy: str = ''\nmetric: str = 'accuracy'\n"
        "n_resamples: int = 200\nseed: int = 0\nmin_n: int = 1\nk: int = 10\n"
        "interactive: str = 'auto'"
    )
    nbformat.write(nb, folder / "drilldown.ipynb")
    return "drilldown.ipynb"


def _status(page) -> str:
    return page.locator(".ck-status").inner_text()


def _wait_status(page, needle: str, timeout: float = 30_000) -> str:
    page.wait_for_function(
        "n => [...document.querySelectorAll('.ck-status')].some(e => e.innerText.includes(n))",
        arg=needle,
        timeout=timeout,
    )
    return _status(page)


def _run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def test_jupyterlab_runs_the_drilldown_and_the_explorer_answers_clicks(piped, tmp_path):
    lab_root = tmp_path / "lab"
    lab_root.mkdir()
    name = _lab_notebook(piped, lab_root)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with jupyterlab(lab_root, env=env) as lab, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        log = watch(page, allow_host=lab.url.removeprefix("http://"))
        page.goto(lab.notebook_url(name))
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        # the status bar reads "Python 3 (ipykernel) | Idle" once the kernel is connected
        page.wait_for_function(
            "document.body.innerText.includes('(ipykernel) | Idle')", timeout=120_000
        )
        _run_all(page)
        first = _wait_status(page, "of edge on accuracy", timeout=150_000)  # first by name
        assert first.startswith("8 of 8 items")
        page.wait_for_function(
            "document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length >= 7",
            timeout=60_000,
        )
        body = page.locator("body").inner_text()
        for error in ERROR_TEXTS:
            assert error not in body

        explorer = page.locator(".jp-OutputArea-output", has=page.locator(".ck-status")).last
        dropdowns = explorer.locator(".widget-dropdown select")
        dropdowns.nth(0).select_option("worse")  # candidate
        _wait_status(page, "of worse on accuracy")
        dropdowns.nth(2).select_option(label="channel")  # slice column
        chart = explorer.locator(".vega-embed").first
        point = chart.locator(".mark-symbol path[aria-label*='email']").first
        point.wait_for(timeout=30_000)
        point.click(force=True)
        picked = _wait_status(page, "slice channel=email")
        assert picked.startswith("4 of 8 items")
        rows = explorer.locator(".ck-items tbody tr")
        expect(rows).to_have_count(4)  # the table redraws just after the status line
        explorer.locator(".widget-toggle-button", has_text="right → wrong").click()
        assert _wait_status(page, "right → wrong").startswith("3 of 8 items")
        expect(rows).to_have_count(3)
        search = explorer.locator(".widget-text input")
        search.fill("delay")
        search.press("Enter")
        assert _wait_status(page, "containing").startswith("1 of 8 items")
        expect(rows).to_have_count(1)
        cells = rows.first.locator("td")
        assert "No. </script><script>alert(1)</script>" in cells.nth(5).inner_text()
        box = rows.first.bounding_box()
        table = explorer.locator(".ck-items").bounding_box()
        assert box["width"] <= table["width"] + 1  # the candidate output column is on screen

        explorer.locator(".widget-button", has_text="clear selection").click()
        search.fill("")
        search.press("Enter")
        explorer.locator(".widget-toggle-button", has_text="all").first.click()
        explorer.locator(".lm-TabBar-tab", has_text="Discovered slices").click()
        explorer.locator(".widget-select select").select_option(index=0)
        assert "slice task=" in _wait_status(page, "slice ")

        explorer.locator(".lm-TabBar-tab", has_text="Calibration").click()
        bins = explorer.locator(".vega-embed").nth(1).locator(".mark-symbol path")
        bins.first.wait_for(timeout=30_000)
        bins.first.click(force=True)
        _wait_status(page, "confidence in (")

        page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
        assert log.dialogs == [], log.dialogs  # no planted payload ran
        assert log.page_errors == [], log.page_errors
        assert [u for u in log.blocked if not u.startswith("ws:")] == [], log.blocked


def test_a_missing_browser_fails_on_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    import browser

    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make browser"):
        browser.require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        browser.require_browser()
