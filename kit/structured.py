"""Structured output as deployed: the JSON schema a task's answer must follow.

A study asks for constrained decoding per task (``tasks: {extraction: {structured_output:
json_schema}}``). The schema is derived from what the eval set declares, never from an
item's answer:

``extraction``
    an object with exactly the item's field names, each a JSON value of the types that field
    takes anywhere in the eval set, or ``null`` (a field absent from the text is ``null``).
``tool_call``
    ``{"tool": <one of the item's tool names>, "arguments": <that tool's parameters>}``
    (``anyOf`` over the item's tools).

Each runtime enforces the schema the way production does: llama.cpp with its JSON-schema
grammar (GBNF), OpenAI-compatible servers with ``response_format``, transformers with the
``llguidance`` logits processor (a Rust grammar engine with CPU wheels and no dependencies).

Example
-------
>>> from kit.evalset import EvalItem
>>> item = EvalItem(id="x", task="extraction", input="Table for 2", fields={"people": "2"})
>>> json_schema_for(item, field_types={"people": ["string"]})["properties"]["people"]
{'type': ['string', 'null']}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet

StructuredOutput = Literal["none", "json_schema"]
#: Tasks whose answer is a JSON object a schema can describe.
SCHEMA_TASKS = ("extraction", "tool_call")

_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))


def field_types(eval_set: EvalSet) -> dict[str, list[str]]:
    """Extraction field -> the JSON types its non-null reference values take in the set.

    A field that is ``null`` everywhere gets ``["string"]``; an integer field that also
    holds decimals is ``number``.
    """
    seen: dict[str, set[str]] = {}
    for item in eval_set.items:
        for name, value in (item.fields or {}).items():
            kinds = seen.setdefault(name, set())
            if value is not None:
                kinds.add(_json_type(value))
    out = {}
    for name, kinds in seen.items():
        if {"integer", "number"} <= kinds:
            kinds.discard("integer")
        out[name] = sorted(kinds) or ["string"]
    return out


def _json_type(value: Any) -> str:
    for cls, name in _JSON_TYPES:
        if isinstance(value, cls):
            return name
    return "array" if isinstance(value, list) else "object"


def json_schema_for(
    item: EvalItem,
    *,
    field_types: Mapping[str, Sequence[str]],
    max_string_length: int | None = None,
) -> dict[str, Any] | None:
    """The JSON schema of ``item``'s answer, or ``None`` for tasks without one.

    ``max_string_length`` gives every string field a ``maxLength`` (written as an ``anyOf``
    of the field's types and null, the form llama.cpp's GBNF converter bounds too)."""
    if item.task == "extraction":
        names = list(item.fields or {})
        props = {n: _field_schema(field_types.get(n, ["string"]), max_string_length) for n in names}
        return {
            "type": "object",
            "properties": props,
            "required": names,
            "additionalProperties": False,
        }
    if item.task == "tool_call":
        return {"anyOf": [_tool_schema(t, item.id) for t in item.tools or []]}
    return None


def _field_schema(types: Sequence[str], max_string_length: int | None) -> dict[str, Any]:
    if max_string_length is None:
        return {"type": [*types, "null"]}
    options = [
        {"type": t, "maxLength": max_string_length} if t == "string" else {"type": t} for t in types
    ]
    return {"anyOf": [*options, {"type": "null"}]}


def _tool_schema(tool: Mapping[str, Any], item_id: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str):
        raise CompkitError(f"item {item_id!r}: a tool has no 'name' (needed for its schema)")
    params = tool.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"tool": {"const": name}, "arguments": params},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


def plan_schemas(
    eval_set: EvalSet,
    settings: Mapping[str, StructuredOutput],
    *,
    string_limits: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Item id -> schema for every item whose task asks for ``json_schema``
    (``string_limits``: task -> ``maxLength`` of its string fields).

    Raises
    ------
    CompkitError
        When a task that has no JSON answer asks for a schema.
    """
    wanted = {t for t, mode in settings.items() if mode == "json_schema"}
    wrong = sorted(wanted - set(SCHEMA_TASKS))
    if wrong:
        raise CompkitError(
            f"tasks.{wrong[0]}.structured_output: json_schema applies to {list(SCHEMA_TASKS)} "
            f"(answers that are JSON objects), not {wrong[0]!r}"
        )
    types = field_types(eval_set)
    out = {}
    for item in eval_set.items:
        if item.task in wanted:
            schema = json_schema_for(
                item,
                field_types=types,
                max_string_length=(string_limits or {}).get(item.task),
            )
            if schema is not None:
                out[item.id] = schema
    return out


def gbnf_for(schema: Mapping[str, Any]) -> str:
    """llama.cpp's GBNF grammar for ``schema`` (llama-cpp-python's converter)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))
