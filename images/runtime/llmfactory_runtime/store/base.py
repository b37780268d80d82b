"""The artifact store interface and what every backend shares (JSON, directories, commit markers)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

COMMIT_MARKER = "COMMITTED"


class Store(ABC):
    """A prefix in file:// or s3:// storage. Keys are '/'-separated paths relative to it."""

    uri: str

    @abstractmethod
    def child(self, rel: str) -> "Store": ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The object's content; FileNotFoundError when it is absent."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace the object atomically: readers see the old or the new content, never a part."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def list(self, rel: str = "") -> list[str]:
        """Keys under rel (recursive), relative to rel, sorted."""

    @abstractmethod
    def delete_prefix(self, rel: str = "") -> None: ...

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove one object; absent is fine."""

    def delete_many(self, rels: list[str]) -> None:
        """Remove these objects (absent ones are fine), as few requests as the store allows."""
        for rel in rels:
            self.delete(rel)

    @abstractmethod
    def upload_file(self, local: Path, rel: str) -> None: ...

    @abstractmethod
    def download_file(self, rel: str, local: Path) -> None: ...

    def local_path(self, rel: str) -> Path | None:
        """Where the object lies on this machine's disk, if it does (file://), else None."""
        return None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_json_or_none(self, rel: str) -> Any:
        try:
            return self.read_json(rel)
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True).encode())

    def once(self, rel: str, compute: Callable[[], Any]) -> Any:
        """compute()'s result (JSON), saved under rel: work a run does once, even across restarts."""
        found = self.read_json_or_none(rel)
        if found is None:
            found = compute()
            self.write_json(rel, found)
        return found

    def commit(self, rel: str = "", manifest: dict[str, Any] | None = None) -> None:
        """Mark everything under rel as complete. Write it last: readers trust only committed prefixes."""
        self.write_json(_join(rel, COMMIT_MARKER), manifest or {})

    def is_committed(self, rel: str = "") -> bool:
        return self.exists(_join(rel, COMMIT_MARKER))

    def upload_dir(self, local: Path, rel: str) -> None:
        """Upload a directory, then commit it: a partial upload is never mistaken for a finished one."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in files:
            self.upload_file(path, _join(rel, path.relative_to(local).as_posix()))
        self.commit(rel, {"files": {p.relative_to(local).as_posix(): p.stat().st_size for p in files}})

    def download_dir(self, rel: str, local: Path, require_commit: bool = True,
                     wanted: Callable[[str], bool] = lambda key: True) -> Path:
        """Download a committed directory (its files that are `wanted`); refuse an uncommitted one
        (unless told it was made elsewhere)."""
        if require_commit and not self.is_committed(rel):
            raise FileNotFoundError(f"{_join(self.uri, rel)} is not a committed directory")
        local = Path(local)
        for key in self.list(rel):
            if key != COMMIT_MARKER and wanted(key):
                self.download_file(_join(rel, key), local / key)
        return local


def _join(a: str, b: str) -> str:
    return f"{a.rstrip('/')}/{b}" if a else b


def atomic_write(path: Path, data: bytes | None = None, source: Path | None = None) -> None:
    """Write `data` (or copy `source`) to `path` so that a reader sees the old file or the new one,
    never a part: through a temporary file of this thread's own, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    if source is None:
        tmp.write_bytes(data)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
