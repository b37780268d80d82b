"""Reading the task document: the runtime's only input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .store import TASK, read_file


class InvalidTask(ValueError):
    """The task cannot run as written; retrying will not help (exit code 2)."""


def load_task(location: str) -> dict[str, Any]:
    """A task from a local path (the Job's mounted ConfigMap) or a store URI of task.json or its run."""
    if location.startswith(("s3://", "file://")):
        uri = location if location.endswith(".json") else f"{location.rstrip('/')}/{TASK}"
        task = json.loads(read_file(uri))
    else:
        task = json.loads(Path(location).read_text())
    for key in ("phase", "spec", "inputs", "digest", "artifactUri"):
        if key not in task:
            raise InvalidTask(f"task document lacks {key!r}")
    return task
