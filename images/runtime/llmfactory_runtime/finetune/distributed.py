"""The processes of one training run: who am I, and the few collectives the loop needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a world of one and every
collective is the identity. gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """The sum of a number over all processes."""
        if self.size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of a tensor over all processes (on the tensor's device)."""
        if self.size == 1:
            return value
        t = value.to(self.device)
        dist.all_reduce(t)
        return t.to(value.device)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's 1-d tensor (lengths may differ), concatenated in rank order."""
        if self.size == 1:
            return values
        t = values.to(self.device)
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([t.numel()], device=self.device))
        padded = torch.zeros(max(*(int(n) for n in sizes), 1), dtype=t.dtype, device=self.device)
        padded[:t.numel()] = t
        out = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(out, padded)
        return torch.cat([o[:int(n)] for o, n in zip(out, sizes)]).to(values.device)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's picklable value, in rank order."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of obj, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextlib.contextmanager
def node_first(world: World, needed: bool = True) -> Iterator[None]:
    """Collective (`needed` the same on every process): each node's first process (local rank 0) runs
    the block before the node's others do, so that what it leaves on the node's disk (a GGUF base
    dequantized into the cache) is there for them to read, not made again by each."""
    if not needed or world.size == 1:
        yield
        return
    if world.local_rank != 0:
        world.barrier()
    yield
    if world.local_rank == 0:
        world.barrier()


def init() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        # Long timeout: rank 0 may spend minutes uploading a checkpoint while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def group_of_one(world: World) -> None:
    """A process group of this process alone, and the launcher's variables that DeepSpeed asks for, where
    no launcher set them (a one-GPU pod runs the runtime without torchrun): without them, DeepSpeed looks
    for MPI to find its peers, then refuses to start."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def shutdown(world: World) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_config(distribution: dict[str, Any], hp: dict[str, Any], dtype: torch.dtype, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config a FineTune's spec implies. Batch sizes, clipping and precision come
    from the hyperparameters, so the same spec trains the same way with or without DeepSpeed."""
    stage, offload = distribution.get("zeroStage") or 2, distribution.get("offload") == "cpu"
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": hp["batchSize"],
        "gradient_accumulation_steps": hp["gradientAccumulation"],
        "gradient_clipping": hp["maxGradNorm"],
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": hp["learningRate"], "weight_decay": hp["weightDecay"], "betas": [0.9, 0.999], "eps": 1e-8,
            # Without CUDA, plain torch AdamW: DeepSpeed's fused kernels need a GPU.
            "torch_adam": not on_gpu and not offload}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
