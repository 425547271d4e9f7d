"""Chart functions: expected marks and encodings, data = the input frame's rows, SVG renders."""

from __future__ import annotations

import sys

import altair as alt
import numpy as np
import pandas as pd
import pytest

from kit.analysis.compare import FLIP_KINDS, RESULT_COLUMNS
from kit.analysis.slices import worst_slices
from kit.errors import CompkitError, DependencyMissing
from kit.report.charts import comparison as charts


def _row(model, slice_, value, metric, delta, low, high, n=40, base=0.8):
    return {
        "model": model,
        "slice": slice_,
        "slice_value": value,
        "metric": metric,
        "value": base + delta,
        "baseline_value": base,
        "delta": delta,
        "ci_low": low,
        "ci_high": high,
        "n": n,
        "value_ci_low": base + delta - 0.05,
        "value_ci_high": base + delta + 0.05,
        "rel": delta / base,
        "rel_ci_low": low / base,
        "rel_ci_high": high / base,
        "p_value": 0.04,
        "value_method": "clopper_pearson",
        "delta_method": "tango_cc",
        "rel_method": "tang_cc",
        "n_base_only": 3.0,
        "n_cand_only": 1.0,
        "confidence": 0.95,
        "note": "",
    }


@pytest.fixture
def table() -> pd.DataFrame:
    rows = [
        _row("q4", "overall", "all", "accuracy", -0.10, -0.15, -0.05, 200),
        _row("q8", "overall", "all", "accuracy", 0.00, -0.03, 0.03, 200),
        _row("q4", "overall", "all", "json_parse_failure", 0.05, 0.01, 0.09, 200, base=0.1),
        _row("q4", "language", "de", "accuracy", -0.30, -0.45, -0.15),
        _row("q4", "language", "en", "accuracy", -0.02, -0.08, 0.04),
        _row("q8", "language", "de", "accuracy", 0.01, -0.05, 0.07),
        _row("q8", "language", "en", "accuracy", 0.10, 0.02, 0.18),
        _row("q4", "channel", "email", "accuracy", -0.20, -0.30, -0.10),
    ]
    return pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)


@pytest.fixture
def flips() -> pd.DataFrame:
    rows = []
    for model, counts in (("q4", [12, 3, 2, 150, 33]), ("q8", [2, 2, 0, 160, 36])):
        for kind, count in zip(FLIP_KINDS, counts, strict=True):
            rows.append([model, "accuracy", "overall", "all", kind, count, 200, count / 200])
    rows.append(["q4", "accuracy", "language", "de", "right_to_wrong", 9, 40, 9 / 40])
    return pd.DataFrame(
        rows, columns=["model", "metric", "slice", "slice_value", "flip", "count", "n", "rate"]
    )


@pytest.fixture
def noise(table) -> pd.DataFrame:
    floor = table[table["slice"] == "overall"].iloc[:1].copy()
    floor[["model", "delta", "ci_low", "ci_high"]] = ["base", 0.005, -0.02, 0.03]
    floor.insert(1, "repeat", 1)
    return floor.assign(flip_rate=0.04, right_to_wrong_rate=0.02, wrong_to_right_rate=0.02)


def _datasets(spec: dict) -> list[pd.DataFrame]:
    return [pd.DataFrame(values) for values in spec.get("datasets", {}).values()]


