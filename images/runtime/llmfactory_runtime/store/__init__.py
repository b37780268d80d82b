"""The artifact store: s3:// and file://, and the run layout of DESIGN.md.

    <store>/<namespace>/<kind>/<name>/<task-digest>/
        task.json  progress.json  result.json  COMMITTED  ...outputs
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .base import COMMIT_MARKER, Store

TASK, PROGRESS, RESULT = "task.json", "progress.json", "result.json"
SHARDS = "shards"  # shards/<index>/: one shard of a sharded run, with its own progress and result


def open_store(uri: str) -> Store:
    if uri.startswith("s3://"):
        from .s3 import S3Store
        return S3Store(uri)
    if uri.startswith("file://"):
        from .file import FileStore
        return FileStore(uri)
    raise ValueError(f"unsupported store URI {uri!r}: use s3://bucket/prefix or file:///absolute/path")


def read_file(uri: str) -> bytes:
    """One file named by its whole URI (a questions file, a task document, a source's rows)."""
    folder, name = uri.rstrip("/").rsplit("/", 1)
    return open_store(folder).read_bytes(name)


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """The file a URI names as a local path, to read in pieces (a corpus larger than memory): a
    file:// URI's own, an s3:// object's download in a temporary directory, deleted after.
    FileNotFoundError when there is none."""
    folder, name = uri.rstrip("/").rsplit("/", 1)
    store = open_store(folder)
    path = store.local_path(name)
    if path is not None:  # file://: read where it is
        if not path.is_file():
            raise FileNotFoundError(uri)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        store.download_file(name, Path(tmp) / name)
        yield Path(tmp) / name


def finished_result(run: Store) -> dict[str, Any] | None:
    """A run's result, only once the run committed it (a crash mid-write leaves no result)."""
    if not run.is_committed():
        return None
    return run.read_json(RESULT)


def read_progress(run: Store) -> dict[str, Any] | None:
    """The run's progress.json; for a sharded run that has not reached its merge yet, the
    shards' progress summed (one figure for the operator's status and the local runner)."""
    own = run.read_json_or_none(PROGRESS)
    if own is not None:
        return own
    names = [n for n in run.list(SHARDS) if n.endswith(f"/{PROGRESS}")]
    parts = [p for p in (run.read_json_or_none(f"{SHARDS}/{n}") for n in names) if p]
    if not parts:
        return None
    done, total = sum(p.get("done") or 0 for p in parts), sum(p.get("total") or 0 for p in parts)
    failed = next((p for p in parts if p.get("state") == "Failed"), None)
    finished = sum(p.get("state") == "Succeeded" for p in parts)
    return {"state": "Failed" if failed else "Running", "message": (failed or {}).get("message", ""),
            "stage": f"{parts[0].get('stage') or 'working'} ({finished}/{len(parts)} shards done)",
            "done": done, "total": total or None, "unit": parts[0].get("unit"),
            "percent": round(100.0 * done / total, 1) if total else None,
            "etaSeconds": max((p.get("etaSeconds") or 0 for p in parts), default=None),
            "figure": f"{len(parts)} shards: " + ", ".join(str(p.get("figure") or p.get("stage")) for p in parts[:4])
                      + (", ..." if len(parts) > 4 else "")}


def write_result(run: Store, result: dict[str, Any]) -> None:
    run.write_json(RESULT, result)
    run.commit()


__all__ = ["COMMIT_MARKER", "PROGRESS", "RESULT", "SHARDS", "TASK", "Store", "finished_result", "open_store",
           "local_copy", "read_file", "read_progress", "write_result"]
