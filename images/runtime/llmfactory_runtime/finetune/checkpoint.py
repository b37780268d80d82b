"""Training checkpoints in the artifact store: checkpoints/step-N/, trusted only once COMMITTED.

Every process writes its own files (rank 0 the shared state, each rank its RNG state or its
ZeRO shard) into a local folder and uploads them; after a barrier rank 0 writes the commit
marker. A save cut short by a kill has no marker and is never resumed from.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Callable

from ..store import COMMIT_MARKER, Store
from .distributed import World

PREFIX = "checkpoints"
# Files that belong to one rank: ours (rng-<rank>.pt) and DeepSpeed's ([bf16_]zero_pp_rank_<rank>_...).
_RANK_FILE = re.compile(r"(?:^|/)rng-(\d+)\.pt$|zero_pp_rank_(\d+)_")
log = logging.getLogger(__name__)


def _rel(step: int) -> str:
    return f"{PREFIX}/step-{step}"


def _steps(run: Store) -> tuple[set[int], set[int]]:
    """(every step with files, the committed ones)."""
    seen, committed = set(), set()
    for key in run.list(PREFIX):
        head, _, tail = key.partition("/")
        if head.startswith("step-") and head[5:].isdigit():
            seen.add(int(head[5:]))
            if tail == COMMIT_MARKER:
                committed.add(int(head[5:]))
    return seen, committed


def latest(run: Store, world: World) -> int | None:
    """The newest committed checkpoint's step, the same on every process."""
    step = max(_steps(run)[1], default=None) if world.main else None
    return world.broadcast(step)


def save(run: Store, world: World, step: int, write: Callable[[Path], None], keep_last: int,
         pinned: int | None = None) -> None:
    """Collective: each process writes and uploads its files, then rank 0 commits and prunes
    (keeping `pinned`, the best evaluation's checkpoint, too)."""
    rel = _rel(step)
    with tempfile.TemporaryDirectory(prefix="llmfactory-ckpt-") as tmp:
        local = Path(tmp)
        write(local)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in files:
            run.upload_file(path, f"{rel}/{path.relative_to(local).as_posix()}")
    world.barrier()  # every rank's files are up
    if world.main:
        run.commit(rel, {"step": step, "processes": world.size})
        log.info("checkpoint committed: %s/%s", run.uri, rel)
        prune(run, keep_last, pinned)
    world.barrier()


def prune(run: Store, keep_last: int, pinned: int | None = None) -> None:
    """Delete all but the newest keep_last committed checkpoints (and `pinned`), and leftovers of
    cut-short saves older than the newest committed one. The marker goes first: a half-deleted one
    is not trusted."""
    seen, committed = _steps(run)
    keep = set(sorted(committed)[-keep_last:]) | {pinned}
    newest = max(committed, default=-1)
    for step in sorted(seen - keep):
        if step in committed or step < newest:
            run.delete(f"{_rel(step)}/{COMMIT_MARKER}")
            run.delete_prefix(_rel(step))


def download(run: Store, step: int, local: Path, world: World) -> Path:
    """This process's share of a committed checkpoint: the shared files and its own rank's RNG state
    and ZeRO shards, not the other ranks' (eight processes on a node would otherwise each fetch
    every shard: eight times the traffic and the disk)."""
    def wanted(key: str) -> bool:
        owner = _RANK_FILE.search(key)
        return owner is None or int(owner.group(1) or owner.group(2)) == world.rank
    return run.download_dir(_rel(step), local, wanted=wanted)
