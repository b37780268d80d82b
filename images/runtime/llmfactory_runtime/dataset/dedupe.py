"""Duplicate prompts: exact (after case and whitespace folding) and near (MinHash LSH over
shingles: words for spaced scripts, characters for Chinese and Japanese) of each conversation's
opening prompt; the first one kept."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Iterator

from .pieces import Workers, chunks, computed
from .sources import Drops

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
NUM_PERM = 128
BULK = 1024  # prompts signed at a time (a worker's piece)


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


def dedupe(prompts: Iterable[dict[str, Any]], threshold: float | None, drops: Drops, unit: str = "prompt",
           workers: Workers | None = None) -> Iterator[dict[str, Any]]:
    """The prompts (or, unit "document", a text build's documents) but the duplicates, as they come,
    counted in drops as duplicate_<unit> and near_duplicate_<unit>; signatures computed by the workers'
    processes, when given. What it remembers of each prompt kept is a digest (and with a threshold,
    its MinHash bands), not its text: a corpus larger than memory goes through."""
    seen: set[bytes] = set()

    def unique(piece: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = []
        for p in piece:
            # conversations are told apart by their opening prompt, and unique
            # first prompts mean no prompt can land in two splits
            key = hashlib.blake2b(_normal(p["turns"][0]).encode(), digest_size=16).digest()
            if key in seen:
                drops.add(f"duplicate_{unit}", p["turns"][0])
                continue
            seen.add(key)
            kept.append(p)
        return kept

    if threshold is None:
        for piece in chunks(prompts, BULK):
            yield from unique(piece)
        return
    bands = Bands(threshold)
    for piece, signatures in computed(map(unique, chunks(prompts, BULK)), signed, lambda p: p["turns"][0], workers):
        for p, signature in zip(piece, signatures):
            if bands.seen_else_keep(signature):
                drops.add(f"near_duplicate_{unit}", p["turns"][0])
            else:
                yield p


def signed(texts: list[str]) -> list[Any]:
    """The texts' MinHash signatures (their hash values, as arrays). In bulk: the permutations are
    drawn once for all, not once a text (4x faster)."""
    from datasketch import MinHash  # noqa: PLC0415

    return [m.hashvalues for m in MinHash.bulk([[s.encode() for s in shingles(t)] for t in texts],
                                               num_perm=NUM_PERM, seed=1)]


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
        """Whether a kept signature (hash values) shares a band with this one; if none does, this one is
        kept."""
        hashes = [hash(signature[start:end].tobytes()) for start, end in self.ranges]
        if any(h in table for h, table in zip(hashes, self.tables)):
            return True
        for h, table in zip(hashes, self.tables):
            table.add(h)
        return False
