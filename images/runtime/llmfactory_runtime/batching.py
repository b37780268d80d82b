"""Conversations and raw text -> padded tensors, and the perplexity every phase measures the same way."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from array import array
from typing import Iterable, Iterator

import torch

from .chat import IGNORE, encode_many_for_training, render, training_views
from .data import messages_of, text_of, tools_of, undesirable
from .dataset.pieces import chunks
from .models import device
from .task import InvalidTask


def text_pieces(ids: list[int], eos_id: int | None, max_len: int) -> list[dict]:
    """A raw-text row's tokens (the tokenizer's own encoding, with its beginning-of-sequence token where
    it writes one) as continued pre-training learns them: the end-of-sequence token added, as TRL and
    torchtune add it, every token labelled, in pieces of max_len tokens, so that a long document is
    learned whole rather than cut off (as Hugging Face's run_clm groups texts); a last piece too
    short to predict a token is left out. A piece's tokens are one compact array (4 bytes a token, where
    a list of ints takes ~36), its input_ids and labels alike."""
    if eos_id is not None and ids[-1:] != [eos_id]:
        ids.append(eos_id)
    ids = array("i", ids)
    pieces = [ids[at:at + max_len] for at in range(0, len(ids), max_len)]
    return [{"input_ids": piece, "labels": piece} for piece in pieces if len(piece) > 1]


def encode_text(tokenizer, text: str, max_len: int) -> list[dict]:
    """One raw-text row's pieces (text_pieces)."""
    return text_pieces(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"], tokenizer.eos_token_id,
                       max_len)


# Rows read at once: their raw texts are tokenized in one call, their conversations in another,
# which the tokenizers library spreads over its threads (a core each).
ROWS_AT_ONCE = 256


def encoded(tokenizer, rows: Iterable[dict], max_len: int, every_token: bool = False,
            where: str = "the dataset", first: int = 1, tally: Counter | None = None) -> Iterator[dict]:
    """Encoded conversations that have at least one assistant token (every_token: any token) within
    max_len (of unpaired rows, those whose answer is desirable; a conversation its template does not
    write prefix by prefix: one example an answer, chat.training_views), and raw-text rows' pieces
    (text_pieces), in the rows' order, as the rows are read. A malformed row is an invalid task
    naming `where` (field and file) and the row (numbered from `first`). `tally` counts the
    conversations cut at max_len ("truncated") and those left out ("unlearned"), what a user whose
    maxSeqLength is too short must be told, and those learned answer by answer ("by answer")."""
    tally = Counter() if tally is None else tally
    for chunk in chunks(enumerate(rows, first), ROWS_AT_ONCE):
        read = []
        for n, row in chunk:
            try:
                text = text_of(row)
                messages = None if text is not None or undesirable(row) else messages_of(row)
                read.append((text, messages, tools_of(row)))
            except ValueError as e:
                raise InvalidTask(f"{where} row {n}: {e}") from None
        texts = [text for text, _, _ in read if text is not None]
        tokenized = iter(tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else ())
        views = [training_views(tokenizer, messages, tools, every_token) if text is None and messages is not None
                 else [] for text, messages, tools in read]
        examples = iter(encode_many_for_training(tokenizer, [v for own in views for v in own], max_len, every_token))
        for (text, messages, _), own in zip(read, views):
            if text is not None:
                yield from text_pieces(next(tokenized), tokenizer.eos_token_id, max_len)
            elif messages is not None:
                conversation = [next(examples) for _ in own]
                learned = [e for e in conversation if any(label != IGNORE for label in e["labels"])]
                if not learned:
                    tally["unlearned"] += 1
                    continue
                tally["truncated"] += any([e.pop("truncated", False) for e in conversation])  # a list: pop every mark
                if len(own) > 1:
                    tally["by answer"] += 1
                yield from learned


def encode_rows(tokenizer, rows: Iterable[dict], max_len: int, every_token: bool = False,
                where: str = "the dataset") -> list[dict]:
    """encoded(), as a list."""
    return list(encoded(tokenizer, rows, max_len, every_token, where))


def as_trained(tokenizer, row: dict) -> str:
    """A row's text as training reads it: a raw-text row's text, a conversation rendered by the chat
    template (what quantization calibrates on)."""
    text = text_of(row)
    return text if text is not None else render(tokenizer, messages_of(row), tools=tools_of(row))


# Rows' width: a multiple of this, 64 on a GPU. SDPA with a mask (packing's block-diagonal one, or
# padding's) runs cuDNN's attention there (torch 2.11), which builds an execution plan for each
# shape it has not seen, up to a second each (modelscope/FunASR#3704), and packed rows make a new
# width nearly every step: 41 widths in the 69 steps of the H200 benchmark, whose first run on a
# fresh machine spent 14 s (0.35 s a width) more than its steady state (benchmarks/RESULTS.md).
# Rounded, that run meets 6 widths, for 1% more positions. On a CPU nothing is built per shape
# and padding is only work.
WIDTH_MULTIPLE = 64 if device().type == "cuda" else 1


