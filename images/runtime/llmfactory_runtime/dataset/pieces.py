"""A stream of rows in pieces, and a pure function of each piece computed in worker processes, in
order: what language detection and the MinHash signatures spend their time on, spread over the
pod's CPUs, while the decisions that depend on the rows before (a duplicate of which kept one?)
stay in one process, so the outcome is the same with one process or many."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from ..cpus import available


# Beyond this many workers the build's own process is the bottleneck (a text build's reading, exact
# keys, band lookups, the spill: ~20% of a document's time); each worker holds ~150 MB (the language model).
MAX_WORKERS = 8


class Workers:
    """Worker processes, started when the first piece is handed to them: a stream of one piece (a
    small build) starts none."""

    def __init__(self, count: int):
        self.count, self.pool = count, None

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self.pool is None:
            # spawn: a forked copy of a process that has started threads (boto3's, torch's) may hang
            self.pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"))
        return self.pool.submit(fn, *args)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def computed(pieces: Iterable[list[Any]], fn: Callable[[list[Any]], list[Any]], read: Callable[[Any], Any],
             workers: Workers | None) -> Iterator[tuple[list[Any], list[Any]]]:
    """(piece, fn([read(item) for item in piece])) for each piece, in order: the first here, the others
    by the workers, two pieces a worker in flight (fn picklable: a module's function), or here without."""
    pieces = iter(pieces)
    # The first piece here: a stream of one piece starts no process (once started, they take it too).
    for piece in pieces if workers is None else itertools.islice(pieces, 0 if workers.pool else 1):
        yield piece, fn([read(item) for item in piece])
    if workers is None:
        return
    pending: deque = deque()
    for piece in pieces:
        pending.append((piece, workers.submit(fn, [read(item) for item in piece])))
        if len(pending) >= 2 * workers.count:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def pod_workers() -> contextlib.AbstractContextManager[Workers | None]:
    """Processes for language detection and MinHash signatures, one a CPU the pod may use (none with one),
    at most MAX_WORKERS."""
    count = min(available(), MAX_WORKERS)
    return Workers(count) if count > 1 else contextlib.nullcontext()
