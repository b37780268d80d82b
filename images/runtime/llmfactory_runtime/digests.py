"""sha256 over files, streamed: model weights are gigabytes and must not be read whole."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable


def sha256_files(paths: Iterable[Path]) -> str:
    """Hex digest of the files' bytes, concatenated in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
