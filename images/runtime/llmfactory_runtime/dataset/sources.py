"""Prompts from the sources of a DatasetBuild: inline lists and JSONL files."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ..store import open_store

UNKNOWN_LANGUAGE = "und"


def _read_uri(uri: str) -> bytes:
    folder, name = uri.rstrip("/").rsplit("/", 1)
    return open_store(folder).read_bytes(name)


def collect(sources: list[dict[str, Any]], dropped: Counter) -> list[dict[str, str]]:
    """[{prompt, language}] from every source, in order; malformed rows are counted, not fatal."""
    prompts = []
    for source in sources:
        default_lang = source.get("language") or UNKNOWN_LANGUAGE
        if "inline" in source:
            prompts += [{"prompt": p["text"], "language": p.get("language") or default_lang}
                        for p in source["inline"]]
            continue
        field, lang_field = source.get("promptField", "prompt"), source.get("languageField", "language")
        for line in _read_uri(source["uri"]).decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row[field]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                dropped["malformed"] += 1
                continue
            prompts.append({"prompt": text.strip(), "language": row.get(lang_field) or default_lang})
    return prompts
