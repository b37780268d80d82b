"""Which prompts to ask and which answers (a teacher's, or the sources' own) to keep."""

from __future__ import annotations

import re
from typing import Any, Callable

from .sources import Drops

# Refusal openings in the languages of the reference workload; users extend them in the spec.
REFUSAL_PATTERNS = [
    r"\b(i'?m sorry|i apologi[sz]e|i can(no|')t (help|assist|provide|comply|do that)|i am unable to|"
    r"i'?m unable to|i won'?t be able to|as an ai( language model)?)\b",
    r"(извините|к сожалению,? я не могу|я не могу (помочь|выполнить|предоставить|ответить)|"
    r"как (ии|искусственный интеллект|языковая модель))",
    r"(抱歉|对不起|我无法|我不能(帮助|提供|回答|协助)|作为一个?(人工智能|AI|语言模型))",
]


class AnswerFilter:
    def __init__(self, spec: dict):
        self.spec = spec
        patterns = (REFUSAL_PATTERNS if spec.get("refusals", True) else []) + spec.get("refusalPatterns", [])
        self.refusal = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    def reason_to_drop(self, text: str, finished: bool, tokens: int = 0) -> str | None:
        """None to keep the answer, else the reason it is dropped."""
        if not text.strip():
            return "empty"
        if self.spec.get("dropTruncated", True) and not finished:
            return "truncated"
        if self.spec.get("maxAnswerTokens") and tokens > self.spec["maxAnswerTokens"]:
            return "too_many_tokens"
        if len(text) < self.spec.get("minAnswerChars", 1):
            return "too_short"
        if self.spec.get("maxAnswerChars") and len(text) > self.spec["maxAnswerChars"]:
            return "too_long"
        if self.refusal and self.refusal.search(text[:300]):
            return "refusal"
        return None


def token_counter(tokenizer_input: dict[str, Any]) -> Callable[[list[str]], list[int]]:
    """How many tokens of the given tokenizer (the student's, usually) each text is, counted in one
    call for all."""
    from ..models import load_tokenizer  # noqa: PLC0415 - transformers only when a limit is set

    tokenizer = load_tokenizer(tokenizer_input)
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def drop_long_prompts(prompts: list[dict[str, Any]], limit: int, tokenizer_input: dict[str, Any],
                      drops: Drops) -> list[dict[str, Any]]:
    """Prompts whose system message and user turns fit in `limit` tokens of the given tokenizer
    (the student's, usually): a conversation the fine-tune would cut is not paid for."""
    lengths = token_counter(tokenizer_input)(["\n".join([p.get("system") or "", *p["turns"]]) for p in prompts])
    kept = []
    for p, n in zip(prompts, lengths):
        if n > limit:
            drops.add("prompt_too_long", f"{n} tokens: {p['turns'][0]}")
        else:
            kept.append(p)
    return kept
