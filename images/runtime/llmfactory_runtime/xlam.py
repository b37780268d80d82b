"""Rows of Salesforce's xlam-function-calling-60k (APIGen's corpus): {query, tools, answers}, the
tools and answers JSON text (or lists, as a JSONL file may hold them). The answers are the calls that
answer the query, {name, arguments} each; a tool's parameters are written {name: {type, description,
default}} with Python's type names ('str', 'List[int]', 'str, optional'). Read as the OpenAI
tool-calling row they say the same as: the query a user's turn, the answers an assistant's tool
calls, the tools OpenAI's with JSON Schema parameters (what a model is shown at inference: vLLM's and
OpenAI's tools)."""

from __future__ import annotations

import json
from typing import Any

from .tool_calls import openai_call

_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
               "tuple": "array", "set": "array", "dict": "object"}
OPTIONAL = ", optional"


def is_xlam(row: dict[str, Any]) -> bool:
    """A row of xlam's layout: a query beside its tools and the calls that answer it."""
    return (isinstance(row.get("query"), str) and "answers" in row and "tools" in row
            and "messages" not in row and "conversations" not in row)


def _listed(row: dict[str, Any], field: str, shape: str) -> list[dict[str, Any]]:
    """The row's JSON list of objects in `field`; a ValueError saying what it is otherwise."""
    value = row[field]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"an xlam row's {field} are a JSON list of {shape}, got {str(row[field])[:80]!r}")
    return value


def _schema(spec: Any) -> tuple[dict[str, Any], bool]:
    """(a parameter's JSON Schema, whether the call must give it) of xlam's {type, description, default}:
    its Python type name as JSON Schema's (a list's items where they are one plain type; a type JSON Schema
    has no name for, as Union[int, float] or Callable, left out), optional when its type says so or it has
    a default."""
    if not isinstance(spec, dict):
        raise ValueError(f"an xlam parameter is {{type, description, default}}, got {str(spec)[:80]!r}")
    written = str(spec.get("type") or "").strip()
    base = written.removesuffix(OPTIONAL).strip()
    head, _, inner = base.partition("[")
    schema = {"type": _JSON_TYPES[head.lower()]} if head.lower() in _JSON_TYPES else {}
    if schema.get("type") == "array" and inner.rstrip("]").strip().lower() in _JSON_TYPES:
        schema["items"] = {"type": _JSON_TYPES[inner.rstrip("]").strip().lower()]}
    schema.update({key: spec[key] for key in ("description", "default") if key in spec})
    return schema, not written.endswith(OPTIONAL) and "default" not in spec


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    """One xlam tool as OpenAI's: its parameters an object's properties, those without a default or an
    optional type required."""
    if not isinstance(function.get("name"), str):
        raise ValueError(f"an xlam tool is {{name, description, parameters}}, got {str(function)[:80]!r}")
    parameters = function.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError(f"an xlam tool's parameters are {{name: {{type, description}}}}, got {str(parameters)[:80]!r}")
    properties, required = {}, []
    for name, spec in parameters.items():
        properties[name], needed = _schema(spec)
        if needed:
            required.append(name)
    return {"type": "function", "function": {
        **{k: v for k, v in function.items() if k != "parameters"},
        "parameters": {"type": "object", "properties": properties, **({"required": required} if required else {})}}}


def xlam_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The row's tools as OpenAI's (None without any); a ValueError when they are not xlam's."""
    return [_tool(function) for function in _listed(row, "tools", "{name, description, parameters}")] or None


def xlam_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The query as a user's turn and the answers as the assistant's tool calls; a ValueError for a row
    that answers with no call (there is no text answer to learn instead)."""
    calls = _listed(row, "answers", "{name, arguments} calls")
    if not calls:
        raise ValueError("an xlam row's answers are the calls that answer its query, got none")
    return [{"role": "user", "content": row["query"]},
            {"role": "assistant", "content": None, "tool_calls": [openai_call(call) for call in calls]}]
