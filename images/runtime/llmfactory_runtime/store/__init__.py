"""The artifact store: s3:// and file://, and the run layout of DESIGN.md.

    <store>/<namespace>/<kind>/<name>/<task-digest>/
        task.json  progress.json  result.json  COMMITTED  ...outputs
"""

from __future__ import annotations

from typing import Any

from .base import COMMIT_MARKER, Store

TASK, PROGRESS, RESULT = "task.json", "progress.json", "result.json"


def open_store(uri: str) -> Store:
    if uri.startswith("s3://"):
        from .s3 import S3Store
        return S3Store(uri)
    if uri.startswith("file://"):
        from .file import FileStore
        return FileStore(uri)
    raise ValueError(f"unsupported store URI {uri!r}: use s3://bucket/prefix or file:///absolute/path")


def finished_result(run: Store) -> dict[str, Any] | None:
    """A run's result, only once the run committed it (a crash mid-write leaves no result)."""
    if not run.is_committed():
        return None
    return run.read_json(RESULT)


def write_result(run: Store, result: dict[str, Any]) -> None:
    run.write_json(RESULT, result)
    run.commit()


__all__ = ["COMMIT_MARKER", "PROGRESS", "RESULT", "TASK", "Store", "finished_result", "open_store", "write_result"]
