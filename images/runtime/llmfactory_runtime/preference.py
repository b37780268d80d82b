"""Preference pairs: a pair's chosen and rejected conversations side by side in one sequence, the
log-probability a model gives each answer, and the preference losses (DPO's and its variants, most
against a reference's log-probabilities). FineTune's
objective dpo trains with them; a Benchmark scores held-out pairs with them. Objective kto's
unpaired examples are pairs too: an example's own conversation beside a mismatched one (its prompt,
another example's answer), whose log-probabilities give KTO's reference point.

In training the reference is the model before its first step (a new LoRA adapter adds zero, so
that is the base): its log-probabilities are computed once, before training, and kept in every
checkpoint (finetune/train.py), so a resumed run never takes its partly trained weights for the
reference, and no second copy of the model is held for it.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

from .batching import collate_sequences, evaluating, token_logps
from .chat import IGNORE, encode_for_training
from .data import labelled_of, margin_of, preference_of
from .task import InvalidTask


def encode_pairs(tokenizer, rows: list[dict], max_len: int, where: str, margins: bool = False,
                 tally: Counter | None = None) -> list[dict]:
    """Conversations in pairs, [chosen 0, rejected 0, chosen 1, ...], each cut at max_len, labels on
    the answers only (not on the prompt's earlier assistant turns); with `margins` (a reward model's
    loss reads them, pair_margins; DPO ignores the column, as TRL's does) the chosen one carries the
    row's margin (data.margin_of). A pair whose chosen or rejected answer lies wholly beyond max_len
    is left out: it has nothing to compare. `where` names the field and file in the error a
    malformed row gets. `tally` counts the pairs cut at max_len, either answer ("truncated"), and
    those left out ("unlearned")."""
    tally = Counter() if tally is None else tally
    convs = []
    for n, row in enumerate(rows, 1):
        try:
            prompt, chosen, rejected = preference_of(row)
            margin = margin_of(row) if margins else 0.0
        except ValueError as e:
            raise InvalidTask(f"{where} row {n}: {e}") from None
        pair = [encode_for_training(tokenizer, prompt + answer, max_len, first=len(prompt)) for answer in (chosen, rejected)]
        pair[0]["margin"] = margin
        cut = any([c.pop("truncated", False) for c in pair])  # a list: pop both marks
        if all(any(label != IGNORE for label in c["labels"]) for c in pair):
            convs += pair
            tally["truncated"] += cut
        else:
            tally["unlearned"] += 1
    return convs


def pair_margins(convs: list[dict], pairs: list[int]) -> torch.Tensor:
    """The margins (encode_pairs) of the given pairs."""
    return torch.tensor([convs[2 * i]["margin"] for i in pairs], dtype=torch.float32)


def answer_tokens(convs: list[dict]) -> list[list[int]]:
    """Answer tokens of each pair's chosen and rejected conversations."""
    return [[sum(label != IGNORE for label in convs[k]["labels"]) for k in (i, i + 1)] for i in range(0, len(convs), 2)]


def token_counts(convs: list[dict]) -> torch.Tensor:
    """answer_tokens as a (pairs, 2) tensor: what dpo_terms takes per-token means over."""
    return torch.tensor(answer_tokens(convs), dtype=torch.float32).view(-1, 2)


def pair_lengths(convs: list[dict]) -> list[int]:
    """Tokens of each pair's two conversations together (what packing places as one unit)."""
    return [len(convs[i]["input_ids"]) + len(convs[i + 1]["input_ids"]) for i in range(0, len(convs), 2)]


def conversations_of(rows: list[list[int]]) -> list[list[int]]:
    """Rows of pair indices -> rows of conversation indices, each pair's chosen then rejected."""
    return [[k for i in row for k in (2 * i, 2 * i + 1)] for row in rows]


def collate_pairs(convs: list[dict], rows: list[list[int]], pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A batch whose rows hold whole pairs, kept apart by restarting position ids (as packing does,
    whether or not hyperparameters.packing puts several pairs in a row), and the conversations per row."""
    conv_rows = conversations_of(rows)
    return collate_sequences(convs, conv_rows, pad_id, packed=True), [len(r) for r in conv_rows]


def segment_logps(model, batch: dict[str, torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Summed log-probability of each conversation's answer tokens, in row order, flat: `counts`
    conversations per row, each the segment its position ids restart at."""
    token = token_logps(model, batch)  # 0 where there is no label
    rows, width = token.shape
    token = token.flatten()
    stride = width + 1  # more than the segments a row can have
    segment = (batch["position_ids"] == 0).cumsum(1)[:, 1:] - 1  # of each predicted token
    segment = segment + stride * torch.arange(rows, device=segment.device)[:, None]
    sums = torch.zeros(rows * stride, dtype=token.dtype, device=token.device).index_add(0, segment.flatten(), token)
    picked = torch.cat([stride * r + torch.arange(c, device=sums.device) for r, c in enumerate(counts)])
    return sums[picked]


def answer_logps(model, batch: dict[str, torch.Tensor], counts: list[int]) -> torch.Tensor:
    """segment_logps of rows of whole pairs, as (pairs, 2): chosen, rejected."""
    return segment_logps(model, batch, counts).view(-1, 2)


REFERENCE_FREE = {"simpo", "orpo"}  # losses of the model's own likelihoods: no reference pass


def needs_reference(dpo: dict) -> bool:
    return dpo.get("loss", "sigmoid") not in REFERENCE_FREE


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor | None, tokens: torch.Tensor,
              dpo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the loss that dpo.loss names, and the margin (the implicit rewards' difference;
    > 0 counts as preferring the chosen answer). policy and reference: summed answer
    log-probabilities, (pairs, 2) chosen, rejected; tokens: their answer tokens.
    Against the reference, the margin is beta x how much more the model than the reference favours
    chosen over rejected:
    - sigmoid (DPO, Rafailov et al.): -log sigmoid(margin); with labelSmoothing e, the conservative
      DPO's -(1 - e) log sigmoid(margin) - e log sigmoid(-margin), for labels a share e of which is
      taken to be flipped;
    - ipo (Azar et al.): (h - 1 / (2 beta))^2, h the log-ratio difference of the per-token mean
      log-probabilities (TRL's choice: length does not decide), margin beta x h; it stops pushing
      once the margin reaches 1/2 rather than driving it to infinity;
    - hinge (SLiC, Zhao et al.): max(0, 1 - margin).
    Reference-free (reference None), the margin is beta x the difference of the per-token mean
    log-probabilities:
    - simpo (Meng et al.): -log sigmoid(margin - gamma);
    - orpo (Hong et al.): the chosen answer's mean token negative log-likelihood minus
      beta x log sigmoid of the log odds ratio of the two answers' mean likelihoods.
    sftWeight adds that times the chosen answer's mean token negative log-likelihood (RPO)."""
    beta, kind = dpo["beta"], dpo.get("loss", "sigmoid")
    tokens = tokens.to(policy).clamp(min=1)
    mean = policy / tokens
    if kind in REFERENCE_FREE:
        margin = beta * (mean[:, 0] - mean[:, 1])
        if kind == "simpo":
            loss = -F.logsigmoid(margin - dpo.get("gamma", 0.5))
        else:
            # log odds = log p - log(1 - p) of the mean likelihood p; expm1 keeps 1 - p exact near p = 1
            log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))
            loss = -mean[:, 0] - beta * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    else:
        reference = reference.to(policy)
        change = mean - reference / tokens if kind == "ipo" else policy - reference
        h = change[:, 0] - change[:, 1]
        margin = beta * h
        if kind == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        elif kind == "hinge":
            loss = F.relu(1 - margin)
        else:
            smoothing = dpo.get("labelSmoothing") or 0.0
            loss = -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
    if dpo.get("sftWeight"):
        loss = loss - dpo["sftWeight"] * mean[:, 0]
    return loss, margin


def encode_unpaired(tokenizer, rows: list[dict], max_len: int, where: str,
                    tally: Counter | None = None) -> tuple[list[dict], torch.Tensor]:
    """KTO's examples as pairs, [own 0, mismatched 0, own 1, ...], and whether each is desirable.
    The mismatched conversation is the example's prompt with the next example's answer (TRL's KL
    completions, shifted by one over the whole split rather than within a batch, so that they do not
    depend on how batches fall). An example whose answer lies wholly beyond max_len is left out.
    `tally` counts the examples whose own conversation is cut at max_len ("truncated") and those left
    out ("unlearned")."""
    tally = Counter() if tally is None else tally
    examples = []
    for n, row in enumerate(rows, 1):
        try:
            examples += labelled_of(row)
        except ValueError as e:
            raise InvalidTask(f"{where} row {n}: {e}") from None
    convs, desirable = [], []
    for i, (prompt, answer, label) in enumerate(examples):
        other = examples[(i + 1) % len(examples)][1]
        own, mismatched = (encode_for_training(tokenizer, prompt + a, max_len, first=len(prompt)) for a in (answer, other))
        cut = own.pop("truncated", False)
        mismatched.pop("truncated", None)  # its cut end is no one's answer
        if any(t != IGNORE for t in own["labels"]):
            convs += [own, mismatched]
            desirable.append(label)
            tally["truncated"] += cut
        else:
            tally["unlearned"] += 1
    return convs, torch.tensor(desirable, dtype=torch.bool)


def kto_terms(policy: torch.Tensor, reference: torch.Tensor, kl: float, desirable: torch.Tensor,
              kto: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, KTO's loss (Ethayarajh et al., 2024, as TRL computes it) and its implicit reward
    beta x (log-probability change of its answer from the reference). A desirable answer's loss is
    desirableWeight x (1 - sigmoid(reward - beta kl)), an undesirable one's undesirableWeight x
    (1 - sigmoid(beta kl - reward)): each starts at 1/2 x its weight and falls as the reward moves
    past the reference point to its side. policy, reference: the examples' summed answer
    log-probabilities; kl: the reference point, the mean log-probability change of the mismatched
    conversations (KTO's estimate of the KL divergence from the reference), floored at 0."""
    beta = kto["beta"]
    reward = beta * (policy - reference.to(policy))
    desirable = desirable.to(policy.device)
    loss = torch.where(desirable, kto["desirableWeight"] * (1 - torch.sigmoid(reward - beta * kl)),
                       kto["undesirableWeight"] * (1 - torch.sigmoid(beta * kl - reward)))
    return loss, reward


def kto_agrees(reward: torch.Tensor, kl: float, desirable: torch.Tensor, beta: float) -> torch.Tensor:
    """Whether each example's reward lies past the reference point on its label's side (its loss
    below half its weight): KTO's counterpart of a pair preferred."""
    ahead = reward.detach() - beta * kl
    return torch.where(desirable.to(ahead.device), ahead > 0, ahead < 0)


@torch.no_grad()
def pair_logps(model, convs: list[dict], pairs: list[int], batch_size: int, pad_id: int, device,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """answer_logps of the given pairs, one pair per row, in evaluation mode (no dropout, no NEFTune
    noise); on_batch(pairs done) after each batch."""
    out = []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            batch, counts = collate_pairs(convs, [[i] for i in pairs[start:start + batch_size]], pad_id)
            out.append(answer_logps(model, {k: v.to(device) for k, v in batch.items()}, counts))
            if on_batch:
                on_batch(min(start + batch_size, len(pairs)))
    return torch.cat(out) if out else torch.zeros((0, 2))


def pair_scores(model, tokenizer, rows: list[dict], where: str, max_len: int = 2048,
                batch_size: int = 4) -> dict[str, list[list[float]]]:
    """A Benchmark's view of a model on preference rows: per pair, the summed log-probability of
    the chosen and rejected answers, and their answer tokens."""
    convs = encode_pairs(tokenizer, rows, max_len, where)
    pairs = list(range(len(convs) // 2))
    logps = pair_logps(model, convs, pairs, batch_size, tokenizer.pad_token_id, model.device)
    return {"logps": logps.tolist(), "tokens": answer_tokens(convs)}


def labelled_scores(model, tokenizer, rows: list[dict], where: str, max_len: int = 2048,
                    batch_size: int = 4) -> dict[str, list]:
    """A Benchmark's view of a model on KTO's labelled answers: per example, the summed
    log-probability of its own answer and of its mismatched conversation, and whether its answer
    is desirable (what labelled_agreement compares with a baseline's)."""
    convs, desirable = encode_unpaired(tokenizer, rows, max_len, where)
    logps = pair_logps(model, convs, list(range(len(convs) // 2)), batch_size, tokenizer.pad_token_id, model.device)
    return {"logps": logps.tolist(), "desirable": desirable.tolist()}


def labelled_agreement(model: dict[str, list], baseline: dict[str, list]) -> float | None:
    """KTO's reward accuracy as the FineTune reports it on its validation split: the share of
    answers whose log-probability change from the baseline lies past the reference point (the
    mismatched conversations' mean change, floored at 0) on its label's side."""
    if not model["logps"]:
        return None
    change = torch.tensor(model["logps"]) - torch.tensor(baseline["logps"])
    kl = max(float(change[:, 1].mean()), 0.0)
    return float(kto_agrees(change[:, 0], kl, torch.tensor(model["desirable"]), beta=1.0).float().mean())
