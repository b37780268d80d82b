"""Chat templates and the token masks that make training learn only the assistant's words."""

from __future__ import annotations

from typing import Any

from .task import InvalidTask

# The ChatML template, for tokenizers that ship none (e.g. ones trained from scratch).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")

IGNORE = -100  # label value that cross-entropy skips


def use_chatml(tokenizer) -> None:
    """ChatML for a tokenizer without a chat template of its own (a base model's, e.g. Llama-3-8B or
    Mistral-7B-v0.1), with its markers added as special tokens where the vocabulary lacks them, as
    TRL's setup_chat_format does: as plain text each would be several ordinary tokens, and
    <|im_end|> no token a model could learn to end its turn with or generation could stop on. The
    model's embeddings grow to match where it is loaded (models.fit_embeddings)."""
    tokenizer.chat_template = CHATML_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [marker for marker in CHATML_MARKERS if marker not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)


def apply_template(tokenizer, messages: list[dict[str, str]], **kwargs: Any):
    """tokenizer.apply_chat_template, where a template that refuses a conversation (raise_exception in
    its Jinja: Mistral-7B-Instruct-v0.1's and Gemma's refuse a system message) is an invalid task
    saying what it was given, not a crash to retry."""
    from jinja2 import TemplateError  # noqa: PLC0415 - transformers' own dependency

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as exc:
        roles = ", ".join(m["role"] for m in messages)
        raise InvalidTask(f"the model's chat template refuses a conversation of roles {roles}: {exc} (a FineTune "
                          "renders its data in ChatML instead with spec.chatTemplate chatml)") from None


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans written by the assistant (each answer
    and its end-of-turn marker, so the model learns to stop), from message `first` on."""
    text = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < first:
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not text.startswith(through) or not through.startswith(prefix):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "assistant-only loss cannot be located")
        spans.append((len(prefix), len(through)))
    return text, spans


def encode_for_training(tokenizer, messages: list[dict[str, str]], max_length: int, first: int = 0) -> dict[str, Any]:
    """input_ids and labels, where labels are IGNORE everywhere but on assistant tokens (of the
    messages from `first` on: a DPO pair's answers, not its prompt's earlier turns)."""
    text, spans = assistant_spans(tokenizer, messages, first)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    truncation=True, max_length=max_length)
    labels = []
    for token, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token if inside else IGNORE)
    return {"input_ids": enc["input_ids"], "labels": labels}
