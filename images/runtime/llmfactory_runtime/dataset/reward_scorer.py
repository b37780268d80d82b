"""preferences.rewardModel: a reward model scores each pair's candidate answers. Scores are kept
like the judge's ratings, in the namespace's cache under the reward model's identity, a chunk of
them at a time as they are computed: a restarted build, a rebuild with other filters or split, and
a sharded build's merge score nothing twice (each shard scores its own share)."""

from __future__ import annotations

from typing import Any, Callable

from ..answer_cache import AnswerCache
from ..usage import Usage

FIELD = "spec.preferences.rewardModel"
CHUNK = 256  # conversations scored (and written to the cache) together


class RewardScorer:
    def __init__(self, source: dict[str, Any], cache_uri: str):
        self.source, self.cache_uri = source, cache_uri
        self.usage = Usage()  # conversations scored here (requests), and found in the cache

    def scores(self, conversations: dict[str, list[dict[str, str]]],
               on_chunk: Callable[[int], None] = lambda done: None) -> dict[str, float]:
        """{id: the reward model's score of the conversation}; on_chunk(scored so far) as it goes."""
        cache = AnswerCache.opened(self.cache_uri, "reward-model", {"rewardModel": self.source})
        keys = {cid: AnswerCache.key(messages) for cid, messages in conversations.items()}
        missing = [cid for cid in conversations if cache.get(keys[cid]) is None]
        self.usage.cached += len(conversations) - len(missing)
        todo = list({keys[cid]: conversations[cid] for cid in missing}.items())  # a conversation twice: scored once
        if todo:
            from .. import reward_model  # noqa: PLC0415 - torch only when something is left to score

            model, tokenizer = reward_model.load(self.source, FIELD)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                got = reward_model.scores(model, tokenizer, [messages for _, messages in chunk])
                cache.put_pack({key: {"score": score} for (key, _), score in zip(chunk, got)})
                on_chunk(start + len(chunk))
            self.usage.requests += len(todo)
        return {cid: cache.get(keys[cid])["score"] for cid in conversations}
