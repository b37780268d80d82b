"""LLM-as-judge, MT-Bench style, turn by turn: single-answer grading on a 1-10 scale, and pairwise
comparison of two models' answers (which is better, or a tie).

Two judges, the same prompts:
- an API judge (OpenAI-compatible) explains briefly and ends with [[rating]] (or [[A]], [[B]],
  [[C]]); a reply without one is asked again, then counted unrated. Judgements are cached by the
  exact judge prompt, so a restarted benchmark (or one that adds a model) never pays twice;
- a local judge is read, not parsed: it is shown "[[" as the start of its reply and every
  rating 1..10 (or verdict A, B, C) is scored by its log-probability; a rating is the
  expectation, a verdict the likeliest (never fails to parse, deterministic).

A label grader (a GRPO or Benchmark reward) asks its own prompt and reads one of its labels in the
same ways: [[label]] from an API judge, each label's probability from a local one. A judge grader
with a prompt of its own asks it for a rating instead of the MT-Bench prompt.

A pairwise comparison is asked twice, the answers in swapped places: a win needs both orders to
agree, so a judge's preference for a position comes out as a tie (MT-Bench's rule).

Reference answers (math, reasoning...) are shown to the judge. An answer confidently in another
language than its question scores 1 (loses a comparison) without asking the judge.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from typing import Any, Callable

from ..answer_cache import AnswerCache
from ..openai_client import JUDGE_KEY_ENV, ChatClient, api_key, endpoint_identity
from ..task import InvalidTask
from ..usage import Usage
from .questions import reference

RATINGS = list(range(1, 11))
LANGUAGE_RULE_MIN_LETTERS = 20
LANGUAGE_RULE_CONFIDENCE = 0.9
REPLY_TOKENS, REASONING_REPLY_TOKENS = 512, 16384  # an API judge's reply: a few sentences and the verdict

JUDGE_SYSTEM = "You are a strict, impartial judge of answers written by AI assistants."
CRITERIA = ("considering helpfulness, correctness, relevance, depth and whether it is written in the language of "
            "the question.")
ASK_STYLE = {"api": "Explain your judgement in a few sentences, then give the rating in the form [[rating]], "
                    "for example [[5]].",
             "local": "Reply with the rating only, in the form [[rating]], for example [[5]]."}
REASK = "Give only the rating now, in the form [[rating]], for example [[5]]."
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")

VERDICTS = ["A", "B", "C"]  # A better, B better, a tie
COMPARE_CRITERIA = ("considering helpfulness, correctness, relevance, depth and whether each is written in the "
                    "language of the question. Do not let the order of the answers, their length or the "
                    "assistants' names sway you.")
ASK_VERDICT = {"api": "Explain your comparison in a few sentences, then give your verdict: [[A]] if assistant A's "
                      "answer is better, [[B]] if assistant B's is, [[C]] for a tie.",
               "local": "Reply with the verdict only: [[A]] if assistant A's answer is better, [[B]] if assistant "
                        "B's is, [[C]] for a tie."}
REASK_VERDICT = "Give only the verdict now: [[A]], [[B]] or [[C]]."
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def judge_messages(question: dict, answers: list[str], turn: int, style: str = "local") -> list[dict[str, str]]:
    """The judge's prompt for the answer to `turn` (0 or 1) of a question."""
    ref_text = _reference_text(question, turn)
    if turn == 0:
        body = (f"Rate the assistant's answer to the user's question on a scale of 1 to 10, {CRITERIA} "
                f"{ASK_STYLE[style]}{ref_text}\n\n[Question]\n{question['turns'][0]}\n\n[Answer]\n{answers[0]}")
    else:
        body = (f"Rate the assistant's answer to the user's last question in this conversation on a scale of 1 to "
                f"10, {CRITERIA} Rate the last answer only; the earlier turn is context. {ASK_STYLE[style]}"
                f"{ref_text}\n\n[Conversation]{_history(question, answers, turn)}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]


def _reference_text(question: dict, turn: int) -> str:
    ref = reference(question, turn)
    return f" A reference answer is given: judge correctness against it.\n\n[Reference]\n{ref}" if ref else ""


def _history(question: dict, answers: list[str], turn: int) -> str:
    return "".join(f"\n\nUser: {question['turns'][i]}\n\nAssistant: {answers[i]}" for i in range(turn + 1))


def pairwise_messages(question: dict, first: list[str], second: list[str], turn: int,
                      style: str = "local") -> list[dict[str, str]]:
    """The judge's prompt comparing two assistants' answers to `turn` (0 or 1) of a question, the
    answers `first` shown as assistant A's."""
    if turn == 0:
        body = (f"Compare two AI assistants' answers to the user's question, {COMPARE_CRITERIA} {ASK_VERDICT[style]}"
                f"{_reference_text(question, turn)}\n\n[Question]\n{question['turns'][0]}\n\n"
                f"[Assistant A's answer]\n{first[0]}\n\n[Assistant B's answer]\n{second[0]}")
    else:
        body = (f"Compare two AI assistants' answers to the user's last question in these conversations, "
                f"{COMPARE_CRITERIA} Compare the last answers only; the earlier turn is context. "
                f"{ASK_VERDICT[style]}{_reference_text(question, turn)}\n\n"
                f"[Conversation with assistant A]{_history(question, first, turn)}\n\n"
                f"[Conversation with assistant B]{_history(question, second, turn)}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]


def scored_messages(prompt: str, style: str = "local") -> list[dict[str, str]]:
    """A judge grader's own question (grader.prompt, filled in; OpenAI's score_model input), then the
    scale and the form of the reply, as the MT-Bench prompt asks them."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"{prompt}\n\nRate it on a scale of 1 to 10. {ASK_STYLE[style]}"}]


def label_messages(prompt: str, labels: list[str], style: str = "local") -> list[dict[str, str]]:
    """A label grader's question (its prompt, filled in), then the labels and the form of the reply."""
    ask = {"api": "Think it over briefly, then give one label in the form [[label]]: ",
           "local": "Reply with one label only, in the form [[label]]: "}[style]
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"{prompt}\n\n{ask}{_choices(labels)}."}]


