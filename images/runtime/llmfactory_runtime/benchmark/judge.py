"""LLM-as-judge, single-answer grading on a 1-10 scale.

A local judge is read, not parsed: instead of sampling a reply and hoping it contains
"[[7]]", the judge is shown "[[" as the start of its reply and every rating 1..10 is scored
by its log-probability. The expected rating under that distribution is the score: it never
fails to parse, and it is deterministic.
"""

from __future__ import annotations

import json
from importlib import resources

import torch

from ..chat import render

RATINGS = list(range(1, 11))

JUDGE_SYSTEM = "You are a strict, impartial judge of answers written by AI assistants."
JUDGE_PROMPT = (
    "Rate the assistant's answer to the user's question on a scale of 1 to 10, considering "
    "helpfulness, correctness, relevance, depth and whether it is written in the language of the question.{reference}"
    " Reply with the rating only, in the form [[rating]], for example [[5]].\n\n"
    "[Question]\n{question}\n\n[Answer]\n{answer}"
)


def builtin_questions(language: str) -> list[dict]:
    """The project's own question set for a language (en, ru, zh)."""
    path = resources.files("llmfactory_runtime.benchmark") / "questions" / f"{language}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no built-in questions for language {language!r}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge_messages(question: str, answer: str, reference: str | None) -> list[dict[str, str]]:
    ref = f" A correct answer is: {reference}" if reference else ""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(reference=ref, question=question, answer=answer)}]


@torch.no_grad()
def rating_distribution(model, tokenizer, messages: list[dict[str, str]]) -> list[float]:
    """P(rating) for ratings 1..10, from the judge's log-probabilities of writing "k]]"."""
    prompt = tokenizer(render(tokenizer, messages, add_generation_prompt=True) + "[[",
                       add_special_tokens=False)["input_ids"]
    candidates = [tokenizer(f"{k}]]", add_special_tokens=False)["input_ids"] for k in RATINGS]
    width = len(prompt) + max(map(len, candidates))
    ids = torch.full((len(candidates), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, cand in enumerate(candidates):
        seq = prompt + cand
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    logprobs = torch.log_softmax(model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float(), -1)
    scores = []
    for i, cand in enumerate(candidates):
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(cand))
        scores.append(sum(float(logprobs[i, p, t]) for p, t in zip(positions, cand)))
    return torch.softmax(torch.tensor(scores), 0).tolist()


def expected_rating(probabilities: list[float]) -> float:
    return sum(k * p for k, p in zip(RATINGS, probabilities))
