"""file:// artifact store: a local directory (the local runner's default, ./artifacts)."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from .base import Store, atomic_write


class FileStore(Store):
    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URIs must be absolute paths (file:///...), got {uri}")
        self.root = Path(unquote(parsed.path))
        self.uri = f"file://{self.root.as_posix()}"

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def child(self, rel: str) -> "FileStore":
        return FileStore(f"file://{self._path(rel).as_posix()}")

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write(self._path(rel), data)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def list(self, rel: str = "") -> list[str]:
        base = self._path(rel)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def delete_prefix(self, rel: str = "") -> None:
        shutil.rmtree(self._path(rel), ignore_errors=True)

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def upload_file(self, local: Path, rel: str) -> None:
        atomic_write(self._path(rel), source=local)  # two processes may upload the same file

    def local_path(self, rel: str) -> Path:
        return self._path(rel)

    def download_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(rel), local)
