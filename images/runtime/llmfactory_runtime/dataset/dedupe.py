"""Duplicate prompts: exact (after case and whitespace folding) and near (MinHash LSH over
shingles: words for spaced scripts, characters for Chinese and Japanese) of each conversation's
opening prompt; the first one kept."""

from __future__ import annotations

import re
from typing import Any

from .sources import Drops

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
NUM_PERM = 128
BULK = 4096


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def shingles(text: str, n: int = 3) -> set[str]:
    text = _normal(text)
    if CJK.search(text):
        units = [c for c in text if not c.isspace()]
    else:
        units = re.findall(r"\w+", text)
    if len(units) < n:
        return {" ".join(units)} if units else {text}
    return {" ".join(units[i:i + n]) for i in range(len(units) - n + 1)}


def dedupe(prompts: list[dict[str, Any]], threshold: float | None, drops: Drops,
           unit: str = "prompt") -> list[dict[str, Any]]:
    """The prompts (or, unit "document", a text build's documents) but the duplicates, counted in
    drops as duplicate_<unit> and near_duplicate_<unit>."""
    seen: set[str] = set()
    unique = []
    for p in prompts:
        key = _normal(p["turns"][0])  # conversations are told apart by their opening prompt, and
        if key in seen:               # unique first prompts mean no prompt can land in two splits
            drops.add(f"duplicate_{unit}", p["turns"][0])
            continue
        seen.add(key)
        unique.append(p)
    if threshold is None:
        return unique
    from datasketch import MinHash, MinHashLSH  # noqa: PLC0415

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept = []
    for start in range(0, len(unique), BULK):
        chunk = unique[start:start + BULK]
        # bulk: the permutations are drawn once per chunk, not once per prompt (4x faster)
        signatures = MinHash.bulk([[s.encode() for s in shingles(p["turns"][0])] for p in chunk],
                                  num_perm=NUM_PERM, seed=1)
        for index, (p, signature) in enumerate(zip(chunk, signatures), start):
            if lsh.query(signature):
                drops.add(f"near_duplicate_{unit}", p["turns"][0])
                continue
            lsh.insert(str(index), signature)
            kept.append(p)
    return kept
