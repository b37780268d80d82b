"""A reward model as a grader (operation rewardModel): a sequence-classification model with one label
whose output for a conversation is its reward, as TRL's GRPOTrainer and RLHF pipelines use one."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from .chat import render
from .models import compute_dtype, device, load_tokenizer, locate
from .task import InvalidTask


def load(source: dict[str, Any], field: str) -> tuple[Any, Any]:
    """The reward model (eval mode, compute dtype, best device) and its tokenizer. A model without a
    trained classification head (a causal LM, whose head transformers would initialise at random)
    or with other than one label is an invalid task naming `field`."""
    where, _, kwargs = locate(source)
    model, info = AutoModelForSequenceClassification.from_pretrained(where, dtype=compute_dtype(),
                                                                     output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise InvalidTask(f"{field}: {where} is not a reward model: its weights lack "
                          f"{', '.join(sorted(info['missing_keys'])[:3])} (a causal LM has no classification head; "
                          "name a sequence-classification model with one label)")
    if model.config.num_labels != 1:
        raise InvalidTask(f"{field}: {where} has {model.config.num_labels} labels; a reward model scores with one")
    return model.to(device()).eval(), load_tokenizer(source)


def scores(model, tokenizer, conversations: list[list[dict[str, str]]]) -> list[float]:
    """The model's output for each conversation rendered with its chat template, one at a time (no
    padding, so any model finds its last token)."""
    out = []
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer(render(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(float(model(input_ids=ids.to(model.device)).logits[0, 0]))
    return out
