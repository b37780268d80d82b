"""A reward model: a sequence-classification model with one label whose output for a conversation
is its reward, as TRL's GRPOTrainer and RLHF pipelines use one. A grader scores answers with it
(operation rewardModel); a FineTune with objective reward trains one on preference pairs, as TRL's
RewardTrainer does (Bradley-Terry: the chosen answer's score above the rejected one's)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from .batching import collate_sequences, evaluating, row_width
from . import libraries
from .chat import render
from .finetune.estimate import REWARD_MODEL_BATCH
from .models import compute_dtype, device, fit_embeddings, load_tokenizer, locate
from .task import InvalidTask


def load(source: dict[str, Any], field: str) -> tuple[Any, Any]:
    """The reward model (eval mode, compute dtype, best device) and its tokenizer. A model without a
    trained classification head (a causal LM, whose head transformers would initialise at random)
    or with other than one label is an invalid task naming `field`."""
    where, _, kwargs = locate(source)
    libraries.check_checkpoint(where, **kwargs)
    model, info = AutoModelForSequenceClassification.from_pretrained(where, dtype=compute_dtype(),
                                                                     output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise InvalidTask(f"{field}: {where} is not a reward model: its weights lack "
                          f"{', '.join(sorted(info['missing_keys'])[:3])} (a causal LM has no classification head; "
                          "name a sequence-classification model with one label)")
    if model.config.num_labels != 1:
        raise InvalidTask(f"{field}: {where} has {model.config.num_labels} labels; a reward model scores with one")
    tokenizer = load_tokenizer(source)
    fit_embeddings(model, tokenizer)  # as load_model does: ChatML's markers for one without a template
    return model.to(device()).eval(), tokenizer


def scores_of(source: dict[str, Any], field: str, conversations: list[list[dict[str, str]]],
              batch_size: int = REWARD_MODEL_BATCH) -> list[float]:
    """scores of the conversations by the reward model at source, loaded for this once (load's
    checks name `field`) and let go after."""
    model, tokenizer = load(source, field)
    return scores(model, tokenizer, conversations, batch_size)


def scores(model, tokenizer, conversations: list[list[dict[str, str]]],
           batch_size: int = REWARD_MODEL_BATCH) -> list[float]:
    """The model's output for each conversation rendered with its chat template, batch_size at a time,
    right-padded: transformers reads each row at its last token that is not its config's pad_token_id,
    which is where it reads that conversation alone (and where objective reward trained it to score).
    A model whose config names no pad token reads one conversation at a time. Conversations of
    similar length go together, so that little is padding."""
    encoded = [tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
               for messages in conversations]
    pad = model.config.pad_token_id
    size = batch_size if pad is not None else 1
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [0.0] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            longest = max(len(encoded[i]) for i in chunk)
            width = row_width(longest) if pad is not None else longest  # else read at its last position
            ids = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(encoded[i])], mask[row, :len(encoded[i])] = torch.tensor(encoded[i]), 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, 0]
            for i, value in zip(chunk, logits.float().tolist()):
                out[i] = value
    return out


def pair_batch(convs: list[dict], pairs: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of pairs (indices into encode_pairs' conversations): each pair's chosen and rejected
    conversation a row of its own, right-padded, since the model scores a row at its end."""
    batch = collate_sequences(convs, [[k] for i in pairs for k in (2 * i, 2 * i + 1)], pad_id, packed=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's score of each pair's chosen and rejected conversation in a pair_batch, (pairs, 2),
    as a grader scores one alone: transformers reads each row at its last token that is not padding."""
    return model(**batch, use_cache=False).logits.float().view(-1, 2)


def reward_terms(rewards: torch.Tensor, reward: dict[str, Any],
                 required: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the reward model's loss -log sigmoid(chosen - rejected - required) (Bradley-Terry, as
    TRL's RewardTrainer; `required` the rows' margins, preference.pair_margins, as Llama 2's margin
    loss; with reward.centerRewardsCoefficient, plus that times (chosen + rejected)^2), and the margin
    chosen - rejected (> 0: the pair is ranked right)."""
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -F.logsigmoid(margin - (required.to(margin) if required is not None else 0.0))
    if reward.get("centerRewardsCoefficient"):
        loss = loss + reward["centerRewardsCoefficient"] * rewards.sum(1) ** 2
    return loss, margin


@torch.no_grad()
def evaluate_pairs(model, convs: list[dict], pairs: list[int], batch_size: int, pad_id: int, device) -> torch.Tensor:
    """pair_rewards of the given pairs in evaluation mode (no dropout), batch_size pairs at a time."""
    with evaluating(model):
        batches = (pair_batch(convs, pairs[i:i + batch_size], pad_id) for i in range(0, len(pairs), batch_size))
        out = [pair_rewards(model, {k: v.to(device) for k, v in batch.items()}).cpu() for batch in batches]
    return torch.cat(out) if out else torch.zeros((0, 2))
