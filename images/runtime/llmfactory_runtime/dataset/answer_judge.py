"""filters.judge: a judge model rates every answer the teacher gave (or the sources hold), 1-10,
with the Benchmark's single-answer grading prompt (a later turn is rated with the conversation
before it); answers below minScore are dropped. Ratings are cached like the teacher's answers, so a
restart, a rebuild with other filters or a sharded build's merge never pays for one twice. A local
judge reads its rating from the log-probabilities of "[[k]]" and never fails to give one."""

from __future__ import annotations

from typing import Any

from ..benchmark.judge import judge_messages, judge_with_api, judge_with_model
from ..usage import Usage

FIELD = "spec.filters.judge.openai"


class AnswerJudge:
    def __init__(self, spec: dict[str, Any], model_input: dict[str, Any] | None, cache_uri: str, transport=None):
        self.spec, self.model_input, self.cache_uri, self.transport = spec, model_input, cache_uri, transport
        self.min_score = spec.get("minScore", 6)
        self.usage = Usage()  # ratings asked (or computed) and found in the cache, with an API judge's tokens
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
            verdicts = judge_with_api(self.spec["openai"], items, self.cache_uri, self.spec.get("maxReasks", 1),
                                      lambda *_, **__: None, self.transport, field=FIELD, usage=self.usage)
        else:
            verdicts = judge_with_model(self._local, self.model_input, items, self.cache_uri, usage=self.usage)
        return {cid: verdict["rating"] for cid, verdict in verdicts.items()}
    def _local(self) -> tuple:
        if self._model is None:
            from ..models import LazyModel  # noqa: PLC0415 - torch only for a local judge

            self._model = LazyModel(self.model_input)
        return self._model()
