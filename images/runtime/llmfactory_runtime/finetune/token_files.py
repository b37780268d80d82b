"""An sft split tokenized once a node, into files that every process of the node maps, as nanoGPT's
train.bin: the dataset is read by one process of each node, as a stream, and tokenized in pieces
by worker processes, one a CPU of the pod (many rows to a call of the tokenizers library), where
every process did all of it before, on one core; and held once, in the page cache, where every
process held its own copy (4 to 6 bytes a token each; benchmarks/RESULTS.md). The files live on
the node's disk (the Job's /tmp) for the run."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..batching import encoded
from .. import cpus
from ..chat import IGNORE, set_template_kwargs, template_kwargs
from ..data import iter_split
from ..dataset.pieces import Workers, chunks, computed
from ..store.base import atomic_write
from ..task import InvalidTask
from .distributed import World

log = logging.getLogger(__name__)

ROOT = Path(tempfile.gettempdir())
WAIT = 0.2  # seconds between a waiting process's looks
PIECE = 1024  # rows a worker encodes at once
MAX_WORKERS = 8  # each holds transformers and the tokenizer: as many as a text DatasetBuild's, at most


class TokenFiles(Sequence):
    """The examples `write` put in a directory, each {"input_ids", "labels"} as int64 arrays read
    from the maps when asked for; a slice is a view of them, not a copy (an evaluation's share of the
    validation split); `rows`: the split's rows they were encoded from; `tally`: of those, the
    conversations cut at maxSeqLength (truncated) and left out for it (unlearned)."""

    def __init__(self, directory: Path):
        meta = json.loads((directory / "meta.json").read_text())
        self.rows, self.offsets = meta["rows"], np.load(directory / "offsets.npy")
        self.tally = Counter(meta["tally"])
        self.picked = range(len(self.offsets) - 1)
        tokens = int(self.offsets[-1])
        # np.memmap cannot map an empty file: a split with no examples has no tokens to map
        self.ids = np.memmap(directory / "ids.bin", dtype=meta["dtype"], mode="r") if tokens else np.empty(0, np.int64)
        self.learned = np.memmap(directory / "learned.bin", dtype=np.bool_, mode="r") if tokens else np.empty(0, np.bool_)

    def __len__(self) -> int:
        return len(self.picked)

    def __getitem__(self, i):
        if isinstance(i, slice):
            view = copy.copy(self)
            view.picked = self.picked[i]
            return view
        n = self.picked[i]
        start, end = int(self.offsets[n]), int(self.offsets[n + 1])
        ids = self.ids[start:end].astype(np.int64)
        return {"input_ids": ids, "labels": np.where(self.learned[start:end], ids, IGNORE)}

    def lengths(self) -> list[int]:
        return np.diff(self.offsets)[np.array(self.picked, dtype=np.int64)].tolist()


class Counted:
    """An iterable's items, counted as they are read."""

    def __init__(self, items: Iterable):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def write(examples: Iterable[dict], directory: Path, vocabulary: int, rows: Counted, tally: Counter) -> None:
    """Examples (encoded from `rows`) as files in `directory`: their token ids (uint16 where the
    vocabulary fits, as nanoGPT's, int32 otherwise), which tokens are learned (a byte each), where each
    example starts, and the `tally` their encoding counted; made in a directory beside it and renamed
    to it whole, so that a directory there is a finished one."""
    dtype = np.uint16 if vocabulary <= 2 ** 16 else np.int32
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        offsets = array("q", [0])
        with (partial / "ids.bin").open("wb") as ids, (partial / "learned.bin").open("wb") as learned:
            for example in examples:
                tokens = np.asarray(example["input_ids"], dtype=dtype)
                ids.write(tokens.tobytes())
                learned.write((np.asarray(example["labels"]) != IGNORE).tobytes())
                offsets.append(offsets[-1] + len(tokens))
        np.save(partial / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        (partial / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "rows": rows.count,
                                                       "tally": dict(tally)}))
        partial.rename(directory)
    except OSError:
        if not directory.is_dir():
            raise
    finally:  # a directory made meanwhile by another process (the same tokens) is kept, this one not
        shutil.rmtree(partial, ignore_errors=True)


