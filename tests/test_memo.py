"""Verdicts and the HTML decision memo: escaping, the budget banner, inline SVG charts, and a
headless Chromium check that the memo renders offline and that no payload executes.

The run is the tiny predictions study of ``test_pipeline`` built in process (no papermill),
with hostile strings planted where a memo shows data: an eval input, candidate outputs,
a slice value (drawn inside the charts), a rule's text and its ``why``.
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline import BUDGET, CANDIDATES, EXPECTED, ITEMS, build_judged_run

from kit.errors import CompkitError
from kit.report.memo import format_ci, format_number, inline_svg, write_memo
from kit.verdicts import (
    EVIDENCE_COLUMNS,
    VerdictReport,
    gate_decision,
    gather_evidence,
    judge_run,
)

SCRIPT = "<script>document.title='PWNED'</script>"
IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
ALERT = "<script>alert(1)</script>"
PAYLOADS = (SCRIPT, IMG, ALERT)
CHROMIUM = Path("/usr/bin/chromium")


def hostile_study() -> dict:
    items = [dict(item) for item in ITEMS]
    for item in items:
        if item["id"].startswith("g1-"):
            item["input"] = f"Apologise for the delay. {SCRIPT}"
        if item["channel"] == "email":
            item["channel"] = f"email {IMG}"
    candidates = dict(CANDIDATES)
    worse = {"c1": IMG, "m1": "A", "g1": f"No. {ALERT} {SCRIPT}"}
    candidates["worse"] = (
        {f"{t}-{k:02d}": v for t, v in worse.items() for k in range(30)},
        CANDIDATES["worse"][1],
    )
    rule = {
        "rule": f"<b>accuracy</b> may drop at most 5 points {ALERT}",
        "why": f"because {IMG}",
        "metric": "accuracy",
        "bound": {"change": "points", "op": ">=", "limit": -0.05},
    }
    return {
        "description": f"Support study {SCRIPT} {IMG}",
        "items": items,
        "candidates": candidates,
        "budget": {"rules": [*BUDGET["rules"], rule]},
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_judged_run(tmp_path_factory.mktemp("memo"), **hostile_study())


@pytest.fixture(scope="module")
def memo(run_dir) -> str:
    return write_memo(run_dir).read_text(encoding="utf-8")


class _Tags(html.parser.HTMLParser):
    """Every start tag with its attributes (the parser decodes entities in attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


# --------------------------------------------------------------------------- verdicts


def test_judge_run_decides_each_candidate_from_the_frozen_budget(run_dir):
    report = VerdictReport.load(run_dir)
    decisions = report.decisions_frame().set_index("candidate")["decision"].to_dict()
    assert decisions == EXPECTED
    worse = next(d for d in report.decisions if d.candidate == "worse")
    assert "accuracy cannot drop by more than 5 points" in worse.failing_rules
    assert report.budget.changed is False
    assert set(report.hashes) >= {"manifest.json", "eval_set", "prompt_template", "budget"}
    assert report.kit is not None and report.kit.version
    table = pd.read_parquet(run_dir / "tables" / "verdicts.parquet")
    pd.testing.assert_frame_equal(
        table.reset_index(drop=True), report.verdicts_frame(), check_dtype=False
    )


def test_evidence_has_every_stage_source_and_absent_stages_are_not_measured(run_dir, tmp_path):
    evidence = gather_evidence(run_dir)
    assert list(evidence.columns) == EVIDENCE_COLUMNS
    assert set(evidence["source"]) == {
        "slice_table",
        "flip_evidence",
        "label_evidence",
        "calibration_comparison",
    }
    assert not evidence.duplicated(["model", "metric", "slice", "slice_value"]).any()
    # the same run without its calibration table: the ECE rule becomes "not measured"
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "tables" / "calibration_comparison.parquet").unlink()
    verdicts, decisions, _ = judge_run(copy, write=False)
    ece = verdicts[verdicts["metric"] == "ece"]
    assert set(ece["verdict"]) == {"not measured"}
    assert "calibration stage" in ece["reason"].iloc[0]
    fixer = decisions.set_index("candidate").loc["fixer", "decision"]
    assert fixer == "inconclusive"  # accepted with the table; never silently passed without it


def test_gate_decision_over_all_candidates():
    frame = pd.DataFrame({"candidate": ["a", "b"], "decision": ["accepted", "inconclusive"]})
    assert gate_decision(frame) == "inconclusive"
    assert gate_decision(frame, candidate="a") == "accepted"
    frame.loc[1, "decision"] = "rejected"
    assert gate_decision(frame) == "rejected"
    with pytest.raises(CompkitError, match="candidates: \\['a', 'b'\\]"):
        gate_decision(frame, candidate="zzz")


