"""filters.judge: a judge model rates every answer the teacher gave, 1-10, with the Benchmark's
single-answer grading prompt (a later turn is rated with the conversation before it); answers
below minScore are dropped. Ratings are cached like the teacher's answers, so a restart, a
rebuild with other filters or a sharded build's merge never pays for one twice. A local judge
reads its rating from the log-probabilities of "[[k]]" and never fails to give one."""

from __future__ import annotations

from typing import Any

from ..answer_cache import AnswerCache
from ..benchmark.judge import expected_rating, judge_messages, judge_with_api, rating_distribution

FIELD = "spec.filters.judge.openai"


class AnswerJudge:
    def __init__(self, spec: dict[str, Any], model_input: dict[str, Any] | None, cache_uri: str, transport=None):
        self.spec, self.model_input, self.cache_uri, self.transport = spec, model_input, cache_uri, transport
        self.min_score = spec.get("minScore", 6)
        self.requests = self.cached = 0
        self._model = None  # a LazyModel, for a local judge

    def prompt(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The judge's prompt for the last answer of a conversation."""
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        return judge_messages({"turns": users}, answers, len(answers) - 1, "api" if "openai" in self.spec else "local")

    def ratings(self, conversations: dict[str, list[dict[str, str]]]) -> dict[str, float | None]:
        """{id: rating of the conversation's last answer, None when an API judge gave none}."""
        items = [(cid, self.prompt(messages)) for cid, messages in conversations.items()]
        if "openai" in self.spec:
            def count(_item: str, _verdict: dict, cached: bool) -> None:
                if cached:
                    self.cached += 1
                else:
                    self.requests += 1

            verdicts = judge_with_api(self.spec["openai"], items, self.cache_uri, self.spec.get("maxReasks", 1),
                                      count, self.transport, field=FIELD)
            return {cid: verdict["rating"] for cid, verdict in verdicts.items()}
        return self._local_ratings(items)

    def _local_ratings(self, items: list[tuple[str, list[dict[str, str]]]]) -> dict[str, float]:
        cache = AnswerCache(self.cache_uri, "judge", {"local": self.model_input})
        cache.load()
        ratings = {}
        for cid, messages in items:
            key = AnswerCache.key(messages)
            verdict = cache.get(key)
            if verdict is None:
                model, tokenizer = self._local()
                verdict = {"rating": expected_rating(rating_distribution(model, tokenizer, messages))}
                cache.put(key, verdict)
                self.requests += 1
            else:
                self.cached += 1
            ratings[cid] = verdict["rating"]
        cache.compact()
        return ratings

    def _local(self) -> tuple:
        if self._model is None:
            from ..models import LazyModel  # noqa: PLC0415 - torch only for a local judge

            self._model = LazyModel(self.model_input)
        return self._model()