def shared(tokenizer, dataset_uri: str, split: str, max_len: int, every_token: bool, where: str, world: World,
           scope: str, running: contextlib.ExitStack) -> TokenFiles:
    """A split's encoded examples (batching.encoded), written by each node's first process unless a
    finished directory for them is there (a restarted container's), then mapped by every process;
    deleted by the first process when `running` closes. `scope` (the run) and the encoding's settings
    name the directory. A malformed row is an invalid task in every process of the node, told by a file
    beside the directory. The others wait on the disk, not in a collective, whose timeout a corpus
    of billions of tokens could outlast."""
    directory = location(tokenizer, dataset_uri, split, max_len, every_token, scope)
    invalid = directory.with_name(f"{directory.name}.invalid")
    wrote = False
    if world.local_rank == 0:
        running.callback(shutil.rmtree, directory, True)
        running.callback(invalid.unlink, missing_ok=True)
        if not directory.is_dir():
            rows, tally = Counted(iter_split(dataset_uri, split)), Counter()
            try:
                write(encoded_by_workers(tokenizer, rows, max_len, every_token, where, tally), directory,
                      len(tokenizer), rows, tally)
            except InvalidTask as e:
                atomic_write(invalid, str(e).encode())
                raise
            wrote = True
    while not directory.is_dir():  # the node's first process is writing them
        if invalid.is_file():
            raise InvalidTask(invalid.read_text())
        time.sleep(WAIT)
    files = TokenFiles(directory)
    if wrote:
        log.info("%s.jsonl: %d rows tokenized, %d examples of %d tokens, %.1f MB in %s", split, files.rows,
                 len(files), int(files.offsets[-1]), sum(f.stat().st_size for f in directory.iterdir()) / 1e6,
                 directory)
    return files


# Beside the tokenizer the workers load: the arguments its template renders with (chat.template_kwargs).
RENDERED_WITH = "llmfactory_chat_template_kwargs.json"


def encoded_by_workers(tokenizer, rows: Iterable[dict], max_len: int, every_token: bool, where: str,
                       tally: Counter | None = None) -> Iterator[dict]:
    """batching.encoded's examples of the rows, in order (and its `tally`), their pieces encoded by
    worker processes, one a CPU the pod may use (none with one; none for a split of one piece), with
    the tokenizer saved once to disk and loaded by each: rendering conversations is Python's, one core's, work."""
    tally = Counter() if tally is None else tally
    count = min(cpus.available(), MAX_WORKERS)
    if count < 2:
        yield from encoded(tokenizer, rows, max_len, every_token, where, tally=tally)
        return
    with tempfile.TemporaryDirectory(prefix="llmfactory-tokenizer-") as saved, Workers(count) as workers:
        tokenizer.save_pretrained(saved)
        Path(saved, RENDERED_WITH).write_text(json.dumps(template_kwargs(tokenizer)))  # not saved with it
        encode = functools.partial(_encode_piece, saved, max_len, every_token, where)
        try:
            for _, (examples, counted) in computed(chunks(enumerate(rows, 1), PIECE), encode, lambda numbered: numbered,
                                                   workers):
                tally.update(counted)
                yield from examples
        finally:
            _saved_tokenizer.cache_clear()  # this process's copy, for the first piece


def _encode_piece(saved: str, max_len: int, every_token: bool, where: str,
                  numbered: list[tuple[int, dict]]) -> tuple[list[dict], Counter]:
    """A piece's examples (rows numbered as the split's), as compact arrays to send back, and their tally."""
    tally = Counter()
    examples = encoded(_saved_tokenizer(saved), [row for _, row in numbered], max_len, every_token, where,
                       first=numbered[0][0], tally=tally)
    return [{"input_ids": np.asarray(e["input_ids"], np.int32), "labels": np.asarray(e["labels"], np.int32)}
            for e in examples], tally


@functools.lru_cache(maxsize=1)
def _saved_tokenizer(saved: str):
    from transformers import AutoTokenizer  # noqa: PLC0415

    if multiprocessing.parent_process() is not None:  # a worker: a CPU each, not a thread a CPU each
        os.environ["RAYON_NUM_THREADS"] = "1"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    set_template_kwargs(tokenizer, json.loads(Path(saved, RENDERED_WITH).read_text()))
    return tokenizer


def location(tokenizer, dataset_uri: str, split: str, max_len: int, every_token: bool, scope: str) -> Path:
    """The directory of a split's files for a run (`scope`), named by all that decides its tokens."""
    key = json.dumps([scope, dataset_uri, split, max_len, every_token, fingerprint(tokenizer)])
    return ROOT / f"llmfactory-tokens-{split}-{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}"


def fingerprint(tokenizer) -> str:
    """What decides a tokenizer's ids: its vocabulary, merges, normalizers and added tokens (not the
    truncation and padding a call leaves set on it), and its chat template and the arguments it renders
    with."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                                if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        described = repr(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else repr(tokenizer.chat_template)
    rendered_with = json.dumps(template_kwargs(tokenizer), sort_keys=True)
    return hashlib.blake2b((described + template + rendered_with).encode(), digest_size=16).hexdigest()
