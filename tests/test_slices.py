"""Slice tables, CI-aware worst slices and SliceLine-style discovery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kit.analysis.compare import RESULT_COLUMNS, item_flips
from kit.analysis.slices import default_slice_columns, discover_slices, slice_table, worst_slices
from kit.errors import CompkitError


def planted(n=3000, seed=0):
    """Items over language x channel; candidate flips 60% on de & email, 5% elsewhere."""
    rng = np.random.default_rng(seed)
    ids = [f"i{i:05d}" for i in range(n)]
    slices = pd.DataFrame(
        {
            "id": ids,
            "task": rng.choice(["classification", "multiple_choice"], n),
            "language": rng.choice(["de", "en", "fr"], n),
            "length_bucket": rng.choice(["<64", ">=64"], n),
            "label_rarity": None,
            "channel": rng.choice(["email", "chat", "phone"], n),
            "tier": rng.choice(["gold", "basic"], n),
            "prompt_tokens": rng.integers(5, 200, n),
            "label": None,
        }
    )
    hot = (slices["language"] == "de") & (slices["channel"] == "email")
    flip = rng.random(n) < np.where(hot, 0.6, 0.05)
    base = np.ones(n)
    frames = [
        pd.DataFrame(
            {
                "model": m,
                "item_id": ids,
                "repeat": 0,
                "task": slices["task"],
                "pred": np.where(v == 1, "right", "wrong"),
                "correct": v,
            }
        )
        for m, v in (("base", base), ("q4", np.where(flip, 0.0, 1.0)), ("q8", base.copy()))
    ]
    return pd.concat(frames, ignore_index=True), slices


def test_slice_table_shape_and_columns():
    outcomes, slices = planted()
    out = slice_table(outcomes, slices, baseline="base", n_resamples=200)
    assert list(out.columns) == RESULT_COLUMNS
    assert default_slice_columns(slices) == [
        "task",
        "language",
        "length_bucket",
        "label_rarity",
        "channel",
        "tier",
    ]
    values = out[out["model"] == "q4"].groupby("slice")["slice_value"].apply(set).to_dict()
    assert values == {
        "overall": {"all"},
        "task": {"classification", "multiple_choice"},
        "language": {"de", "en", "fr"},
        "length_bucket": {"<64", ">=64"},
        "channel": {"chat", "email", "phone"},
        "tier": {"basic", "gold"},
    }  # label_rarity is missing for every item: no rows
    assert len(out) == 2 * (1 + 2 + 3 + 2 + 3 + 2)
    de = out[(out["model"] == "q4") & (out["slice_value"] == "de")].iloc[0]
    n_de = int((slices["language"] == "de").sum())
    assert de["n"] == n_de
    q8 = out[out["model"] == "q8"]
    assert (q8["delta"] == 0).all() and (q8["p_value"] == 1).all()


def test_planted_drop_is_worst_slice():
    outcomes, slices = planted()
    out = slice_table(
        outcomes,
        slices,
        baseline="base",
        slice_columns=["language", "channel", "tier"],
        n_resamples=300,
    )
    worst = worst_slices(out, metric="accuracy", k=3)
    q4 = worst[worst["model"] == "q4"]
    assert set(q4["slice_value"].tolist()[:2]) == {"de", "email"}  # both hold the planted cell
    assert q4["clear_drop"].iloc[0] and q4["harm_bound"].iloc[0] == pytest.approx(
        -q4["ci_high"].iloc[0]
    )
    assert (
        len(worst[worst["model"] == "q8"]) == 3
        and not worst[worst["model"] == "q8"]["clear_drop"].any()
    )


def test_worst_slices_is_ci_aware_and_follows_direction():
    tab = pd.DataFrame(
        {
            "model": "q4",
            "slice": "channel",
            "slice_value": ["tiny", "big", "fine", "few"],
            "metric": "accuracy",
            "value": 0.0,
            "baseline_value": 0.0,
            "delta": [-0.20, -0.05, 0.01, -0.5],
            "ci_low": [-0.45, -0.07, -0.01, -0.9],
            "ci_high": [0.05, -0.03, 0.03, -0.2],
            "n": [40, 5000, 5000, 10],
            "p_value": 0.5,
        }
    )
    ranked = worst_slices(tab, metric="accuracy", min_n=30)
    # "big" is a clear (if smaller) drop; "tiny" might be no drop at all; "few" is below min_n
    assert ranked["slice_value"].tolist() == ["big", "fine", "tiny"]
    assert ranked["clear_drop"].tolist()[0] and "few" not in ranked["slice_value"].tolist()
    failures = tab.assign(
        metric="json_parse_failure",
        delta=[0.2, 0.05, -0.01, 0.5],
        ci_low=[-0.05, 0.03, -0.03, 0.2],
        ci_high=[0.45, 0.07, 0.01, 0.9],
    )
    ranked = worst_slices(failures, metric="json_parse_failure", min_n=30)
    assert ranked["slice_value"].iloc[0] == "big" and ranked["harm_bound"].iloc[0] == pytest.approx(
        0.03
    )


def test_discover_slices_finds_planted_conjunction():
    outcomes, slices = planted()
    flags = item_flips(outcomes, baseline="base", candidates="q4")
    found = discover_slices(
        flags,
        slices,
        columns=["language", "channel", "tier", "length_bucket"],
        max_order=3,
        min_support=0.02,
    )
    top = found.iloc[0]
    assert top["slice"] == "language=de & channel=email"
    assert top["order"] == 2 and top["flip_rate"] == pytest.approx(0.6, abs=0.06)
    assert top["lift"] > 4 and top["overall_flip_rate"] == pytest.approx(
        flags["flip"].eq("right_to_wrong").mean()
    )
    assert found["score"].is_monotonic_decreasing and (found["score"] > 0).all()
    assert found["support"].min() >= 0.02


def test_discover_slices_support_pruning_and_inputs():
    outcomes, slices = planted()
    flags = item_flips(outcomes, baseline="base", candidates="q4")
    big_only = discover_slices(flags, slices, columns=["language", "channel"], min_support=400)
    assert "language=de & channel=email" not in big_only["slice"].tolist()  # ~333 items
    assert (big_only["n"] >= 400).all()
    series = flags.set_index("item_id")["flip"].eq("right_to_wrong")
    same = discover_slices(series, slices, columns=["language", "channel"])
    assert same["slice"].iloc[0] == "language=de & channel=email"
    with pytest.raises(CompkitError, match="one model"):
        discover_slices(item_flips(outcomes, baseline="base"), slices, columns=["language"])
    none = discover_slices(
        item_flips(outcomes, baseline="base", candidates="q8"), slices, columns=["language"]
    )
    assert none.empty


def test_slice_table_reports_items_without_slices():
    outcomes, slices = planted(n=200)
    with pytest.raises(CompkitError, match="no row in the slices frame"):
        slice_table(outcomes, slices.iloc[10:], baseline="base", n_resamples=10)
    with pytest.raises(CompkitError, match="not in the slices frame"):
        slice_table(outcomes, slices, baseline="base", slice_columns=["colour"], n_resamples=10)