def _choices(labels: list[str]) -> str:
    return ", ".join(f"[[{label}]]" for label in labels)


LABEL = re.compile(r"\[\[([^\[\]]+)\]\]")


def label_parser(labels: list[str]) -> tuple[Callable[[str], str | None], str]:
    """(parse, re-ask) for an API judge picking one of `labels`: the last [[label]] in the reply that is
    one of them, case aside (a judge may quote the format, or another label, earlier)."""
    by_fold = {label.casefold(): label for label in labels}

    def parse(reply: str) -> str | None:
        found = [by_fold[m.strip().casefold()] for m in LABEL.findall(reply) if m.strip().casefold() in by_fold]
        return found[-1] if found else None

    return parse, f"Give only the label now: one of {_choices(labels)}."


def label_distribution(model, tokenizer, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
    """A local judge's probability of writing each label (choice_distribution)."""
    return dict(zip(labels, choice_distribution(model, tokenizer, messages, labels)))


def parse_verdict(reply: str) -> str | None:
    """The last [[A]], [[B]] or [[C]] in the reply (a judge may quote the format earlier)."""
    found = VERDICT.findall(reply)
    return found[-1] if found else None


def comparison_outcome(model_first: str | None, model_second: str | None) -> str | None:
    """The model's result of a comparison asked twice: shown as A (model_first's verdict), then as B.
    win or loss only when both orders agree; otherwise (a tie, or each order favouring its first or
    second answer) a tie; None when either was undecided."""
    if model_first is None or model_second is None:
        return None
    as_a = {"A": "win", "B": "loss", "C": "tie"}[model_first]
    as_b = {"A": "loss", "B": "win", "C": "tie"}[model_second]
    return as_a if as_a == as_b else "tie"


def parse_rating(reply: str) -> float | None:
    """The last [[n]] in the reply (a judge may quote the format earlier), if 1 <= n <= 10."""
    found = [float(m) for m in RATING.findall(reply)]
    return found[-1] if found and 1 <= found[-1] <= 10 else None


def rating_distribution(model, tokenizer, messages: list[dict[str, str]]) -> list[float]:
    """P(rating) for ratings 1..10, from the judge's log-probabilities of writing "k]]"."""
    return choice_distribution(model, tokenizer, messages, [str(k) for k in RATINGS])


def local_judgement(model, tokenizer, messages: list[dict[str, str]], kind: str) -> float | str:
    """A local judge's rating (kind rating: the expectation over 1..10) or verdict (kind verdict: the
    likeliest of A, B, C)."""
    if kind == "rating":
        return round(expected_rating(rating_distribution(model, tokenizer, messages)), 4)
    probs = choice_distribution(model, tokenizer, messages, VERDICTS)
    return VERDICTS[max(range(len(VERDICTS)), key=probs.__getitem__)]


def choice_distribution(model, tokenizer, messages: list[dict[str, str]], choices: list[str]) -> list[float]:
    """P(choice) over the choices, from the judge's log-probabilities of writing "choice]]" after "[[".

    The shared prompt is read once; its KV cache is repeated for every candidate, so the
    cost is one prompt pass plus a few tokens per candidate."""
    import torch  # noqa: PLC0415 - a local judge only

    from ..chat import render  # noqa: PLC0415

    with torch.no_grad():
        prompt = tokenizer(render(tokenizer, messages, add_generation_prompt=True) + "[[",
                           add_special_tokens=False)["input_ids"]
        candidates = [tokenizer(f"{c}]]", add_special_tokens=False)["input_ids"] for c in choices]
        # Only the last position's logits: a long prompt's whole (tokens x vocab) would outweigh the cache.
        last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        out = model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True, **last)
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


