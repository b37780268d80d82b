"""Will it fit? The planner checked a FineTune with what it could read offline; the runtime checks
again with the model's real config, the precision `auto` resolved to and the GPU it got, and refuses,
with the numbers, what cannot fit before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..grader import grader_models
from ..models import load_config
from ..task import InvalidTask
from .distributed import World
from .estimate import Estimate, ModelShape, Plan, as_dequantized, does_not_fit, estimate, plan_of, shape_from_config
from .model_setup import DTYPES, gpu_memory_gib, qlora_dequantized


@dataclass(frozen=True)
class Budget:
    shape: ModelShape
    plan: Plan
    graders: tuple[tuple[ModelShape, str], ...]  # the models a grpo grader loads in each process
    gpu_gib: tuple[float, float] | None  # (total, free) of this process's GPU; None on CPU
    dequantize: bool  # qlora: its 4-bit weights dequantized once (spec.qlora.dequantizeOnce)
    estimate: Estimate  # what the run trains under

    def with_token_rows(self, rows: int) -> Budget:
        """The budget once the model is loaded and shows `rows` embedding rows to train beside the
        adapters (chat markers the base never trained); refused if that no longer fits."""
        if rows <= self.plan.new_token_rows:
            return self
        plan = replace(self.plan, new_token_rows=rows)
        est = estimate(self.shape, as_dequantized(plan) if self.dequantize else plan, self.graders)
        problem = self.gpu_gib and does_not_fit(est, self.gpu_gib[0], plan)
        if problem:
            raise InvalidTask(f"spec.resources: {problem} (with the chat markers' rows the base model never "
                              f"trained, {rows}, which LoRA trains beside the adapters)")
        return replace(self, plan=plan, estimate=est)


def check(spec: dict[str, Any], config, world: World, dtype: torch.dtype, new_token_rows: int) -> Budget:
    """The run's budget on one of world's processes (config: the base model's); `new_token_rows`: the
    chat markers the tokenizer added. Raises InvalidTask, naming spec.resources, when it cannot fit the GPU."""
    shape = shape_from_config(config.to_dict())
    precision = next(name for name, d in DTYPES.items() if d == dtype)
    plan = replace(plan_of({**spec, "hyperparameters": {**spec["hyperparameters"], "precision": precision},
                            "resources": {"gpusPerNode": world.size, "nodes": 1}}), new_token_rows=new_token_rows)
    grpo = spec["grpo"] if spec.get("objective") == "grpo" else None
    graders = tuple((shape_from_config(load_config(source).to_dict()), operation)
                    for source, operation in grader_models(grpo["grader"] if grpo else None))
    est = estimate(shape, plan, graders)
    gpu_gib = gpu_memory_gib(world.device)
    if gpu_gib:
        problem = does_not_fit(est, gpu_gib[0], plan)
        if problem:
            raise InvalidTask(f"spec.resources: {problem}")
    dequantized = qlora_dequantized(spec, shape, plan, gpu_gib, graders)
    return Budget(shape, plan, graders, gpu_gib, dequantized is not None, dequantized or est)
