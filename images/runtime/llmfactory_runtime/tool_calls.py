"""Tool calls compared: the calls a model's answer makes, read back from its text, against the calls
a row expects (grader operation toolCalls), as the Berkeley Function-Calling Leaderboard's AST check
compares them: the same functions with the same arguments, in any order."""

from __future__ import annotations

import json
import re
from typing import Any

# Hermes' and Qwen2.5's form (chat.TEMPLATES["chatml"] writes it; vLLM's hermes parser reads it).
_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_DECODER = json.JSONDecoder()


def _call(value: Any) -> dict[str, Any] | None:
    """{name, arguments} of a call as a model writes one ({name, arguments} as Hermes, {name, parameters}
    as Llama 3.1) or a row holds one (OpenAI's {type: function, function: {name, arguments}}, its
    arguments a JSON string); None when it is not a call."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = arguments_object(value.get("arguments", value.get("parameters", {})))
    return {"name": value["name"], "arguments": arguments} if arguments is not None else None


def openai_call(call: Any) -> dict[str, Any]:
    """A call {name, arguments} as OpenAI's tool call, its arguments JSON text as OpenAI's are."""
    if isinstance(call, dict) and not isinstance(call.get("arguments", ""), str):
        call = {**call, "arguments": json.dumps(call["arguments"], ensure_ascii=False)}
    return {"type": "function", "function": call}


def arguments_object(arguments: Any) -> dict[str, Any] | None:
    """A call's arguments as an object: OpenAI's JSON text parsed (empty text: none); None when they
    are not an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _calls(values: list[Any]) -> list[dict[str, Any]] | None:
    calls = [_call(v) for v in values]
    return None if any(c is None for c in calls) else calls


def answered_calls(answer: str) -> list[dict[str, Any]] | None:
    """The calls an answer makes: its <tool_call> blocks, or the whole answer as JSON calls ({name,
    arguments} objects or lists of them, as Llama 3.1 writes one and a tokenizer whose <tool_call> is a
    special token leaves them); [] when it makes none (it answers in words); None when a call it
    writes is malformed (not JSON, no name, arguments not an object)."""
    blocks = _TAGGED.findall(answer)
    if blocks:
        try:
            return _calls([json.loads(block) for block in blocks])
        except json.JSONDecodeError:
            return None
    values, text, at = [], answer.strip(), 0
    while at < len(text):  # one JSON call, a list of them, or several one after another (their tags dropped)
        try:
            value, at = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            return []  # words (in braces or not), not calls
        values += value if isinstance(value, list) else [value]
        while at < len(text) and text[at].isspace():
            at += 1
    return _calls(values) if values and all(isinstance(v, dict) and "name" in v for v in values) else []


def openai_calls(answer: str) -> list[dict[str, Any]]:
    """The calls an answer makes as OpenAI's API returns them ({type: function, function: {name, arguments:
    JSON text}}), a python grader's sample.output_tools: [] when it makes none or one is malformed."""
    return [{"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"],
                                                                                          ensure_ascii=False)}}
            for c in answered_calls(answer) or []]


def expected_calls(value: Any) -> list[dict[str, Any]]:
    """The calls a row expects (a list of OpenAI tool calls or {name, arguments}; [] for an answer in
    words). A ValueError says what is wrong with them."""
    calls = _calls(value) if isinstance(value, list) else None
    if calls is None:
        raise ValueError("expected tool calls are a list of {type: function, function: {name, arguments}} (or "
                         f"{{name, arguments}}; [] for an answer without one), got {str(value)[:80]!r}")
    return calls


def same_calls(answered: list[dict[str, Any]] | None, expected: list[dict[str, Any]]) -> bool:
    """Whether the answer makes exactly the expected calls, in any order: each function with equal
    arguments (JSON values: 1 and 1.0 are equal, an object's keys in any order), none missing, none extra."""
    if answered is None:
        return False
    return sorted(map(_canonical, answered)) == sorted(map(_canonical, expected))


def _canonical(value: Any) -> Any:
    """A JSON value in a form that compares as JSON does: numbers by value (1 == 1.0), true apart from 1,
    an object's keys in any order."""
    if isinstance(value, bool) or value is None:
        return ("literal", repr(value))
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, dict):
        return ("object", tuple(sorted((k, _canonical(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    return ("string", value)


def shown(calls: list[dict[str, Any]]) -> str:
    """The calls as a line of text (a report's reference column): name(arguments) each, or 'no call'."""
    return "; ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls) or "no call"

