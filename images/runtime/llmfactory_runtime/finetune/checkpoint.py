"""Training checkpoints in the artifact store: checkpoints/step-N/, trusted only once COMMITTED.

Every process writes its own files (rank 0 the shared state, each rank its RNG state or its
ZeRO shard) into a local folder and uploads them; after a barrier rank 0 writes the commit
marker. A save cut short by a kill has no marker and is never resumed from.
"""

from __future__ import annotations

import logging
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..store import COMMIT_MARKER, Store
from .distributed import World

PREFIX = "checkpoints"
# Files that belong to one rank: ours (rng-<rank>.pt) and DeepSpeed's ([bf16_]zero_pp_rank_<rank>_...).
_RANK_FILE = re.compile(r"(?:^|/)rng-(\d+)\.pt$|zero_pp_rank_(\d+)_")
log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What a run has done so far, beside its weights and optimizer: kept in each checkpoint's
    state.json, and what the result is made of."""

    history: list[tuple] = field(default_factory=list)  # outputs.HistoryRow of each step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    # By step: dpo, kto, reward: validation reward accuracy and margin; grpo: validation mean reward and answer tokens
    rewards: dict[int, tuple[float, float]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=lambda: {"tokens": 0.0, "positions": 0.0, "seconds": 0.0})
    # grpo: what all processes had asked of the grader's API endpoints (grpo.grader_usage), at the checkpoint
    grader_usage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self, step: int, loss_scale: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, "history": self.history, "counters": self.counters, "evals": self.evals,
                "rewards": [(s, *r) for s, r in self.rewards.items()], "lossScale": loss_scale,
                "graderUsage": self.grader_usage}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainingState:
        return cls([tuple(h) for h in saved["history"]], [tuple(e) for e in saved.get("evals", [])],
                   {step: tuple(r) for step, *r in saved.get("rewards", [])}, saved["counters"],
                   saved.get("graderUsage") or {})


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def drop_frozen_weights(deepspeed_dir: Path, model: torch.nn.Module) -> None:
    """Out of the module states DeepSpeed wrote (told exclude_frozen_parameters), the frozen weights it
    kept: it drops those named_parameters() yields, which names a tied weight once, so a frozen output
    head tied to the embeddings stays (113 MB of SmolLM2's fp32, 790 MB of Llama-3.2-3B's bf16 per
    checkpoint, beside an adapter of a few MB). The base they come from is loaded at every start."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    kept = frozen - {name for name, p in model.named_parameters() if not p.requires_grad}
    if not kept:  # a full fine-tune, or no frozen weight tied to another: nothing to read again
        return
    for path in deepspeed_dir.rglob("*model_states.pt"):
        states = torch.load(path, weights_only=False)
        if kept & set(states["module"]):
            states["module"] = {k: v for k, v in states["module"].items() if k not in kept}
            torch.save(states, path)


def drop_optimizer_shards(deepspeed_dir: Path) -> None:
    """Out of a ZeRO 2 checkpoint DeepSpeed wrote, this process's optimizer shard: its fp32 master weights
    and Adam's moments, 12 bytes a trained weight (96 GB of an 8B's full fine-tune, over its processes),
    beside the module states that hold the weights whole. A run resumed from it trains no further."""
    for shard in deepspeed_dir.rglob("*optim_states.pt"):
        shard.unlink()


def download(run: Store, step: int, local: Path, world: World) -> Path:
    """This process's share of a committed checkpoint: the shared files and its own rank's RNG state
    and ZeRO shards, not the other ranks' (eight processes on a node would otherwise each fetch
    every shard: eight times the traffic and the disk)."""
    def wanted(key: str) -> bool:
        owner = _RANK_FILE.search(key)
        return owner is None or int(owner.group(1) or owner.group(2)) == world.rank
    return run.download_dir(_rel(step), local, wanted=wanted)