# --------------------------------------------------------------------------- memo HTML


def test_memo_escapes_every_payload(memo):
    for payload in PAYLOADS:
        assert payload not in memo
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in memo  # shown, as text
    assert "&lt;img src=x onerror=" in memo
    found = tags(memo)
    names = {name for name, _ in found}
    assert "script" not in names and "img" not in names
    handlers = [(n, a) for n, attrs in found for a in attrs if a.startswith("on")]
    assert handlers == []
    description = memo[memo.index('class="sub study-description"') :].split("</p>", 1)[0]
    assert "Support study &lt;script&gt;" in description  # the study's own description, as text


def test_memo_puts_decisions_first_and_quotes_rules(memo):
    decisions = memo.index('id="decisions"')
    assert decisions < memo.index('id="rules"') < memo.index('id="evidence"')
    for candidate, decision in EXPECTED.items():
        assert f'class="card d-{decision}"' in memo
        assert f"<h3>{candidate}</h3>" in memo
    assert "accuracy cannot drop by more than 5 points" in memo
    assert "wrong intents misroute tickets" in memo  # the rule's why


def test_memo_charts_are_inline_svg_and_nothing_is_fetched(memo):
    assert memo.count("<svg") >= 5
    assert "chart not drawn" not in memo
    found = tags(memo)
    assert not [n for n, _ in found if n in ("script", "link", "iframe", "object", "embed")]
    for name, attrs in found:
        for key in ("src", "href", "xlink:href"):
            value = attrs.get(key)
            assert value is None or value.startswith("#"), (name, key, value)
    lowered = memo.lower()
    assert "@import" not in lowered and "url(http" not in lowered
    assert 'src="http' not in lowered and "src='http" not in lowered


def test_memo_shows_failing_examples_baseline_facts_and_caveats(memo):
    examples = memo[memo.index('id="examples"') : memo.index('id="caveats"')]
    assert "&lt;img src=x onerror=" in examples  # worse's output on c1, shown as text
    assert "order_status" in examples  # ... next to the baseline's
    for fact in ("weights sha256", "prompt template", "sampling", "eval set", "hardware"):
        assert f"<th>{fact}</th>" in memo
    assert "noise floor was not" in memo  # one repeat
    undecided = memo[memo.index('id="caveats"') : memo.index('id="baseline"')]
    assert "edge" in undecided and "straddles the limit" in undecided
    assert "interval method" in memo and "Tango&#39;s paired score interval" in memo
    assert "intersection-union test" in memo
    assert 'id="budget-changed"' not in memo


def test_budget_edited_after_freezing_shows_a_banner_and_keeps_the_frozen_rules(tmp_path, capsys):
    run = build_judged_run(tmp_path)
    budget_file = tmp_path / "study" / "budget.yaml"
    edited = {"rules": [{"rule": "accuracy cannot drop by more than 90 points", "why": IMG}]}
    budget_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    verdicts, _, status = judge_run(run)
    assert status.changed
    assert set(verdicts["rule"]) == {r["rule"] for r in BUDGET["rules"]}  # the frozen copy
    text = write_memo(run).read_text(encoding="utf-8")
    banner = text[text.index('id="budget-changed"') : text.index('id="decisions"')]
    assert "changed after the baseline was frozen" in banner
    assert "use the frozen copy" in banner
    assert "+- rule: accuracy cannot drop by more than 90 points" in banner  # the diff
    assert IMG not in text and "&lt;img src=x onerror=" in banner
    from kit.cli import main

    capsys.readouterr()
    assert main(["gate", str(run), "--candidate", "fixer"]) == 0  # judged by the frozen rules
    printed = capsys.readouterr().out
    assert "BUDGET CHANGED AFTER FREEZING" in printed
    assert "+- rule: accuracy cannot drop by more than 90 points" in printed


def test_inline_svg_refuses_active_content_and_prefixes_ids():
    ok = (
        '<svg xmlns="http://www.w3.org/2000/svg"><defs><clipPath id="clip1"><rect/></clipPath>'
        '</defs><g clip-path="url(#clip1)"><text>a &lt;b&gt;</text></g></svg>'
    )
    out = str(inline_svg(ok, prefix="f1-"))
    assert 'id="f1-clip1"' in out and "url(#f1-clip1)" in out
    bad = [
        '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>',
        '<svg xmlns="http://www.w3.org/2000/svg"><foreignObject><div/></foreignObject></svg>',
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
        '<a xlink:href="javascript:alert(1)"><text>x</text></a></svg>',
        '<svg xmlns="http://www.w3.org/2000/svg"><rect fill="url(http://x/y#z)"/></svg>',
        "<div>not svg</div>",
    ]
    for svg in bad:
        with pytest.raises(CompkitError):
            inline_svg(svg, prefix="x-")