class LanguageRule:
    """Is an answer confidently in another language than its question?"""

    def __init__(self, languages: list[str]):
        from ..dataset.languages import UnknownLanguages, identifier  # noqa: PLC0415

        try:
            self.ident = identifier(sorted(set(languages) | {"en"}))
        except UnknownLanguages as exc:
            raise InvalidTask(f"spec.judge.languages: {exc} (or set spec.judge.languageRule false)") from None

    def off_language(self, question_language: str, answer: str) -> bool:
        if sum(c.isalpha() for c in answer) < LANGUAGE_RULE_MIN_LETTERS:
            return False  # too short to tell (a number, a line of code)
        found, confidence = self.ident.classify(answer)
        return found != question_language and confidence >= LANGUAGE_RULE_CONFIDENCE


def _rating(model, tokenizer, messages: list[dict[str, str]]) -> dict[str, float]:
    return {"rating": expected_rating(rating_distribution(model, tokenizer, messages))}


def judge_with_model(loaded, source: dict[str, Any], items: list[tuple[str, list[dict[str, str]]]], cache_uri: str,
                     on_rating=lambda *_, **__: None, held: bool = False,
                     usage: Usage | None = None, judged=_rating) -> dict[str, dict[str, Any]]:
    """{item id: {rating}} (or what `judged(model, tokenizer, messages)` gives: a label grader's
    {labels: probabilities}) for each (id, judge messages in the local style) from a local judge:
    `source` the model, loaded() its model and tokenizer (a LazyModel, so that a run whose ratings
    are all cached loads nothing). Ratings are cached in the store by the exact prompt, as an API
    judge's are, so any phase asking the same judge the same question reads the same rating. `held`:
    the process's cache, read once (AnswerCache.opened), for a caller that asks at every step; `usage`:
    where ratings computed (requests) and found in the cache are counted."""
    cache = AnswerCache.opened(cache_uri, "judge", {"local": source}, held)
    usage = usage or Usage()
    out: dict[str, dict[str, Any]] = {}
    for item_id, messages in items:
        key = AnswerCache.key(messages)
        verdict, cached = cache.get(key), True
        if verdict is None:
            model, tokenizer = loaded()
            verdict, cached = judged(model, tokenizer, messages), False
            cache.put(key, verdict)
            usage.paid()
        else:
            usage.cached += 1
        out[item_id] = verdict
        on_rating(item_id, verdict, cached=cached)
    cache.compact()
    return out


PARSERS = {"rating": (parse_rating, REASK), "verdict": (parse_verdict, REASK_VERDICT)}


def judge_with_api(endpoint: dict[str, Any], items: list[tuple[str, list[dict[str, str]]]], cache_uri: str,
                   max_reasks: int, on_rating, transport=None, field: str = "spec.judge.openai", kind: str = "rating",
                   key_env: str = JUDGE_KEY_ENV, held: bool = False,
                   usage: Usage | None = None, parser=None) -> dict[str, dict[str, Any]]:
    """{item id: {rating (or verdict, or label: kind; None when the reply had none), reply, attempts}}
    for each (id, judge messages). `field`: where the endpoint is in the spec, for error messages;
    `key_env`: the variable its key is in; `usage`: where the verdicts asked for (requests) and found in
    the cache are counted, with the tokens of every reply (re-asks included); `parser`: (parse, re-ask)
    where PARSERS has none for the kind (label_parser)."""
    parse, reask = parser or PARSERS[kind]
    usage = usage or Usage()
    cache = AnswerCache.opened(cache_uri, "judge", {"openai": endpoint_identity(endpoint), "prompt": 1}, held)
    out: dict[str, dict[str, Any]] = {}
    todo = []
    for item_id, messages in items:
        found = cache.get(AnswerCache.key(messages))
        if found is not None:
            out[item_id] = found
            usage.cached += 1
            on_rating(item_id, found, cached=True)
        else:
            todo.append((item_id, messages))
    if not todo:
        return out
    key = api_key(endpoint, key_env, field)
    # A reasoning judge's limit counts its reasoning too, which runs to thousands of tokens before a rating.
    reply_tokens = REASONING_REPLY_TOKENS if endpoint.get("reasoningEffort") else REPLY_TOKENS

    async def rate_all() -> None:
        async with ChatClient(endpoint, key, field, transport=transport, usage=usage) as client:
            async def rate(item: tuple[str, list[dict[str, str]]]) -> None:
                item_id, messages = item
                asked = list(messages)
                for attempt in range(1, max_reasks + 2):
                    reply = (await client.complete(asked, max_tokens=reply_tokens, temperature=0.0)).text
                    judged = parse(reply)
                    if judged is not None or attempt > max_reasks:
                        break
                    asked += [{"role": "assistant", "content": reply}, {"role": "user", "content": reask}]
                verdict = {kind: judged, "reply": reply, "attempts": attempt}
                usage.requests += 1
                await asyncio.to_thread(cache.put, AnswerCache.key(messages), verdict)
                out[item_id] = verdict
                on_rating(item_id, verdict, cached=False)

            await client.each(todo, rate)

    try:
        asyncio.run(rate_all())
    finally:
        cache.compact()
    return out
