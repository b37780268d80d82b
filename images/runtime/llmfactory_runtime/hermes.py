"""Conversations in the form of Nous Research's hermes-function-calling-v1 (its ShareGPT rows, or
OpenAI messages converted from them): the functions written in the system turn between <tools> and
</tools>, an assistant's calls in <tool_call> blocks and a tool turn's results in <tool_response>
blocks, each a Python literal ({'arguments': {...}, 'name': ...}: single quotes). Read as plain text,
a model learns to write calls in single quotes, which no JSON parser (vLLM's hermes one, a
Benchmark's toolCalls) reads back, and the results' tags twice (the chat template writes its own).
So they are read as the OpenAI tool-calling row they say the same as: the functions its tools, the
calls tool_calls, the results tool messages as JSON."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from .tool_calls import openai_call

_TOOLS = re.compile(r"<tools>(.*?)</tools>", re.DOTALL)
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)


def _tools_block(system: Any) -> re.Match | None:
    """The system message's <tools> block that holds the functions: the first with anything inside (the
    words before it may name the tags: 'signatures within <tools></tools> XML tags')."""
    return next((m for m in _TOOLS.finditer(system) if m[1].strip()), None) if isinstance(system, str) else None


def is_hermes(system: Any) -> bool:
    """Whether a conversation is in Hermes' form, by its system message (text, or None): one that offers
    functions in a <tools> block. Only then are <tool_call> and <tool_response> texts read as calls and
    results (an answer that shows those tags in prose, teaching the format, stays text)."""
    return _tools_block(system) is not None


def literal(text: str, what: str) -> Any:
    """A JSON value written as JSON or as a Python literal (single quotes, True, None); a ValueError
    naming `what` otherwise. ast.literal_eval evaluates literals only, never code."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{what} is JSON or a Python literal, got {text.strip()[:80]!r}") from None


def hermes_tools(system: str | None) -> list[dict[str, Any]] | None:
    """The functions a system message offers in its <tools> block, as OpenAI's tools (None without any)."""
    if (found := _tools_block(system)) is None:
        return None
    tools = literal(found[1], "a Hermes system's <tools>")
    tools = tools if isinstance(tools, list) else [tools]
    if not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"a Hermes system's <tools> are function objects, got {found[1].strip()[:80]!r}")
    return [t if "function" in t else {"type": "function", "function": t} for t in tools] or None


def hermes_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation's messages (roles as templates name them) with Hermes' texts read: a system's
    words before its <tools> (the chat template writes the tools and the calls' format itself), an
    assistant's <tool_call>s its tool calls (the words beside them its content), each <tool_response>
    a tool message. A ValueError for a call that is not one."""
    read = []
    for m in messages:
        role, text = m["role"], m["content"]
        if role == "system" and (found := _tools_block(text)):
            words = text[:found.start()].strip()
            read += [{**m, "content": words}] if words else []
        elif role == "assistant" and "<tool_call>" in text:
            calls = [literal(block, "a Hermes <tool_call>") for block in _CALL.findall(text)]
            if not calls or not all(isinstance(c, dict) for c in calls):
                raise ValueError(f"a Hermes <tool_call> is {{name, arguments}} before </tool_call>, got {text[:80]!r}")
            read.append({**m, "content": _CALL.sub("", text).strip(),
                         "tool_calls": [*m.get("tool_calls", []), *map(openai_call, calls)]})
        elif role == "tool" and "<tool_response>" in text:
            if not (blocks := _RESPONSE.findall(text)):
                raise ValueError(f"a Hermes <tool_response> ends with </tool_response>, got {text[:80]!r}")
            read += [{**m, "content": _as_json(block.strip())} for block in blocks]
        else:
            read.append(m)
    return read


def _as_json(text: str) -> str:
    """A tool's result as JSON text where it is a Python literal (as Hermes writes them); else as written."""
    try:
        return json.dumps(literal(text, "a result"), ensure_ascii=False) if text.startswith(("{", "[")) else text
    except (ValueError, TypeError):
        return text
