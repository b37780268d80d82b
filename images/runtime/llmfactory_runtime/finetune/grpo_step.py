"""One step of objective grpo as the training loop runs it (the face of steps.py's step objects): the
step's prompts sampled and scored (with dynamic sampling's replacements), each micro-batch's loss over
the step's updates, and the figures the step reports (progress.json, trackers). The loss itself is
grpo.loss_terms."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from ..batching import label_count, token_logps
from ..chat import IGNORE
from ..generate import stop_token_ids, to_generation
from . import grpo as group_relative
from .distributed import World


# What GrpoStep.loss adds up over a step's micro-batches
FIGURES = ("trained", "entropy", "samplerDifference", "samplerMasked", "answersTrained", "kl", "clipped",
           "offPolicyMasked")


class GrpoStep:
    """The step's samples on this process, its normalizer over all processes, and the figures its
    micro-batches add up as they train."""

    def __init__(self, model, tokenizer, grpo: dict[str, Any], world: World, chunks: list[list[dict]],
                 reserve: list[dict], draw: Callable[[list[list[dict]]], list[group_relative.Groups]], micro: int):
        """`chunks`: the micro-batches' prompts; `reserve`: spare prompts for grpo.dynamicSampling; `draw`:
        grpo.draw for this run's model, sampler and grader."""
        self.grpo, self.world = grpo, world
        groups = draw(chunks)
        self.drawn = list(groups)  # every group sampled in the step: the step's reward and answer figures
        if reserve:
            groups, later = group_relative.dynamic_sampling(
                groups, reserve, lambda fresh: draw([fresh[i:i + micro] for i in range(0, len(fresh), micro)]))
            self.drawn += later
        self.groups = groups
        self.batch_std = (group_relative.rewards_std([g.rewards for g in groups], world.sum_tensor)
                          if grpo["scaleRewards"] == "batch" else None)
        self.sampled = [group_relative.sampled_batch(model, tokenizer, g, grpo, world.device, self.batch_std)
                        for g in groups]
        self.batches = [(s["batch"], None) for s in self.sampled]
        # Answer tokens in the loss, all processes (at least 1: with maskTruncated every answer may be out).
        self.answer_tokens = max(world.sum(sum(s["labelled"] for s in self.sampled)), 1)
        self.answers = world.sum(sum(len(g.answers) for g in groups))
        self.normalizer = group_relative.normalizer(grpo, self.answer_tokens, self.answers)  # of the summed loss
        self.answers_drawn = world.sum(sum(len(g.answers) for g in self.drawn))
        self.mean_reward = world.sum(float(sum(g.rewards.sum() for g in self.drawn))) / self.answers_drawn
        self.figures: collections.Counter = collections.Counter()  # sums of loss_terms' figures, and the entropy's
        # With grpo.iterations, several optimizer steps on the step's samples: the first one's
        # log-probabilities (the sampling policy's) kept as the ratio's denominator for the others.
        self.old_logps: dict[int, torch.Tensor] = {}

    def tokens(self, i: int) -> int:
        """Tokens of micro-batch i's sequences (prompts and answers, unpadded)."""
        return self.sampled[i]["tokens"]

    def loss(self, engine, batch: dict[str, torch.Tensor], counts: None, i: int) -> torch.Tensor:
        """Micro-batch i's loss (batch: on the device), its share of the step's normalized loss."""
        grpo, sampled = self.grpo, self.sampled[i]
        logps, entropies = token_logps(engine, batch, entropies=True)
        keep = (group_relative.high_entropy(entropies, batch["labels"], grpo["topEntropyQuantile"], self.world.gather)
                if grpo["topEntropyQuantile"] < 1 else None)
        terms = group_relative.loss_terms(logps, batch["labels"], sampled["advantages"], sampled["reference"], grpo,
                                          self.old_logps.get(i), sampled["samplerLogps"], keep)
        if i not in self.old_logps:  # the sampling policy's figures, from the first update
            self.figures["trained"] += label_count(batch)
            self.figures["entropy"] += float(entropies.sum())  # 0 off the answer tokens
            self.figures["samplerDifference"] += terms.sampler_difference
            self.figures["samplerMasked"] += terms.sampler_masked
            self.figures["answersTrained"] += int((batch["labels"][:, 1:] != IGNORE).any(1).sum())
            self.old_logps[i] = logps.detach()
        self.figures["kl"] += terms.kl
        self.figures["clipped"] += terms.clipped
        self.figures["offPolicyMasked"] += terms.off_policy_masked
        return terms.loss / self.normalizer

    def completions(self, tokenizer, prompts: int) -> list[dict[str, Any]]:
        """The first `prompts` prompts this process trained on in the step (grpo.logCompletions), each with
        its answers as the grader read them, their rewards (and parts'), advantages and whether each was cut."""
        rows, stop = [], stop_token_ids(tokenizer)
        for g in self.groups:
            advantages = group_relative.advantages(g.rewards, g.generations, self.grpo["scaleRewards"], self.batch_std)
            for p, prompt in enumerate(g.prompts):
                answers = range(p * g.generations, (p + 1) * g.generations)
                rows.append({"prompt": prompt["messages"], "reference": prompt["reference"], "answers": [
                    {"text": to_generation(tokenizer, g.answers[a], stop).text,
                     "reward": round(float(g.rewards[a]), 4), "advantage": round(float(advantages[a]), 4),
                     "truncated": g.truncated[a], **({"parts": {name: round(float(got[a]), 4)
                                                                for name, got in g.parts.items()}} if g.parts else {})}
                    for a in answers]})
                if len(rows) == prompts:
                    return rows
        return rows

    def report(self, updates: int) -> dict[str, float]:
        """The step's figures, all processes (progress.json's names; trackers.TRAIN_METRICS maps them)."""
        grpo, world, drawn, n_drawn = self.grpo, self.world, self.drawn, self.answers_drawn
        # one reduction for all: every process reports every figure, in the same order
        sums = dict(zip(FIGURES, world.sum_tensor(torch.tensor([float(self.figures[n]) for n in FIGURES],
                                                                dtype=torch.float64)).tolist()))
        trained = max(sums["trained"], 1)  # answer tokens trained (rows with an advantage, or all with beta)
        out = {"reward": round(self.mean_reward, 4)}
        if grpo["beta"]:
            out["kl"] = round(sums["kl"] / (self.answer_tokens * updates), 6)  # per answer token
        for name in drawn[0].parts:  # a sum grader's parts: each one's mean reward
            out[f"reward.{name}"] = round(world.sum(float(sum(g.parts[name].sum() for g in drawn))) / n_drawn, 4)
        # the sampled answers' mean length, and the share that never ended (cut at the limit)
        out["answerLength"] = round(world.sum(sum(sum(map(len, g.answers)) for g in drawn)) / n_drawn, 2)
        out["truncated"] = round(world.sum(sum(sum(g.truncated) for g in drawn)) / n_drawn, 4)
        # Groups trained whose answers all scored alike: no advantage, nothing learned from them (left
        # out of the passes).
        uniform = world.sum(sum(len(g.uniform()) for g in self.groups))
        out["uniformGroups"] = round(uniform * grpo["generations"] / self.answers, 4)
        if grpo.get("dynamicSampling"):  # the step's prompts sampled, all processes: its trained ones and replacements
            out["promptsSampled"] = int(world.sum(sum(len(g.prompts) for g in drawn)))
        out["entropy"] = round(sums["entropy"] / trained, 4)
        # Sampled by vLLM: TRL's sampling_logp_difference, the engines' disagreement per answer token trained
        if drawn[0].sampler_logps is not None:
            out["samplerLogpDiff"] = round(sums["samplerDifference"] / trained, 6)
            if grpo["vllmImportanceSamplingCorrection"] and grpo["vllmImportanceSamplingMode"].endswith("mask"):
                out["samplerMasked"] = round(sums["samplerMasked"] / trained, 4)
        if grpo.get("offPolicyMaskThreshold"):  # answers trained (over the updates) masked as off the policy
            out["offPolicyMasked"] = round(sums["offPolicyMasked"]
                                           / max(sums["answersTrained"] * updates, 1), 4)
        if updates > 1:  # the share of answer tokens whose ratio was clipped, after the first update
            out["clipped"] = round(sums["clipped"] / (self.answer_tokens * (updates - 1)), 4)
        return out
