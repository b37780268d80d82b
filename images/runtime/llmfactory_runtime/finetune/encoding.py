"""A dataset split as a FineTune's objective trains on it (spec.objective), in tokens.

sft: conversations, labels on the assistant turns, and raw text (continued pre-training), labels on
every token, in pieces of maxSeqLength tokens (in training, in files a node's processes share:
token_files). dpo, reward: preference pairs, each pair's chosen and rejected conversations side by
side (preference.encode_pairs). kto: examples, each its own conversation beside a mismatched one
(preference.encode_unpaired). grpo: prompts, whose answers each step samples (grpo.encode_prompts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..batching import encoded
from ..data import read_split
from ..grader import check_scorable
from ..preference import encode_pairs, encode_unpaired, pair_lengths, token_counts
from . import grpo as group_relative, token_files
from .distributed import World

log = logging.getLogger(__name__)

# What one unit of data (a row of the dataset, as training reads it) is, by objective
UNITS = {"sft": "conversation", "dpo": "pair", "reward": "pair", "kto": "example", "grpo": "prompt"}


@dataclass(frozen=True)
class Split:
    # conversations (and raw text's pieces); pairs' (KTO: examples') two conversations in turn; grpo's prompts
    examples: Sequence[dict]  # a list, or sft's token_files
    lengths: list[int]  # tokens of each unit as packing places it (a pair's: both conversations')
    desirable: torch.Tensor | None = None  # kto: each example's label
    answer_tokens: torch.Tensor | None = None  # dpo, reward: (pairs, 2) answer tokens, what dpo_terms averages over
    ranks: list[float] | None = None  # grpo.promptOrder easyFirst: each prompt's pass rate, highest trained first
    rows: int = 0  # rows of the split they were encoded from
    truncated: int = 0  # all but grpo: units (conversations, pairs, examples) cut at maxSeqLength
    unlearned: int = 0  # units with no answer token within it (grpo: prompts that fill it), left out
    by_answer: int = 0  # sft: conversations learned answer by answer, one example each (chat.training_views)

    @property
    def units(self) -> int:
        return len(self.lengths)


def read(spec: dict, tokenizer, dataset_uri: str, split: str, world: World, scope: str,
         running: contextlib.ExitStack, rows: list[dict] | None = None) -> Split:
    """A split of the dataset as spec.objective trains on it (encode; `rows`: the split's, where the
    caller has read them); sft's conversations and raw text's pieces tokenized once a node into files
    its processes share (token_files), for the run (`scope`) while `running` is open."""
    if spec.get("objective", "sft") != "sft":
        rows = read_split(dataset_uri, split) if rows is None else rows
        read = dataclasses.replace(encode(spec, tokenizer, rows, split), rows=len(rows))
    else:
        examples = token_files.shared(tokenizer, dataset_uri, split, spec["hyperparameters"]["maxSeqLength"],
                                      _every_token(spec), f"spec.objective sft: {split}.jsonl", world, scope, running)
        read = Split(examples, examples.lengths(), rows=examples.rows, truncated=examples.tally["truncated"],
                     unlearned=examples.tally["unlearned"], by_answer=examples.tally["by answer"])
    if world.main and read.by_answer:
        log.info("%s.jsonl: %d conversations learned answer by answer, each answer after the conversation before it "
                 "as the model's chat template writes it then (it writes earlier turns otherwise: Qwen3's drops "
                 "their reasoning); spec.chatTemplate chatml learns each once", split, read.by_answer)
    if world.main and (read.truncated or read.unlearned):
        unit = UNITS[spec.get("objective", "sft")]
        log.warning("%s.jsonl: %d %ss longer than maxSeqLength %d cut at it (the end of their answers not learned), "
                    "%d with no answer token within it left out", split, read.truncated, unit,
                    spec["hyperparameters"]["maxSeqLength"], read.unlearned)
    return read


def encode(spec: dict, tokenizer, rows: list[dict], split: str) -> Split:
    """`rows` of the dataset's `split` (named in the error a malformed row gets) as spec.objective trains
    on them, each cut at hyperparameters.maxSeqLength (raw text: split into pieces of it); units with
    nothing to learn within it left out."""
    objective, max_len = spec.get("objective", "sft"), spec["hyperparameters"]["maxSeqLength"]
    where = f"spec.objective {objective}: {split}.jsonl"
    tally = Counter()
    if objective == "grpo":
        check_scorable(spec["grpo"]["grader"], "spec.grpo.grader")  # before the model loads
        prompts = group_relative.encode_prompts(tokenizer, rows, max_len, spec["grpo"]["grader"], where, tally)
        easy_first = split == "train" and spec["grpo"].get("promptOrder") == "easyFirst"
        return Split(prompts, [len(e["prompt"]) for e in prompts], unlearned=tally["unlearned"],
                     ranks=group_relative.pass_rates(prompts, where) if easy_first else None)
    if objective == "kto":
        examples, desirable = encode_unpaired(tokenizer, rows, max_len, where, tally=tally)
        return Split(examples, [len(c["input_ids"]) for c in examples[::2]], desirable=desirable,
                     truncated=tally["truncated"], unlearned=tally["unlearned"])
    if objective in ("dpo", "reward"):
        pairs = encode_pairs(tokenizer, rows, max_len, where, margins=objective == "reward", tally=tally)
        return Split(pairs, pair_lengths(pairs), answer_tokens=token_counts(pairs), truncated=tally["truncated"],
                     unlearned=tally["unlearned"])
    conversations = list(encoded(tokenizer, rows, max_len, _every_token(spec), where, tally=tally))
    return Split(conversations, [len(c["input_ids"]) for c in conversations], truncated=tally["truncated"],
                 unlearned=tally["unlearned"], by_answer=tally["by answer"])


def _every_token(spec: dict) -> bool:
    return spec["hyperparameters"].get("lossOn") == "all"


def unit_length(spec: dict) -> int:
    """The most tokens a unit holds: a pair's two conversations side by side take twice maxSeqLength."""
    return spec["hyperparameters"]["maxSeqLength"] * (2 if spec.get("objective") in ("dpo", "reward") else 1)
