"""Predictions runtime: a JSONL of outputs made elsewhere, validated and served by id."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from kit.errors import CompkitError, ValidationError
from kit.runtimes import open_runtime
from kit.runtimes.base import ChoiceRequest, GenerationRequest, Prompt, repeat_seed
from kit.runtimes.predictions import PredictedGeneration, PredictionsRuntime
from kit.study import ModelSpec, SamplingConfig

SAMPLING = SamplingConfig(seed=1234)
PROMPT = Prompt(text="unused")


def _spec(model: str = "preds.jsonl") -> ModelSpec:
    return ModelSpec(name="phone", runtime="predictions", model=model)


def _write(folder: Path, rows: list, name: str = "preds.jsonl") -> Path:
    path = folder / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _requests(ids: list[str], repeat: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest(i, PROMPT, repeat_seed(SAMPLING.seed, repeat)) for i in ids]


def _problems(exc: pytest.ExceptionInfo) -> list[str]:
    return [str(p) for p in exc.value.problems]


GOOD = [
    {
        "id": "q1",
        "output": "Paris",
        "confidence": 0.9,
        "latency_s": 0.5,
        "ttft_s": 0.1,
        "prompt_tokens": 12,
        "output_tokens": 3,
    },
    {"id": "q2", "output": "B", "choice_probs": [0.1, 0.7, 0.2]},
    {"id": 3, "output": "", "error": "timed out", "error_class": "timeout"},
]


def test_rows_come_back_in_request_order_with_every_field(tmp_path):
    _write(tmp_path, GOOD)
    rt = open_runtime(_spec(), base_dir=tmp_path)
    assert isinstance(rt, PredictionsRuntime)
    rt.expect_ids(["q2", "q1", "3"], repeats=1)
    calls: list[int] = []
    gens = rt.generate(_requests(["q2", "3", "q1"]), sampling=SAMPLING, progress=calls.append)
    assert [g.item_id for g in gens] == ["q2", "3", "q1"]
    assert calls == [3]
    q2, q3, q1 = gens
    assert isinstance(q1, PredictedGeneration)
    assert (
        q1.text,
        q1.confidence,
        q1.latency_s,
        q1.ttft_s,
        q1.prompt_tokens,
        q1.output_tokens,
    ) == ("Paris", 0.9, 0.5, 0.1, 12, 3)
    assert q1.error is None and q1.token_logprobs is None
    assert (q3.text, q3.error, q3.error_class) == ("", "timed out", "timeout")
    assert q2.confidence is None


def test_choice_probs_are_returned_as_logprobs(tmp_path):
    _write(tmp_path, GOOD)
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    assert rt.supports_choice_scoring
    [s] = rt.score_choices([ChoiceRequest("q2", PROMPT, ("A", "B", "C"))])
    assert s.logprobs == pytest.approx([math.log(0.1), math.log(0.7), math.log(0.2)])
    with pytest.raises(ValidationError) as err:
        rt.score_choices(
            [ChoiceRequest("q1", PROMPT, ("A", "B")), ChoiceRequest("q2", PROMPT, ("A", "B"))]
        )
    problems = _problems(err)
    assert "row 1, field 'choice_probs'" in problems[0] and "no choice_probs" in problems[0]
    assert "row 2, field 'choice_probs'" in problems[1] and "3 choice_probs" in problems[1]


def test_without_choice_probs_choices_are_not_scored(tmp_path):
    _write(tmp_path, [{"id": "a", "output": "x"}])
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    assert not rt.supports_choice_scoring
    with pytest.raises(CompkitError, match="no 'choice_probs'"):
        rt.score_choices([ChoiceRequest("a", PROMPT, ("A", "B"))])


def test_repeats_are_picked_by_the_seed_of_the_request(tmp_path):
    _write(
        tmp_path,
        [
            {"id": "a", "output": "zero"},
            {"id": "a", "output": "one", "repeat": 1},
            {"id": "b", "output": "b0", "repeat": 0},
            {"id": "b", "output": "b1", "repeat": 1},
        ],
    )
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    rt.expect_ids(["a", "b"], repeats=2)
    assert [g.text for g in rt.generate(_requests(["a", "b"], repeat=1), sampling=SAMPLING)] == [
        "one",
        "b1",
    ]
    assert [g.text for g in rt.generate(_requests(["b", "a"], repeat=0), sampling=SAMPLING)] == [
        "b0",
        "zero",
    ]
    with pytest.raises(CompkitError, match="not the seed of any repeat"):
        rt.generate([GenerationRequest("a", PROMPT, seed=7)], sampling=SAMPLING)


def test_a_single_repeat_file_serves_any_seed(tmp_path):
    _write(tmp_path, [{"id": "a", "output": "x"}])
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    assert rt.generate([GenerationRequest("a", PROMPT, seed=7)], sampling=SAMPLING)[0].text == "x"


def test_identity_and_fingerprint_hash_the_file(tmp_path):
    path = _write(tmp_path, GOOD)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    ident = rt.identity()
    assert (
        ident.weights_sha256
        == digest
        == PredictionsRuntime.weights_fingerprint(_spec(), base_dir=tmp_path)
    )
    assert ident.runtime_version == "predictions-file v1" and ident.files == {"preds.jsonl": digest}
    assert ident.extra["rows"] == 3


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CompkitError, match=str(tmp_path / "nope.jsonl")):
        PredictionsRuntime(_spec("nope.jsonl"), base_dir=tmp_path)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("bad_line", "row", "field", "message"),
    [
        ('{"id": "b", "output": ', 2, None, "invalid JSON"),
        ('["b", "x"]', 2, None, "must be a JSON object"),
        ({"output": "x"}, 2, "id", "missing 'id'"),
        ({"id": "b"}, 2, "output", "missing 'output'"),
        ({"id": "b", "output": 42}, 2, "output", "must be a string, got 42"),
        ({"id": ["b"], "output": "x"}, 2, "id", "non-empty string"),
        ({"id": "a", "output": "again"}, 2, "id", "duplicate id 'a' (first at row 1)"),
        ({"id": "b", "output": "x", "confidence": 1.5}, 2, "confidence", "from 0 to 1"),
        ({"id": "b", "output": "x", "confidence": True}, 2, "confidence", "from 0 to 1"),
        ({"id": "b", "output": "x", "latency_s": -1}, 2, "latency_s", ">= 0"),
        ({"id": "b", "output": "x", "output_tokens": 2.5}, 2, "output_tokens", "integer"),
        ({"id": "b", "output": "x", "repeat": "1"}, 2, "repeat", "integer >= 0"),
        ({"id": "b", "output": "x", "choice_probs": [0.5]}, 2, "choice_probs", "at least 2"),
        ({"id": "b", "output": "x", "choice_probs": "0.5,0.5"}, 2, "choice_probs", "list"),
        ({"id": "b", "output": "x", "error_class": "oops"}, 2, "error_class", "must be one of"),
        (
            {"id": "b", "output": "x", "confidance": 0.5},
            2,
            "confidance",
            "did you mean 'confidence'",
        ),
    ],
)
def test_each_bad_row_is_reported_with_file_row_and_field(tmp_path, bad_line, row, field, message):
    path = _write(tmp_path, [{"id": "a", "output": "fine"}, bad_line])
    with pytest.raises(ValidationError) as err:
        PredictionsRuntime(_spec(), base_dir=tmp_path)
    [problem] = err.value.problems
    assert (problem.source, problem.row, problem.field) == (str(path), row, field)
    assert message in problem.message
    text = str(err.value)
    assert (
        str(path) in text and f"row {row}" in text and (field is None or f"field '{field}'" in text)
    )


def test_all_problems_are_reported_at_once(tmp_path):
    _write(
        tmp_path,
        [
            "not json",
            {"id": "a"},
            {"output": "x"},
            {"id": "b", "output": "x", "repeat": 1},
            {"id": "b", "output": "y", "repeat": 1},
        ],
    )
    with pytest.raises(ValidationError) as err:
        PredictionsRuntime(_spec(), base_dir=tmp_path)
    assert [(p.row, p.field) for p in err.value.problems] == [
        (1, None),
        (2, "output"),
        (3, "id"),
        (5, "id"),
    ]
    assert "duplicate id 'b' with repeat 1 (first at row 4)" in err.value.problems[-1].message


def test_an_empty_file_is_an_error(tmp_path):
    _write(tmp_path, [])
    with pytest.raises(ValidationError, match="no rows"):
        PredictionsRuntime(_spec(), base_dir=tmp_path)


def test_missing_and_extra_ids_are_listed_with_counts(tmp_path):
    path = _write(
        tmp_path,
        [{"id": f"x{i}", "output": "o"} for i in range(25)] + [{"id": "keep", "output": "o"}],
    )
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    with pytest.raises(ValidationError) as err:
        rt.expect_ids(["keep", "m1", "m2"])
    missing, extra = err.value.problems
    assert missing.source == str(path) and missing.field == "id"
    assert "2 id(s) the run asks for have no prediction: 'm1', 'm2'" in missing.message
    assert extra.field == "id" and "25 id(s) are not in the eval set" in extra.message
    assert "'x0' (row 1)" in extra.message and "'x19' (row 20)" in extra.message
    assert "'x20'" not in extra.message and "... and 5 more" in extra.message
    assert str(path) in str(err.value)


def test_generate_lists_requested_ids_the_file_lacks(tmp_path):
    path = _write(tmp_path, [{"id": "a", "output": "o"}, {"id": "a", "output": "o", "repeat": 1}])
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    with pytest.raises(ValidationError) as err:
        rt.generate(_requests(["a", "b", "c"], repeat=1), sampling=SAMPLING)
    [problem] = err.value.problems
    assert problem.source == str(path) and problem.field == "id"
    assert "2 id(s) the run asks for have no prediction for repeat 1: 'b', 'c'" in problem.message


def test_repeats_beyond_the_run_are_extra(tmp_path):
    _write(tmp_path, [{"id": "a", "output": "o"}, {"id": "a", "output": "o", "repeat": 1}])
    rt = PredictionsRuntime(_spec(), base_dir=tmp_path)
    with pytest.raises(ValidationError) as err:
        rt.expect_ids(["a"], repeats=1)
    [problem] = err.value.problems
    assert problem.field == "repeat" and "'a' repeat 1 (row 2)" in problem.message
    with pytest.raises(ValidationError, match="no prediction for repeat 2: 'a'"):
        rt.expect_ids(["a"], repeats=3)
