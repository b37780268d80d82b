"""Dataset rows on disk: ChatML ({messages}) or ShareGPT ({conversations}), JSONL per split."""

from __future__ import annotations

import json
from typing import Any, Iterable

from .store import open_store

SPLITS = ("train", "validation", "test")
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
_CHATML_ROLE = {v: k for k, v in _SHAREGPT_ROLE.items()}


def to_row(messages: list[dict[str, str]], fmt: str, **extra: Any) -> dict[str, Any]:
    if fmt == "sharegpt":
        return {"conversations": [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages],
                **extra}
    return {"messages": messages, **extra}


def messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """ChatML messages from a row in either format."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [{"role": _CHATML_ROLE[c["from"]], "content": c["value"]} for c in row["conversations"]]


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def read_split(dataset_uri: str, split: str) -> list[dict[str, Any]]:
    """Rows of one split; an absent split file is an empty split."""
    try:
        raw = open_store(dataset_uri).read_bytes(f"{split}.jsonl")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
