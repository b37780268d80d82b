"""A dataset split as a FineTune's objective trains on it (spec.objective), in tokens.

sft: conversations, labels on the assistant turns, and raw text (continued pre-training), labels on
every token, in pieces of maxSeqLength tokens. dpo, reward: preference pairs, each pair's chosen
and rejected conversations side by side (preference.encode_pairs). kto: examples, each its own
conversation beside a mismatched one (preference.encode_unpaired). grpo: prompts, whose answers each
step samples (grpo.encode_prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import encode_rows
from ..grader import check_scorable
from ..preference import encode_pairs, encode_unpaired, pair_lengths, token_counts
from . import grpo as group_relative

# What one unit of data (a row of the dataset, as training reads it) is, by objective
UNITS = {"sft": "conversation", "dpo": "pair", "reward": "pair", "kto": "example", "grpo": "prompt"}


@dataclass(frozen=True)
class Split:
    # conversations (and raw text's pieces); pairs' (KTO: examples') two conversations in turn; grpo's prompts
    examples: list[dict]
    lengths: list[int]  # tokens of each unit as packing places it (a pair's: both conversations')
    desirable: torch.Tensor | None = None  # kto: each example's label
    answer_tokens: torch.Tensor | None = None  # dpo, reward: (pairs, 2) answer tokens, what dpo_terms averages over
    ranks: list[float] | None = None  # grpo.promptOrder easyFirst: each prompt's pass rate, highest trained first

    @property
    def units(self) -> int:
        return len(self.lengths)


def encode(spec: dict, tokenizer, rows: list[dict], split: str) -> Split:
    """`rows` of the dataset's `split` (named in the error a malformed row gets) as spec.objective trains
    on them, each cut at hyperparameters.maxSeqLength (raw text: split into pieces of it); units with
    nothing to learn within it left out."""
    objective, max_len = spec.get("objective", "sft"), spec["hyperparameters"]["maxSeqLength"]
    where = f"spec.objective {objective}: {split}.jsonl"
    if objective == "grpo":
        check_scorable(spec["grpo"]["grader"], "spec.grpo.grader")  # before the model loads
        prompts = group_relative.encode_prompts(tokenizer, rows, max_len, spec["grpo"]["grader"], where)
        easy_first = split == "train" and spec["grpo"].get("promptOrder") == "easyFirst"
        return Split(prompts, [len(e["prompt"]) for e in prompts],
                     ranks=group_relative.pass_rates(prompts, where) if easy_first else None)
    if objective == "kto":
        examples, desirable = encode_unpaired(tokenizer, rows, max_len, where)
        return Split(examples, [len(c["input_ids"]) for c in examples[::2]], desirable=desirable)
    if objective in ("dpo", "reward"):
        pairs = encode_pairs(tokenizer, rows, max_len, where, margins=objective == "reward")
        return Split(pairs, pair_lengths(pairs), answer_tokens=token_counts(pairs))
    conversations = encode_rows(tokenizer, rows, max_len, every_token=spec["hyperparameters"].get("lossOn") == "all",
                                where=where)
    return Split(conversations, [len(c["input_ids"]) for c in conversations])


def unit_length(spec: dict) -> int:
    """The most tokens a unit holds: a pair's two conversations side by side take twice maxSeqLength."""
    return spec["hyperparameters"]["maxSeqLength"] * (2 if spec.get("objective") in ("dpo", "reward") else 1)
