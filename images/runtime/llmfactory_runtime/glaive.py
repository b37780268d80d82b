"""Rows of glaive-function-calling-v2 (Glaive AI's function-calling corpus, which Axolotl reads as
its sharegpt.load_glaive): {system, chat}, each one text. The system's words are followed by the
functions it offers, JSON objects one after the other; the chat is USER:, ASSISTANT: and FUNCTION
RESPONSE: turns, an answer ended by <|endoftext|>, and an assistant's call written
`<functioncall> {"name": ..., "arguments": '{...}'}` (its arguments JSON in single quotes). Read as
the OpenAI tool-calling row they say the same as: the functions its tools, the calls tool_calls."""

from __future__ import annotations

import json
import re
from typing import Any

from .tool_calls import openai_call

CALL, END = "<functioncall>", "<|endoftext|>"
ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_TURN = re.compile(r"(?:^|\n)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):")
_QUOTED_ARGUMENTS = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*\'(?P<arguments>.*)\'\s*\}',
                               re.DOTALL)
_DECODER = json.JSONDecoder()


def is_glaive(row: dict[str, Any]) -> bool:
    """A row of glaive's layout: its conversation one text in `chat`."""
    return isinstance(row.get("chat"), str) and "messages" not in row and "conversations" not in row


def uses_tools(row: dict[str, Any]) -> bool:
    """Whether the glaive row offers functions (its system is followed by them) or calls one."""
    return is_glaive(row) and (CALL in row["chat"] or _system(row)[1] >= 0)


def _system(row: dict[str, Any]) -> tuple[str, int]:
    """(the system's text, where the functions after its words start: -1 for none); a ValueError when
    it is not text."""
    text = row.get("system") or ""
    if not isinstance(text, str):
        raise ValueError(f"a glaive row's system is text, got {str(text)[:80]!r}")
    text = text.strip().removeprefix("SYSTEM:").strip()
    return text, text.find("{")


def _words(row: dict[str, Any]) -> str:
    """The system's words, without the functions after them (which the chat template writes itself)."""
    text, start = _system(row)
    # "... Use them if required -": the dash led to the functions
    return text if start < 0 else text[:start].rstrip(" -\n")


def glaive_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The functions the row's system offers, as OpenAI's tools (None without any); a ValueError when
    they are not JSON objects."""
    text, pos = _system(row)
    if pos < 0:
        return None
    functions = []
    while pos < len(text):
        try:
            function, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            raise ValueError(f"a glaive row's system holds its functions as JSON objects, got "
                             f"{text[pos:pos + 80]!r}") from None
        functions.append(function)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return [{"type": "function", "function": f} for f in functions] or None


def _call(text: str) -> dict[str, Any]:
    """{name, arguments} of the text after <functioncall>: glaive's form (arguments JSON text in single
    quotes), or JSON."""
    text = text.strip()
    if quoted := _QUOTED_ARGUMENTS.fullmatch(text):
        return {"name": quoted["name"], "arguments": quoted["arguments"]}
    try:
        call = json.loads(text)
    except ValueError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"a glaive call is <functioncall> {{\"name\": ..., \"arguments\": '{{...}}'}}, got "
                         f"{text[:80]!r}")
    return call


def glaive_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's system message (its words) and its turns as OpenAI's messages: an assistant's
    <functioncall> its tool call (the words before it its content), a FUNCTION RESPONSE a tool's
    result. A ValueError when the chat is not such turns."""
    system = _words(row)
    parts = _TURN.split(row["chat"])
    if parts[0].strip() or len(parts) == 1:
        raise ValueError(f"a glaive chat is USER:, ASSISTANT: and FUNCTION RESPONSE: turns, got "
                         f"{row['chat'].strip()[:80]!r}")
    messages = [{"role": "system", "content": system}] if system else []
    for tag, text in zip(parts[1::2], parts[2::2]):
        text = text.replace(END, "").strip()
        if ROLES[tag] == "assistant" and CALL in text:
            said, call = text.split(CALL, 1)
            messages.append({"role": "assistant", "content": said.strip() or None,
                             "tool_calls": [openai_call(_call(call))]})
        else:
            messages.append({"role": ROLES[tag], "content": text})
    return messages
