"""Answers already paid for, kept in the store outside any run's prefix and keyed by what was
asked (the model, the parameters, the whole conversation up to the question): a restarted
build, or a new build that only changed its filters or split, never pays for them again.

Each answer is written as its own object the moment it arrives (a kill loses nothing that was
received), answers computed together (a grader's batch of scores) as one pack; `compact` folds the
objects written so into one pack, every COMPACT_EVERY objects and at the end, so that the next
start reads a few objects, not thousands (a million single answers: minutes to read, and hours to
delete one request at a time at S3's latency; a GRPO run's grader, a pack a step).
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .store import Store, open_store

SINGLES, PACKS = "answers", "packs"
COMPACT_EVERY = 1000  # objects folded into a pack as they come (~2 MB of a teacher's single answers)
_held: dict[str, AnswerCache] = {}  # AnswerCache.opened(held=True)'s, by folder


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AnswerCache:
    @classmethod
    def opened(cls, cache_uri: str, purpose: str, identity: dict[str, Any], held: bool = False) -> AnswerCache:
        """The cache, loaded. `held`: this process's one instance of the folder, loaded at its first
        use only, for a caller that asks again and again (a GRPO grader, at every step), which would
        otherwise reread the whole folder (a pack a call) each time; what it adds goes to the store too."""
        if not held:
            cache = cls(cache_uri, purpose, identity)
            cache.load()
            return cache
        folder = f"{cache_uri.rstrip('/')}/{purpose}/{digest(identity)[:24]}"
        if folder not in _held:
            _held[folder] = cls.opened(cache_uri, purpose, identity)
        return _held[folder]

    @staticmethod
    def forget_held() -> None:
        """Let go of this process's held caches: each is loaded again at its next use, with what other
        processes wrote since (the last shard of a DatasetBuild merges in its own process)."""
        _held.clear()

    def __init__(self, cache_uri: str, purpose: str, identity: dict[str, Any]):
        """`identity`: what makes an answer differ besides the conversation (model, temperature,
        max tokens...). Its digest names the folder, so unrelated answers are never even read."""
        self.store: Store = open_store(f"{cache_uri.rstrip('/')}/{purpose}/{digest(identity)[:24]}")
        self.answers: dict[str, dict[str, Any]] = {}
        self.written: list[tuple[str, list[str]]] = []  # (object, its keys): to fold into the next pack
        self._lock = threading.Lock()  # put from several threads (an API's answers as they arrive)

    @staticmethod
    def key(messages: list[dict[str, str]], sample: int = 0) -> str:
        """The key of the answer to the conversation; another `sample` is another answer to it (the
        first keeps the plain key: a build that samples more finds the answers of one that sampled once)."""
        return digest(messages) if sample == 0 else digest({"messages": messages, "sample": sample})

    def load(self) -> dict[str, dict[str, Any]]:
        names = self.store.list()

        def read(name: str) -> dict[str, Any]:
            try:
                data = self.store.read_json(name)
            except (ValueError, OSError):  # cut short by a kill while writing: as if never received
                return {}
            return data if name.startswith(PACKS) else {_single_key(name): data}

        with ThreadPoolExecutor(16) as pool:
            for part in pool.map(read, names):
                self.answers.update(part)
        self.written = [(n, [_single_key(n)]) for n in names if n.startswith(SINGLES)]
        return self.answers

    def get(self, key: str) -> dict[str, Any] | None:
        return self.answers.get(key)

    def put(self, key: str, answer: dict[str, Any]) -> None:
        name = f"{SINGLES}/{key}.json"
        self.store.write_json(name, answer)
        self._keep(name, {key: answer})

    def put_pack(self, answers: dict[str, dict[str, Any]]) -> None:
        """Answers computed together (a batch of scores), written as one pack."""
        name = f"{PACKS}/{uuid.uuid4().hex}.json"
        self.store.write_json(name, answers)
        self._keep(name, answers)

    def _keep(self, name: str, answers: dict[str, dict[str, Any]]) -> None:
        """The answers just written as object `name`, held; every COMPACT_EVERY such objects, one pack."""
        self.answers.update(answers)
        with self._lock:
            self.written.append((name, list(answers)))
            full = len(self.written) >= COMPACT_EVERY
        if full:
            self.compact(minimum=COMPACT_EVERY)

    def compact(self, minimum: int = 64) -> None:
        """The objects this process wrote (and single answers found at the start) into one pack, then
        they go (the pack is written first, so a kill in between only leaves duplicates). Those
        written meanwhile wait for the next pack."""
        with self._lock:
            if len(self.written) < minimum:
                return
            written, self.written = self.written, []
        keys = [key for _, keys in written for key in keys]
        self.store.write_json(f"{PACKS}/{uuid.uuid4().hex}.json",
                              {k: self.answers[k] for k in keys if k in self.answers})
        self.store.delete_many([name for name, _ in written])


def _single_key(name: str) -> str:
    return name.rsplit("/", 1)[-1].removesuffix(".json")
