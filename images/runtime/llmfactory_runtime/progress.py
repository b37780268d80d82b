"""progress.json: what the operator copies into status.progress and the local runner draws."""

from __future__ import annotations

import time
from typing import Any

from .store import PROGRESS, Store


class Progress:
    """Throttled writer of progress.json for one stage of work (rows, steps, questions...)."""

    def __init__(self, run: Store, min_interval: float = 1.0, writes: bool = True):
        # writes=False: a process other than rank 0 (one writer of progress.json per run)
        self.run, self.min_interval, self.writes = run, min_interval, writes
        self.started = time.time()
        self.state: dict[str, Any] = {"state": "Running", "startedAt": self.started}
        self._written = 0.0

    def stage(self, name: str, total: int | None = None, unit: str | None = None) -> None:
        """Start a new stage; done/total count within it."""
        self._stage_started = time.time()
        self.state.update(stage=name, total=total, unit=unit, done=0, percent=0.0 if total else None,
                          etaSeconds=None)
        self._write(force=True)

    def update(self, done: int, figure: str | None = None, **figures: Any) -> None:
        total = self.state.get("total")
        self.state["done"] = done
        if total:
            self.state["percent"] = round(100.0 * done / total, 1)
            elapsed = time.time() - self._stage_started
            self.state["etaSeconds"] = round(elapsed / done * (total - done), 1) if done else None
        if figure is not None:
            self.state["figure"] = figure
        self.state.setdefault("figures", {}).update(figures)
        self._write(force=bool(total) and done >= total)

    def finish(self, state: str, message: str = "") -> None:
        self.state.update(state=state, message=message)
        if state == "Succeeded":
            self.state.update(percent=100.0, etaSeconds=0)
        self._write(force=True)

    def _write(self, force: bool) -> None:
        now = time.time()
        if self.writes and (force or now - self._written >= self.min_interval):
            self.state["updatedAt"] = now
            self.run.write_json(PROGRESS, self.state)
            self._written = now
