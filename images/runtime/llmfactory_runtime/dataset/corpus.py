"""format text: a corpus of documents (continued pre-training) streamed from its sources to the
splits. Each document goes through the length bounds, language detection and the duplicate filters
as it is read; a kept one is written to a spill file on local disk (the Job's /tmp, an emptyDir),
and only its record (key, language, split, where its line is) stays in memory for the sampling and
the seeded split, which read the records as a conversation build reads its rows. So memory grows by
a record per kept document (and, with filters.nearDuplicateThreshold, its MinHash bands), not by its
text: benchmarks/text_build_memory.py. Language detection and the MinHash signatures, most of the
time a document takes, run in a process a CPU (pieces.py); the outcome is the same with one.
The stream goes through the filters SEGMENT documents at a time, and what was decided about each
segment is saved with the run (Segments), so that a build stopped midway goes on where it was."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from ..data import SPLITS, jsonl_line
from ..progress import Progress
from ..store import Store
from .dedupe import Duplicates, digest as duplicate_key
from .filters import AnswerFilter
from .languages import detect, release
from .pieces import pod_workers
from .sources import Drops, collect
from .splits import row_key, sample_per_language, split_rows, write_split

READ_FIGURE_EVERY = 1000  # documents between progress figures while reading
# Documents read between saved states (Segments): at most what a restarted build classifies and signs
# again (~1 minute's work on 8 CPUs, ~4 on 2); each save drains the workers' pipeline once.
SEGMENT = 200_000
STATE = "corpus"  # the run's folder of saved segments


class Spill:
    """Kept documents as JSONL lines of their rows in a local file, each read back by its record."""

    def __init__(self, file: BinaryIO):
        self.file, self.size = file, 0

    def add(self, document: dict[str, Any]) -> dict[str, Any]:
        row = {"text": document["turns"][0], "language": document["language"]}
        line = jsonl_line(row)
        self.file.write(line)
        record = {"key": row_key(None, row["text"]), "language": row["language"], "at": self.size, "size": len(line)}
        self.size += len(line)
        return {**record, "split": document["split"]} if "split" in document else record

    def row(self, record: dict[str, Any]) -> dict[str, Any]:
        self.file.seek(record["at"])
        return json.loads(self.file.read(record["size"]))

    def text(self, record: dict[str, Any]) -> str:
        return self.row(record)["text"]


def write(task: dict[str, Any], data: Store, drops: Drops, progress: Progress, state: Store) -> dict[str, Any]:
    """The splits of the sources' documents written to data: {rows: per split, rowsPerLanguage, digest}.
    What was decided about the documents read so far is saved in `state` every SEGMENT documents
    (Segments): a build restarted after its pod was stopped reads those again but classifies and signs
    none of them, and ends with the dataset an uninterrupted build writes."""
    try:
        written = _write(task, data, drops, progress, Segments(state))
    except StartOver as exc:
        progress.stage(f"starting over: {exc}")
        state.delete_prefix()
        drops.counts.clear()
        drops.examples.clear()
        written = _write(task, data, drops, progress, Segments(state))
    return written


def _write(task: dict[str, Any], data: Store, drops: Drops, progress: Progress, segments: "Segments") -> dict[str, Any]:
    import pyarrow as pa  # noqa: PLC0415

    spec = task["spec"]
    filters = spec.get("filters") or {}
    schema = pa.schema([("text", pa.string()), ("language", pa.string())])
    with (pod_workers() as workers, tempfile.TemporaryDirectory() as tmp,
          (Path(tmp) / "documents.jsonl").open("w+b") as file):
        spill = Spill(file)
        duplicates = Duplicates(filters.get("nearDuplicateThreshold") or None, log=True)  # 0: exact duplicates only
        read = Numbered(collect(spec["sources"], drops, task["inputs"].get("configMaps"), documents=True))
        records = segments.restore(read, spill, duplicates, drops, progress)
        progress.stage("reading documents", unit="documents")
        while not read.ended:
            kept: list[tuple[int, str]] = []
            before = read.count
            documents = _within_bounds(read.next(SEGMENT), filters, drops)
            if spec.get("languageDetection") is not None:
                documents = detect(documents, spec["languageDetection"], spec.get("samplesPerLanguage"), drops, workers,
                                   hold=True)
            for document in duplicates.unique(documents, drops, "document", workers):
                records.append(spill.add(document))
                kept.append((document["n"], document["language"]))
                if len(records) % READ_FIGURE_EVERY == 0:
                    progress.update(len(records), figure=f"{len(records)} documents kept")
            if read.count > before:
                segments.save(read.count, kept, duplicates, drops)
        release()
        records = sample_per_language(records, spec.get("samplesPerLanguage"), spec["split"]["seed"], drops,
                                      shown=spill.text)
        progress.stage("writing splits")
        splits, digest = split_rows(records, spec["split"]), hashlib.sha256()
        rows = {name: write_split(data, name, map(spill.row, splits[name]), digest, spec.get("parquet", True), schema)
                for name in SPLITS}
    return {"rows": rows, "rowsPerLanguage": dict(Counter(r["language"] for r in records)),
            "digest": "sha256:" + digest.hexdigest()}


class Numbered:
    """The sources' documents, each numbered ("n") in the order read, taken SEGMENT at a time."""

    def __init__(self, documents: Iterator[dict[str, Any]]):
        self.documents, self.count, self.ended = documents, 0, False

    def next(self, limit: int) -> Iterator[dict[str, Any]]:
        """Up to `limit` more documents (fewer: the sources are read to their end)."""
        for _ in range(limit):
            document = next(self.documents, None)
            if document is None:
                self.ended = True
                return
            document["n"] = self.count
            self.count += 1
            yield document


