"""Duplicate prompts: exact (after case and whitespace folding) and near (MinHash LSH over
shingles: words for spaced scripts, characters for Chinese and Japanese) of each conversation's
opening prompt; the first one kept."""

from __future__ import annotations

import functools
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
    processes, when given."""
    return Duplicates(threshold).unique(prompts, drops, unit, workers)


class Duplicates:
    """What the duplicate filter remembers of the prompts it let through: a digest of each (exact
    duplicates), and with a threshold its MinHash bands (near ones), not its text: a corpus larger than
    memory goes through. `log` (a text build's) lists, in order, each remembered prompt's digest, its
    bands and whether it was kept, for remember() to restore in a later process."""

    def __init__(self, threshold: float | None, log: bool = False):
        self.seen: set[bytes] = set()
        self.bands = Bands(threshold) if threshold is not None else None
        self.log: list[tuple[bytes, Any, bool]] | None = [] if log else None

    def unique(self, prompts: Iterable[dict[str, Any]], drops: Drops, unit: str,
               workers: Workers | None = None) -> Iterator[dict[str, Any]]:
        if self.bands is None:
            for piece in chunks(prompts, BULK):
                for p, key in self._new(piece, drops, unit):
                    self._logged(key, None, True)
                    yield p
            return
        pieces = (list(self._new(piece, drops, unit)) for piece in chunks(prompts, BULK))
        for piece, hashes in computed(pieces, functools.partial(signed, self.bands.ranges), lambda p: p[0]["turns"][0],
                                      workers):
            for (p, key), bands in zip(piece, hashes):
                seen = self.bands.seen_else_keep(bands.tolist())
                self._logged(key, bands, not seen)
                if seen:
                    drops.add(f"near_duplicate_{unit}", p["turns"][0])
                else:
                    yield p

    def _new(self, piece: list[dict[str, Any]], drops: Drops, unit: str) -> Iterator[tuple[dict[str, Any], bytes]]:
        """The piece's prompts not seen before, each with its digest."""
        for p in piece:
            # conversations are told apart by their opening prompt, and unique
            # first prompts mean no prompt can land in two splits
            key = digest(p["turns"][0])
            if key in self.seen:
                drops.add(f"duplicate_{unit}", p["turns"][0])
                continue
            self.seen.add(key)
            yield p, key

    def _logged(self, key: bytes, bands: Any, kept: bool) -> None:
        if self.log is not None:
            self.log.append((key, bands, kept))

    def drain_log(self) -> list[tuple[bytes, Any, bool]]:
        """The log so far, which starts again empty."""
        log, self.log = self.log, []
        return log

    def remember(self, key: bytes, bands: Any = None) -> None:
        """A prompt let through in an earlier process: its digest and, for a kept one, its bands."""
        self.seen.add(key)
        if bands is not None:
            self.bands.keep(bands.tolist())


def digest(text: str) -> bytes:
    """A prompt's identity for the exact duplicate filter: its text, case and whitespace folded."""
    return hashlib.blake2b(_normal(text).encode(), digest_size=16).digest()


def signed(ranges: list[tuple[int, int]], texts: list[str]) -> Any:
    """The texts' MinHash signatures, as a 64-bit digest of each band (ranges) of each: an array, a
    row a text. In bulk: the permutations are drawn once for all, not once a text (4x faster). A
    digest, not Python's hash(): a later process (a resumed build) finds the same."""
    import numpy as np  # noqa: PLC0415
    from datasketch import MinHash  # noqa: PLC0415

    signatures = MinHash.bulk([[s.encode() for s in shingles(t)] for t in texts], num_perm=NUM_PERM, seed=1)
    return np.array([[int.from_bytes(hashlib.blake2b(m.hashvalues[start:end].tobytes(), digest_size=8).digest(), "little")
                      for start, end in ranges] for m in signatures], dtype=np.uint64).reshape(len(texts), len(ranges))


class Bands:
    """MinHash LSH reduced to what dedupe asks of it: whether a signature shares a band with one kept
    before (what datasketch's MinHashLSH.query answers: candidates, unverified), with its bands and
    rows for the threshold. A kept signature's bands are remembered as 64-bit digests: ~0.6 KB a
    document, where MinHashLSH keeps each band's bytes and the key twice (~2.9 KB)."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH  # noqa: PLC0415

        self.ranges = MinHashLSH(threshold=threshold, num_perm=NUM_PERM).hashranges
        self.tables: list[set[int]] = [set() for _ in self.ranges]

    def seen_else_keep(self, hashes: list[int]) -> bool:
        """Whether a kept signature shares a band (its digest) with this one; if none does, this one is
        kept."""
        if any(h in table for h, table in zip(hashes, self.tables)):
            return True
        self.keep(hashes)
        return False

    def keep(self, hashes: list[int]) -> None:
        for h, table in zip(hashes, self.tables):
            table.add(h)
