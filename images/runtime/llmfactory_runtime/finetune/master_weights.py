"""fp32 master copies of a 16-bit model's trainable weights, which the optimizer updates.

A bf16 weight cannot take an update smaller than half its precision step (1/512 to 1/256 of its
value): at a full fine-tune's usual learning rates (1e-5) most of Adam's updates round away, and
pure-bf16 AdamW leaves most weights where they were. fp16 is worse: Adam's eps (1e-8) rounds to 0,
so a weight without a gradient (the embedding of a token the batch lacks) becomes 0/0 at the first
step. So, as DeepSpeed's bf16 and fp16 modes and Megatron do, the model runs in 16 bits and the
optimizer holds fp32 weights and moments: after backward the gradients are copied up, after the
step the weights are copied down. Adapters train the same way (model_setup._train_in).
"""

from __future__ import annotations

import torch


class MasterWeights:
    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        self.names = [name for name, _ in named]
        self.model = [p for _, p in named]
        self.params = [torch.nn.Parameter(p.detach().float()) for p in self.model]

    @staticmethod
    def needed(params: list[torch.nn.Parameter]) -> bool:
        return any(p.dtype != torch.float32 for p in params)

    def gradients_up(self) -> None:
        """After backward: the model's 16-bit gradients, in fp32, on the master weights."""
        for master, p in zip(self.params, self.model):
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def weights_down(self) -> None:
        """After the optimizer's step: the model's weights, rounded from the master weights."""
        for master, p in zip(self.params, self.model):
            p.copy_(master)

    def state(self) -> dict[str, torch.Tensor]:
        """The trainable weights at full precision, by name (for checkpoints: a resumed run goes on from them)."""
        return {name: p.detach().cpu().contiguous() for name, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, master in zip(self.names, self.params):
            master.copy_(state[name])
        self.weights_down()