class StartOver(Exception):
    """The saved segments do not describe the sources as they are now (a source changed since, or a
    segment is missing): the build starts over."""


class Segments:
    """What a text build decided about each SEGMENT documents it read, saved once they all went
    through the filters (one object a segment, written at once, so a segment is saved whole or not at
    all): how many documents were read in all, which were kept and in which language, what the
    duplicate filter remembers of them (Duplicates.log), and the drops so far. Not their text: the
    sources hold it, and a restarted build reads it there again."""

    def __init__(self, store: Store):
        self.store, self.saved = store, 0

    def save(self, read: int, kept: list[tuple[int, str]], duplicates: Duplicates, drops: Drops) -> None:
        import numpy as np  # noqa: PLC0415

        log = duplicates.drain_log()
        bands = [b for _, b, k in log if k and b is not None]
        arrays = {"kept": np.array([n for n, _ in kept], dtype=np.int64),
                  "languages": np.array([lang for _, lang in kept], dtype=str),
                  # 16-byte digests as rows of bytes (numpy's S16 would drop a digest's trailing zero bytes)
                  "kept_keys": np.frombuffer(b"".join(key for key, _, k in log if k), np.uint8).reshape(-1, 16),
                  "other_keys": np.frombuffer(b"".join(key for key, _, k in log if not k), np.uint8).reshape(-1, 16),
                  "bands": np.array(bands, dtype=np.uint64)}
        meta = {"read": read, "drops": {"counts": dict(drops.counts), "examples": drops.examples}}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        # named by the documents read in all too: a restart knows how many it reads again before it does
        self.store.write_bytes(f"segment-{self.saved:06d}-{read:012d}.npz", buffer.getvalue())
        self.saved += 1

    def restore(self, read: Numbered, spill: Spill, duplicates: Duplicates, drops: Drops,
                progress: Progress) -> list[dict[str, Any]]:
        """The records of the documents kept by the segments saved before, spilled again as they are
        read again (restoring what the duplicate filter remembered of them and the drops); none
        before the first attempt. StartOver when the sources now hold other documents there."""
        import numpy as np  # noqa: PLC0415

        names = [name for name in self.store.list() if name.startswith("segment-")]
        records: list[dict[str, Any]] = []
        total = int(names[-1].removesuffix(".npz").rsplit("-", 1)[1]) if names else 0
        if names:
            progress.stage("reading again the documents read before a restart", unit="documents", total=total)
        for index, name in enumerate(names):
            if not name.startswith(f"segment-{index:06d}-"):
                raise StartOver(f"{self.store.uri}/{name} is not segment {index}: a segment is missing")
            with np.load(io.BytesIO(self.store.read_bytes(name))) as segment:
                meta = json.loads(segment["meta"].item())
                for key in segment["other_keys"]:
                    duplicates.remember(key.tobytes())
                kept = iter(zip(segment["kept"].tolist(), segment["languages"].tolist(), segment["kept_keys"],
                                segment["bands"] if len(segment["bands"]) else itertools.repeat(None)))
                wanted = next(kept, None)
                for document in read.next(meta["read"] - read.count):
                    if wanted is not None and wanted[0] == document["n"]:
                        _, language, key, bands = wanted
                        key = key.tobytes()
                        if duplicate_key(document["turns"][0]) != key:
                            raise StartOver(f"the sources changed since the last attempt: document {document['n']} "
                                        "is not the one it kept")
                        records.append(spill.add({**document, "language": language}))
                        duplicates.remember(key, bands)
                        wanted = next(kept, None)
                    if document["n"] % READ_FIGURE_EVERY == 0:
                        progress.update(document["n"], figure=f"{document['n']} of {total} documents read again, "
                                                              f"{len(records)} kept")
                if wanted is not None or read.count < meta["read"]:
                    raise StartOver(f"the sources changed since the last attempt: they hold fewer than the "
                                    f"{meta['read']} documents it read")
            self.saved = index + 1
        if names:
            drops.counts, drops.examples = Counter(meta["drops"]["counts"]), meta["drops"]["examples"]
        return records


def _within_bounds(documents: Iterable[dict], filters: dict[str, Any], drops: Drops) -> Iterator[dict]:
    """The documents within filters.minAnswerChars and maxAnswerChars (checked first: the cheapest)."""
    bounds = AnswerFilter({"refusals": False, **{k: v for k, v in filters.items()
                                                 if k in ("minAnswerChars", "maxAnswerChars")}})
    for document in documents:
        [text] = document["turns"]
        reason = bounds.reason_to_drop(text, finished=True)
        if reason:
            drops.add(reason, text)
        else:
            yield document
