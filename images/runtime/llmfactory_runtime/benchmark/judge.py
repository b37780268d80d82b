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
    """P(rating) for ratings 1..10, from the judge's log-probabilities of writing "k]]".

    The shared prompt is read once; its KV cache is repeated for the ten candidates, so the
    cost is one prompt pass plus a few tokens per candidate."""
    prompt = tokenizer(render(tokenizer, messages, add_generation_prompt=True) + "[[",
                       add_special_tokens=False)["input_ids"]
    candidates = [tokenizer(f"{k}]]", add_special_tokens=False)["input_ids"] for k in RATINGS]
    out = model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    scores = [float(first[cand[0]]) for cand in candidates]
    rest = max(len(c) for c in candidates) - 1
    if rest:
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(candidates))
        # Right padding: a pad only follows a candidate's real tokens, so it cannot change them.
        ids = torch.full((len(candidates), rest), tokenizer.pad_token_id, dtype=torch.long)
        for i, cand in enumerate(candidates):
            ids[i, : len(cand) - 1] = torch.tensor(cand[:-1])
        logits = model(input_ids=ids.to(model.device), past_key_values=cache).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        for i, cand in enumerate(candidates):
            scores[i] += sum(float(logprobs[i, j - 1, cand[j]]) for j in range(1, len(cand)))
    return torch.softmax(torch.tensor(scores), 0).tolist()


def expected_rating(probabilities: list[float]) -> float:
    return sum(k * p for k, p in zip(RATINGS, probabilities))