def _same_rows(data: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Chart data equal the frame's rows: same columns, same values, nothing added."""
    expected = expected.reset_index(drop=True)
    assert list(data.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(data, expected, check_dtype=False)


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _marks(spec: dict) -> list[str]:
    marks = []
    for node in _walk(spec):
        mark = node.get("mark")
        if mark is not None:
            marks.append(mark if isinstance(mark, str) else mark["type"])
    return marks


def _computes_nothing(spec: dict) -> None:
    """Only display transforms: no aggregate, window, regression, ... in the spec."""
    for node in _walk(spec):
        for transform in node.get("transform", []):
            assert set(transform) <= {"calculate", "as"}, transform
        for channel in node.get("encoding", {}).values():
            if isinstance(channel, dict):
                assert "aggregate" not in channel, channel


def _renders(chart) -> None:
    import vl_convert as vlc

    svg = vlc.vegalite_to_svg(chart.to_json())
    assert svg.lstrip().startswith("<svg") and "</svg>" in svg


def test_delta_chart(table):
    chart = charts.delta_chart(table, metric="accuracy")
    assert isinstance(chart, alt.LayerChart)
    spec = chart.to_dict()
    assert _marks(spec) == ["rule", "point", "rule"]
    ci, point, zero = spec["layer"]
    assert (ci["encoding"]["x"]["field"], ci["encoding"]["x2"]["field"]) == ("ci_low", "ci_high")
    assert point["encoding"]["x"]["field"] == "delta" and point["encoding"]["y"]["field"] == "model"
    assert point["encoding"]["color"]["field"] == "status"
    assert zero["encoding"]["x"] == {"datum": 0}
    assert "higher is better" in ci["encoding"]["x"]["title"]
    (data,) = _datasets(spec)
    _same_rows(data, table[(table["metric"] == "accuracy") & (table["slice"] == "overall")])
    _computes_nothing(spec)
    _renders(chart)
    # a frame that already holds only those rows is drawn as is
    overall = table[(table["metric"] == "accuracy") & (table["slice"] == "overall")]
    (data,) = _datasets(charts.delta_chart(overall, metric="accuracy").to_dict())
    _same_rows(data, overall)


def test_direction_comes_from_the_registry(table):
    spec = charts.delta_chart(table, metric="json_parse_failure").to_dict()
    assert "lower is better" in spec["layer"][0]["encoding"]["x"]["title"]
    status = next(t["calculate"] for t in spec["transform"] if t["as"] == "status")
    assert status.startswith("datum.ci_high < 0 ? 'clear gain'")  # a drop in failures is a gain


def test_slice_delta_chart(table):
    chart = charts.slice_delta_chart(table, metric="accuracy", slice="language")
    spec = chart.to_dict()
    assert _marks(spec) == ["rule", "point", "rule"]
    point = spec["layer"][1]["encoding"]
    assert point["y"]["field"] == "slice_value" and point["yOffset"]["field"] == "model"
    assert point["color"]["field"] == "status"
    assert point["color"]["scale"]["domain"] == ["clear drop", "clear gain", "CI includes 0"]
    assert "n" in [t["field"] for t in point["tooltip"]]
    (data,) = _datasets(spec)
    _same_rows(data, table[(table["metric"] == "accuracy") & (table["slice"] == "language")])
    _computes_nothing(spec)
    _renders(chart)
    one = table[(table["model"] == "q4") & (table["slice"] == "language")]
    single = charts.slice_delta_chart(one, metric="accuracy", slice="language").to_dict()
    assert "yOffset" not in single["layer"][1]["encoding"]  # one model: no offset, no shape
    with pytest.raises(CompkitError, match="no rows with metric='accuracy', slice='tier'"):
        charts.slice_delta_chart(table, metric="accuracy", slice="tier")


def test_slice_overview_chart(table):
    chart = charts.slice_overview_chart(table, metric="accuracy")
    assert isinstance(chart, alt.VConcatChart)
    spec = chart.to_dict()
    assert len(spec["vconcat"]) == 2  # language, channel
    _computes_nothing(spec)
    _renders(chart)


def test_flip_chart(flips):
    chart = charts.flip_chart(flips)
    assert isinstance(chart, alt.Chart)
    spec = chart.to_dict()
    assert _marks(spec) == ["bar"]
    enc = spec["encoding"]
    assert (enc["x"]["field"], enc["x"]["stack"], enc["y"]["field"]) == ("rate", "zero", "model")
    assert enc["color"]["field"] == "flip"
    assert enc["color"]["scale"]["domain"] == list(charts.CHANGED_FLIPS)
    (data,) = _datasets(spec)
    expected = flips[(flips["slice"] == "overall") & flips["flip"].isin(charts.CHANGED_FLIPS)]
    _same_rows(data, expected)
    _computes_nothing(spec)
    _renders(chart)
    every = charts.flip_chart(flips, kinds=FLIP_KINDS).to_dict()
    assert len(_datasets(every)[0]) == 10
    de = charts.flip_chart(flips, slice="language", slice_value="de").to_dict()
    assert _datasets(de)[0]["count"].tolist() == [9]


def test_worst_slices_chart(table):
    worst = worst_slices(table, metric="accuracy", k=3, min_n=10)
    chart = charts.worst_slices_chart(worst)
    spec = chart.to_dict()
    assert _marks(spec) == ["rule", "point", "rule"]
    point = spec["layer"][1]["encoding"]
    assert point["y"]["field"] == "label" and point["y"]["sort"] is None  # worst first, as given
    (data,) = _datasets(spec)
    _same_rows(data, worst)
    _computes_nothing(spec)
    _renders(chart)
    empty = charts.worst_slices_chart(worst.iloc[:0])
    assert _marks(empty.to_dict()) == ["text"]
    _renders(empty)
    with pytest.raises(CompkitError, match="one metric"):
        charts.worst_slices_chart(pd.concat([worst, worst.assign(metric="chrf")]))


def test_noise_floor_overlay(table, noise):
    chart = charts.noise_floor_overlay(table, noise, metric="accuracy")
    spec = chart.to_dict()
    assert _marks(spec) == ["rule", "point", "rule", "point", "rule"]
    candidates, floor = _datasets(spec)
    _same_rows(candidates, table[(table["metric"] == "accuracy") & (table["slice"] == "overall")])
    _same_rows(floor, noise)
    _computes_nothing(spec)
    _renders(chart)
    alone = charts.noise_floor_overlay(table, noise.iloc[:0], metric="accuracy")
    assert "one repeat" in alone.to_dict()["title"]
    _renders(alone)


def test_charts_reject_frames_of_another_shape(table):
    with pytest.raises(CompkitError, match=r"needs column\(s\) \['ci_low'"):
        charts.delta_chart(table.drop(columns=["ci_low"]), metric="accuracy")
    with pytest.raises(CompkitError, match=r"unknown metric .bogus."):
        charts.delta_chart(table.assign(metric="bogus"), metric="bogus")


def test_missing_altair_names_the_dependency(monkeypatch, table):
    monkeypatch.setitem(sys.modules, "altair", None)
    with pytest.raises(DependencyMissing, match="'altair'"):
        charts.delta_chart(table, metric="accuracy")


def test_chart_data_keep_nan_cis():
    frame = pd.DataFrame(
        [_row("q4", "overall", "all", "accuracy", 0.0, np.nan, np.nan, 1)], columns=RESULT_COLUMNS
    )
    chart = charts.delta_chart(frame, metric="accuracy")
    (data,) = _datasets(chart.to_dict())
    assert data["ci_low"].isna().all()
    _renders(chart)
