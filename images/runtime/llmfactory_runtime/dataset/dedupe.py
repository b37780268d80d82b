"""Duplicate prompts: exact (after case and whitespace folding) and near (MinHash LSH over
shingles: words for spaced scripts, characters for Chinese and Japanese) of each conversation's
opening prompt; the first one kept."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Iterator

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


def dedupe(prompts: Iterable[dict[str, Any]], threshold: float | None, drops: Drops,
           unit: str = "prompt") -> Iterator[dict[str, Any]]:
    """The prompts (or, unit "document", a text build's documents) but the duplicates, as they come,
    counted in drops as duplicate_<unit> and near_duplicate_<unit>. What it remembers of each prompt
    kept is a digest (and with a threshold, its MinHash bands), not its text: a corpus larger than
    memory goes through."""
    seen: set[bytes] = set()
    bands = Bands(threshold) if threshold is not None else None
    for chunk in _chunks(prompts, BULK):
        unique = []
        for p in chunk:
            # conversations are told apart by their opening prompt, and unique
            # first prompts mean no prompt can land in two splits
            key = hashlib.blake2b(_normal(p["turns"][0]).encode(), digest_size=16).digest()
            if key in seen:
                drops.add(f"duplicate_{unit}", p["turns"][0])
                continue
            seen.add(key)
            unique.append(p)
        yield from _distinct(unique, bands, drops, unit) if bands is not None else unique


class Bands:
    """MinHash LSH reduced to what dedupe asks of it: whether a signature shares a band with one kept
    before (what datasketch's MinHashLSH.query answers: candidates, unverified), with its bands and
    rows for the threshold. A kept signature's bands are remembered as 64-bit hashes: ~0.6 KB a
    document, where MinHashLSH keeps each band's bytes and the key twice (~2.9 KB)."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH  # noqa: PLC0415

        self.ranges = MinHashLSH(threshold=threshold, num_perm=NUM_PERM).hashranges
        self.tables: list[set[int]] = [set() for _ in self.ranges]

    def seen_else_keep(self, signature) -> bool:
        """Whether a kept signature shares a band with this one; if none does, this one is kept."""
        hashes = [hash(signature.hashvalues[start:end].tobytes()) for start, end in self.ranges]
        if any(h in table for h, table in zip(hashes, self.tables)):
            return True
        for h, table in zip(hashes, self.tables):
            table.add(h)
        return False


def _distinct(chunk: list[dict[str, Any]], bands: Bands, drops: Drops, unit: str) -> Iterator[dict[str, Any]]:
    """The chunk's prompts that are not near duplicates of one kept before (in bands, which takes them)."""
    from datasketch import MinHash  # noqa: PLC0415

    # bulk: the permutations are drawn once per chunk, not once per prompt (4x faster)
    signatures = MinHash.bulk([[s.encode() for s in shingles(p["turns"][0])] for p in chunk], num_perm=NUM_PERM, seed=1)
    for p, signature in zip(chunk, signatures):
        if bands.seen_else_keep(signature):
            drops.add(f"near_duplicate_{unit}", p["turns"][0])
        else:
            yield p


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
