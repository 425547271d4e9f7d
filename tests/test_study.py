"""Study YAML validation: errors name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kit.errors import CompkitError, ValidationError
from kit.study import load_study


def write_study(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "eval.jsonl").write_text(
        '{"id": "a", "task": "generation", "input": "x", "reference": "y"}\n'
    )
    (tmp_path / "t.jinja").write_text("{{ input }}")
    data = {
        "name": "s1",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "t.jinja"},
        "baseline": {
            "name": "base",
            "runtime": "transformers",
            "model": "builtin:smollm2-135m-instruct",
        },
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_study_gets_defaults_and_resolves_paths(tmp_path):
    study = load_study(write_study(tmp_path))
    assert study.sampling.temperature == 0.0 and study.sampling.greedy
    assert study.repeats == 1 and study.candidates == []
    assert study.resolve(study.eval_set.path) == tmp_path / "eval.jsonl"
    assert study.model("base").runtime == "transformers"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {"sampling": {"temperature": -1}},
            "field 'sampling.temperature': Input should be greater than or equal to 0",
        ),
        ({"sampling": {"temprature": 0.5}}, "field 'sampling.temprature': unknown key (typo?)"),
        ({"repeats": 0}, "field 'repeats'"),
        ({"baseline": None}, "field 'baseline': Field required"),
        (
            {"candidates": [{"name": "base", "runtime": "transformers", "model": "m"}]},
            "model names must be unique",
        ),
        (
            {
                "candidates": [
                    {"name": "c", "runtime": "transformers", "model": "m", "base": "nope"}
                ]
            },
            "base 'nope' is not a model of this study",
        ),
        ({"eval_set": {"path": "missing.jsonl"}}, "field 'eval_set.path': file not found"),
        ({"budget": "budget.yaml"}, "field 'budget': file not found"),
        ({"name": "has spaces"}, "field 'name'"),
    ],
)
def test_bad_study_names_the_key(tmp_path, override, expected):
    path = write_study(tmp_path, **override)
    with pytest.raises(ValidationError) as err:
        load_study(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_recipe_shorthand_and_fingerprint(tmp_path):
    path = write_study(
        tmp_path,
        candidates=[
            {"name": "q", "runtime": "transformers", "model": "m", "recipe": "int8_dynamic"}
        ],
    )
    study = load_study(path)
    cand = study.model("q")
    assert cand.recipe.name == "int8_dynamic" and cand.recipe.params == {}
    assert cand.fingerprint() != study.baseline.fingerprint()
    assert study.baseline.fingerprint() == load_study(path).baseline.fingerprint()


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(CompkitError, match="not valid YAML"):
        load_study(path)
    path.write_text("- a list")
    with pytest.raises(CompkitError, match="top level must be a mapping"):
        load_study(path)
    with pytest.raises(CompkitError, match="no such file"):
        load_study(tmp_path / "nope.yaml")


def test_unknown_runtime_names_the_key_and_a_close_match(tmp_path):
    from kit.runtimes import check_study_runtimes

    path = write_study(tmp_path, baseline={"name": "b", "runtime": "transformer", "model": "m"})
    with pytest.raises(ValidationError) as err:
        check_study_runtimes(load_study(path))
    text = str(err.value)
    assert "field 'baseline.runtime'" in text
    assert "unknown runtime 'transformer' (did you mean 'transformers'?)" in text