def test_number_formats_follow_the_unit_and_quantity():
    assert format_number(0.125, unit="share") == "12.5%"
    assert format_number(-0.0375, unit="share", quantity="change") == "-3.8 points"
    assert format_number(0.02, unit="share", quantity="relative change") == "+2.0%"
    assert format_number(0.0412, unit="score") == "0.041"
    assert format_number(380.0, unit="ms") == "380 ms"
    assert format_number(float("nan"), unit="share") == "–"
    assert format_ci(-0.1, 0.05, unit="share", quantity="change") == "-10.0 points to +5.0 points"


# --------------------------------------------------------------------------- Chromium


def _chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(
            "the memo's browser test needs Chromium at /usr/bin/chromium: install it with "
            "`make browser` (as root: apt-get install -y --no-install-recommends chromium)"
        )
    pytest.skip("Chromium is not installed (/usr/bin/chromium); `make browser` installs it")


def test_missing_chromium_fails_on_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(f"{__name__}.CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make browser"):
        _chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _chromium()


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) with zlib: width, height, pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, rows, i = bytearray(stride), [], 0
    for _ in range(height):
        kind, line = raw[i], bytearray(raw[i + 1 : i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 255
        rows.append(bytes(line))
        prev = line
    pixels = [tuple(row[x : x + 3]) for row in rows for x in range(0, stride, bpp)]
    return width, height, pixels


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        import websocket

        self.ws.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def open_in_chromium(page: Path, profile: Path) -> dict:
    """Load ``page`` from file:// in headless Chromium; the DOM facts, errors and a chart's pixels."""
    import httpx

    browser = subprocess.Popen(
        [
            str(_chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1280,1600",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert browser.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        tab = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.call("Page.navigate", url=page.resolve().as_uri())
        tab.wait_for("Page.loadEventFired")
        tab.drain(1.0)
        facts = tab.evaluate(
            """JSON.stringify({
              title: document.title,
              pwned: document.body.getAttribute('data-pwned'),
              scripts: document.scripts.length,
              images: document.images.length,
              svgs: [...document.querySelectorAll('figure svg')].filter(s => {
                const r = s.getBoundingClientRect(); return r.width > 100 && r.height > 50;
              }).length,
              chart: (() => {
                const svg = document.querySelector('#fig-flips svg');
                if (!svg) return null;
                const r = svg.getBoundingClientRect();
                return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height};
              })(),
            })"""
        )
        facts = json.loads(facts)
        facts["png"] = None
        if facts["chart"]:
            clip = {**facts["chart"], "scale": 1}
            shot = tab.call(
                "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
            )
            facts["png"] = base64.b64decode(shot["data"])
        facts["errors"] = [
            e
            for e in tab.events
            if e.get("method") in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
            or (
                e.get("method") == "Runtime.consoleAPICalled"
                and e["params"]["type"] in ("error", "assert")
            )
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]
        return facts
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()


def test_memo_opens_offline_in_chromium_with_charts_drawn_and_no_payload_run(
    run_dir, memo, tmp_path
):
    pytest.importorskip("websocket", reason="websocket-client (a jupyterlab dependency)")
    facts = open_in_chromium(run_dir / "memo.html", tmp_path / "profile")
    assert facts["errors"] == []
    assert facts["title"] == "Decision memo · tiny"  # the planted script did not retitle it
    assert facts["pwned"] is None  # the planted onerror handler did not run
    assert facts["scripts"] == 0 and facts["images"] == 0
    assert facts["svgs"] >= 5
    width, height, pixels = png_pixels(facts["png"])
    assert width > 100 and height > 50
    colours = set(pixels)
    inked = sum(1 for p in pixels if p != (255, 255, 255))
    assert len(colours) > 20, "the chart's screenshot is blank"
    assert inked / len(pixels) > 0.02
    # the flips chart draws right->wrong in red (#d62728)
    assert any(r > 180 and g < 80 and b < 80 for r, g, b in colours)


def test_the_browser_check_catches_a_payload_that_runs(tmp_path):
    """The same check on a page that does NOT escape: it must see the payloads run."""
    pytest.importorskip("websocket", reason="websocket-client (a jupyterlab dependency)")
    page = tmp_path / "unsafe.html"
    page.write_text(
        f"<!DOCTYPE html><html><head><title>safe</title></head><body><p>{SCRIPT}</p>"
        f"<p>{IMG}</p><script>console.error('broken')</script></body></html>"
    )
    facts = open_in_chromium(page, tmp_path / "profile")
    assert facts["title"] == "PWNED"
    assert facts["pwned"] == "1"
    assert any(e.get("method") == "Runtime.consoleAPICalled" for e in facts["errors"])
