"""format text: a corpus of documents (continued pre-training) streamed from its sources to the
splits. Each document goes through the length bounds, language detection and the duplicate filters
as it is read; a kept one is written to a spill file on local disk (the Job's /tmp, an emptyDir),
and only its record (key, language, split, where its line is) stays in memory for the sampling and
the seeded split, which read the records as a conversation build reads its rows. So memory grows by
a record per kept document (and, with filters.nearDuplicateThreshold, its MinHash bands), not by its
text: benchmarks/text_build_memory.py. Language detection and the MinHash signatures, most of the
time a document takes, run in a process a CPU (pieces.py); the outcome is the same with one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from ..cpus import available
from ..data import SPLITS, jsonl_line
from ..progress import Progress
from ..store import Store
from .dedupe import dedupe
from .filters import AnswerFilter
from .languages import detect
from .pieces import Workers
from .sources import Drops, collect
from .splits import row_key, sample_per_language, split_rows, write_split

READ_FIGURE_EVERY = 1000  # documents between progress figures while reading
# Beyond this many workers the build's own process is the bottleneck (reading, exact keys, band
# lookups, the spill: ~20% of a document's time); each worker holds ~150 MB (the language model).
MAX_WORKERS = 8


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


def write(task: dict[str, Any], data: Store, drops: Drops, progress: Progress) -> dict[str, Any]:
    """The splits of the sources' documents written to data: {rows: per split, rowsPerLanguage, digest}."""
    import pyarrow as pa  # noqa: PLC0415

    spec = task["spec"]
    filters = spec.get("filters") or {}
    progress.stage("reading documents", unit="documents")
    schema = pa.schema([("text", pa.string()), ("language", pa.string())])
    with (_workers() as workers, tempfile.TemporaryDirectory() as tmp,
          (Path(tmp) / "documents.jsonl").open("w+b") as file):
        documents = collect(spec["sources"], drops, task["inputs"].get("configMaps"), documents=True)
        documents = _within_bounds(documents, filters, drops)
        if spec.get("languageDetection") is not None:
            documents = detect(documents, spec["languageDetection"], spec.get("samplesPerLanguage"), drops, workers)
        threshold = filters.get("nearDuplicateThreshold") or None  # 0: exact duplicates only
        documents = dedupe(documents, threshold, drops, "document", workers)
        spill = Spill(file)
        records = list(_counted(map(spill.add, documents), progress))
        records = sample_per_language(records, spec.get("samplesPerLanguage"), spec["split"]["seed"], drops,
                                      shown=spill.text)
        progress.stage("writing splits")
        splits, digest = split_rows(records, spec["split"]), hashlib.sha256()
        rows = {name: write_split(data, name, map(spill.row, splits[name]), digest, spec.get("parquet", True), schema)
                for name in SPLITS}
    return {"rows": rows, "rowsPerLanguage": dict(Counter(r["language"] for r in records)),
            "digest": "sha256:" + digest.hexdigest()}


def _workers() -> contextlib.AbstractContextManager[Workers | None]:
    """Processes for language detection and MinHash signatures, one a CPU the pod may use (none with one),
    at most MAX_WORKERS."""
    count = min(available(), MAX_WORKERS)
    return Workers(count) if count > 1 else contextlib.nullcontext()


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


def _counted(records: Iterable[dict], progress: Progress) -> Iterator[dict]:
    for n, record in enumerate(records, 1):
        if n % READ_FIGURE_EVERY == 0:
            progress.update(n, figure=f"{n} documents kept")
        yield record
