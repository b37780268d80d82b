"""A FineTune's evaluation on the validation split, by objective, shared among the processes; and
what selectBest and earlyStopping read from the evaluations.

Evaluation draws no random numbers, so training goes on as if it had not happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..batching import loss_sums
from ..preference import dpo_terms, kto_agrees, kto_terms, pair_logps, pair_margins
from ..reward_model import evaluate_pairs, reward_terms
from . import grpo as group_relative
from .distributed import World
from .encoding import Split


def best_step(evals: list[tuple[int, float]]) -> int | None:
    """The step of the lowest validation loss (the earliest of equals)."""
    return min(evals, key=lambda e: (e[1], e[0]))[0] if evals else None


def evaluations_without_improvement(losses: list[float], min_delta: float) -> int:
    """How many of the last evaluations in a row did not beat the best before them by more than
    min_delta (what earlyStopping's patience counts)."""
    best, since = math.inf, 0
    for loss in losses:
        best, since = (loss, 0) if loss < best - min_delta else (best, since + 1)
    return since


@dataclass(frozen=True)
class Share:
    """How the processes split an evaluation: every size-th item each, the figures summed; except
    under ZeRO-3, whose forwards are collective (every process runs every batch)."""

    world: World
    zero3: bool

    def mine(self, items: list) -> list:
        return items if self.zero3 else items[self.world.rank::self.world.size]

    def add(self, value):
        return value if self.zero3 else self.world.sum(value)


class Validation(NamedTuple):
    loss: float | None  # token-weighted (dpo, kto, reward: the mean over pairs or examples); none for grpo
    rewards: tuple[float, float] | None  # dpo, kto, reward: (accuracy, margin); grpo: (mean reward, answer tokens)

    def metrics(self, objective: str) -> dict[str, float]:
        """For the trackers, by the names TRL's trainers log."""
        if self.rewards and objective == "grpo":
            return {"eval/reward": self.rewards[0], "eval/completion_length": self.rewards[1]}
        if self.loss is None:
            return {}
        paired = {"eval/rewards/accuracy": self.rewards[0], "eval/rewards/margin": self.rewards[1]} if self.rewards else {}
        return {"eval/loss": self.loss} | paired


def validate(spec: dict[str, Any], model, tokenizer, val: Split, reference: torch.Tensor | None, share: Share,
             device, cache_uri: str) -> Validation:
    """The model on the validation split: its loss, and the objective's reward figures. `reference`:
    dpo, kto: the reference model's answer log-probabilities of the split. An empty split has neither."""
    objective, hp = spec.get("objective", "sft"), spec["hyperparameters"]
    micro, pad_id = hp["batchSize"], tokenizer.pad_token_id
    if objective == "grpo":  # its greedy answers' mean reward
        mine = share.mine(val.examples)
        got, answer_tokens = group_relative.greedy_rewards(model, tokenizer, mine, micro, spec["grpo"], hp["maxSeqLength"],
                                                           device, cache_uri)
        count = share.add(len(mine))
        return Validation(None, (share.add(got) / count, share.add(answer_tokens) / count) if count else None)
    if objective == "sft":
        total, count = (share.add(x) for x in loss_sums(model, share.mine(val.examples), micro, pad_id, device))
        return Validation(total / count if count else None, None)
    mine = share.mine(list(range(val.units)))
    count = share.add(len(mine))
    if objective == "kto":  # the reference point from the whole split's mismatched conversations
        logps = pair_logps(model, val.examples, mine, micro, pad_id, device).cpu()
        ref, good, beta = reference[mine], val.desirable[mine], spec["kto"]["beta"]
        kl = max(share.add(float((logps[:, 1] - ref[:, 1]).sum())) / max(count, 1), 0.0)
        losses, reward = kto_terms(logps[:, 0], ref[:, 0], kl, good, spec["kto"])
        agreed = share.add(float(kto_agrees(reward, kl, good, beta).sum()))
        sides = [(share.add(float(reward[side].sum())), share.add(int(side.sum()))) for side in (good, ~good)]
        # the mean reward of the desirable answers minus the undesirable ones' (a side absent: 0)
        rewards = (agreed / max(count, 1), sum(sign * r / max(n, 1) for sign, (r, n) in zip((1, -1), sides)))
    else:
        if objective == "reward":
            losses, margins = reward_terms(evaluate_pairs(model, val.examples, mine, micro, pad_id, device), spec["reward"],
                                           pair_margins(val.examples, mine))
        else:
            losses, margins = dpo_terms(pair_logps(model, val.examples, mine, micro, pad_id, device).cpu(),
                                        reference[mine] if reference is not None else None, val.answer_tokens[mine],
                                        spec["dpo"])
        rewards = (share.add(float((margins > 0).sum())) / max(count, 1), share.add(float(margins.sum())) / max(count, 1))
    total = share.add(float(losses.sum()))
    return Validation(total / count, rewards) if count else Validation(None, None)
