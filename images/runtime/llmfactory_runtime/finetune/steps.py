"""A training step's micro-batches and their losses, by objective (grpo's: grpo_step).

Each step object has the same face for the training loop: `batches`, a list of (batch, counts)
(counts: the conversations of each row, where the loss reads them by conversation), `loss(engine,
batch, counts, i)` (micro-batch i's share of the step's loss, normalized over the whole step on all
processes), `tokens(i)` (its unpadded tokens, for tokens/s) and `report(updates)` (the step's
figures for progress.json, all processes).
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import collate_sequences, label_count
from ..preference import (answer_logps, collate_pairs, dpo_terms, kto_agrees, kto_terms, pair_margins,
                          segment_logps)
from ..reward_model import pair_batch, pair_rewards, reward_terms
from .distributed import World
from .encoding import Split


class SftStep:
    """Conversations, packed or one per row; the loss token-weighted over the step's assistant tokens."""

    def __init__(self, data: Split, micro_batches: list[list[list[int]]], pad_id: int, packing: bool, world: World):
        self.data, self.micro_batches = data, micro_batches
        self.batches = [(collate_sequences(data.examples, group, pad_id, packing), None) for group in micro_batches]
        self.normalizer = world.sum(sum(label_count(b) for b, _ in self.batches))  # assistant tokens

    def loss(self, engine, batch: dict[str, torch.Tensor], counts: None, i: int) -> torch.Tensor:
        return engine(**batch, num_items_in_batch=self.normalizer, use_cache=False).loss

    def tokens(self, i: int) -> int:
        return sum(self.data.lengths[j] for row in self.micro_batches[i] for j in row)

    def report(self, updates: int) -> dict[str, Any]:
        return {}


class PreferenceStep:
    """dpo and reward: preference pairs; kto: examples labelled desirable or not. The loss is the mean
    over the step's pairs (examples); rewardAccuracy the share of them the model prefers as labelled.
    `reference`: dpo (but simpo, orpo), kto: the reference model's answer log-probabilities of the
    train split. KTO's reference point is computed here first, from the step's mismatched
    conversations on all processes, without gradients (as in TRL)."""

    def __init__(self, spec: dict[str, Any], model, data: Split, reference: torch.Tensor | None,
                 micro_batches: list[list[list[int]]], pad_id: int, world: World):
        self.objective, self.settings = spec["objective"], spec[spec["objective"]]
        self.data, self.reference, self.world = data, reference, world
        self.items = [[k for row in group for k in row] for group in micro_batches]  # each micro-batch's pairs
        self.normalizer = world.sum(sum(map(len, self.items)))
        self.preferred = 0.0
        examples = data.examples
        if self.objective == "kto":
            self.batches = [self._kto_rows(group, 0, pad_id) for group in micro_batches]
            with torch.no_grad():
                shift = 0.0
                for group, items in zip(micro_batches, self.items):
                    batch, counts = self._kto_rows(group, 1, pad_id)
                    logps = segment_logps(model, {k: v.to(world.device) for k, v in batch.items()}, counts).cpu()
                    shift += float((logps - reference[items, 1]).sum())
            self.kl = max(world.sum(shift) / self.normalizer, 0.0)
        elif self.objective == "reward":
            self.batches = [(pair_batch(examples, items, pad_id), None) for items in self.items]
        else:
            self.batches = [collate_pairs(examples, group, pad_id) for group in micro_batches]

    def _kto_rows(self, group: list[list[int]], column: int, pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        """A batch of rows of KTO examples' own conversations (column 0) or mismatched ones (1)."""
        rows = [[2 * i + column for i in row] for row in group]
        return collate_sequences(self.data.examples, rows, pad_id, packed=True), [len(r) for r in rows]

    def loss(self, engine, batch: dict[str, torch.Tensor], counts: list[int] | None, i: int) -> torch.Tensor:
        items, settings = self.items[i], self.settings
        if self.objective == "kto":
            desirable = self.data.desirable[items]
            losses, reward = kto_terms(segment_logps(engine, batch, counts), self.reference[items, 0], self.kl,
                                       desirable, settings)
            self.preferred += float(kto_agrees(reward, self.kl, desirable, settings["beta"]).sum())
        else:
            if self.objective == "reward":
                losses, margins = reward_terms(pair_rewards(engine, batch), settings,
                                               pair_margins(self.data.examples, items))
            else:
                losses, margins = dpo_terms(answer_logps(engine, batch, counts),
                                            self.reference[items] if self.reference is not None else None,
                                            self.data.answer_tokens[items], settings)
            self.preferred += float((margins > 0).sum())
        return losses.sum() / self.normalizer

    def tokens(self, i: int) -> int:
        return sum(self.data.lengths[j] for j in self.items[i])

    def report(self, updates: int) -> dict[str, Any]:
        return {"rewardAccuracy": round(self.world.sum(self.preferred) / self.normalizer, 4)}  # of the step's pairs