def row_width(longest: int) -> int:
    """The width of a batch whose longest row has `longest` tokens (WIDTH_MULTIPLE)."""
    return -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def collate_sequences(examples: list[dict], rows: list[list[int]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors, one row per sequence of examples (indices), row_width wide. Packed
    sequences carry position_ids that restart per conversation (padding forms its own segment, from
    0, with no labels), from which transformers builds a block-diagonal mask; plain ones an attention_mask."""
    seqs = [[examples[i] for i in row] for row in rows]
    width = row_width(max(sum(len(e["input_ids"]) for e in seq) for seq in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    extra = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        at = 0
        for e in seq:
            n = len(e["input_ids"])
            ids[i, at:at + n], labels[i, at:at + n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"])
            extra[i, at:at + n] = torch.arange(n) if packed else 1
            at += n
        if packed:
            extra[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


def collate(examples: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a batch, one conversation per row; padding is masked out of attention and loss."""
    batch = collate_sequences(examples, [[i] for i in range(len(examples))], pad_id, packed=False)
    return {k: v.to(device) for k, v in batch.items()}


# Positions whose next-token entropy token_logps computes at once: their fp32 logits and log-softmax
# (8 bytes a logit, 1 GiB with a 128k vocabulary) come and go before backward's peak, which holds 12
# bytes a logit of the whole batch (finetune/estimate.py).
ENTROPY_CHUNK = 1024


def token_logps(model, batch: dict[str, torch.Tensor], entropies: bool = False):
    """Log-probability of each labelled token (0 where there is no label), (rows, width - 1): the
    labels shifted by one, as the model predicts them. Packed rows (position_ids) attend per segment.
    With entropies, (those, the entropy of the model's next-token distribution where each labelled
    token is predicted (0 elsewhere), without gradient)."""
    context = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    logits = model(input_ids=batch["input_ids"], **context, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logps = -torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=IGNORE, reduction="none").view_as(labels)
    if not entropies:
        return logps
    out = torch.zeros_like(logps)
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    with torch.no_grad():
        for at in range(0, len(rows), ENTROPY_CHUNK):
            where = rows[at:at + ENTROPY_CHUNK], cols[at:at + ENTROPY_CHUNK]
            log_p = torch.log_softmax(logits[where].float(), -1)
            out[where] = -(log_p.exp() * log_p).sum(-1)
    return logps, out


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on: labels shifted by one, as the model shifts them."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@contextlib.contextmanager
def evaluating(model):
    """The model in evaluation mode (no dropout, no NEFTune noise) for the block, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def loss_sums(model, examples: list[dict], batch_size: int, pad_id: int, device=None,
              all_tokens: bool = False) -> tuple[float, int]:
    """(summed next-token loss, tokens) over assistant tokens (or every real token)."""
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id, device or model.device)
            if all_tokens:
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
            n = label_count(batch)
            if n:
                total += float(model(**batch, use_cache=False).loss) * n
                count += n
    return total, count


def mean_loss(model, examples: list[dict], batch_size: int, pad_id: int, all_tokens: bool = False) -> float | None:
    """Token-weighted mean next-token loss over assistant tokens (or every real token)."""
    total, count = loss_sums(model, examples, batch_size, pad_id, all_tokens=all_tokens)
    return total / count if count else None


def perplexity(model, tokenizer, rows: list[dict], max_len: int = 2048, batch_size: int = 4,
               where: str = "the dataset") -> dict[str, float]:
    """{assistant: perplexity on the tokens training learns (assistant turns; a raw-text row's every
    token), all: on every token} of a model on rows (encode_rows; `where` names them in its errors).
    Every token is each conversation once, as its template writes it: the examples of a conversation
    learned answer by answer (chat.training_views) would count its history once an answer."""
    examples = encode_rows(tokenizer, rows, max_len, where=where)
    if not examples:
        raise InvalidTask(f"{where}: no row with an assistant answer (or text) to measure perplexity on")
    whole = encode_rows(tokenizer, rows, max_len, every_token=True, where=where)
    return {"assistant": math.exp(mean_loss(model, examples, batch_size, tokenizer.pad_token_id)),
            "all": math.exp(mean_loss(model, whole, batch_size, tokenizer.pad_token_id, all_tokens=True))}


def top_tokens(model, tokenizer, rows: list[dict], max_len: int = 2048, batch_size: int = 4) -> list[int]:
    """The model's most likely next token at every assistant position, in order: two models
    compared position by position give their top-token agreement."""
    import torch  # noqa: PLC0415

    examples = encode_rows(tokenizer, rows, max_len)
    model.eval()
    out: list[int] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id, model.device)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits[:, :-1]
            scored = labels[:, 1:] != IGNORE
            out += logits.argmax(-1)[scored].tolist()
    return out
