"""Metric cosine of grader operation similarity (OpenAI's text_similarity grader's cosine): the cosine
similarity of an answer's and its reference's embeddings, by an OpenAI-compatible embeddings endpoint
(grader.embeddings).

What was paid for is kept in the store (answer_cache), in two folders per endpoint and model: each
score by its answer and reference, and each reference's embedding (a dataset's references recur every
epoch; answers are sampled anew). A process reads them once, at its first call (AnswerCache.opened,
held), and adds what it asks for after: a resumed run pays for nothing it had, and a long run does not
reread its own history at every step.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from . import EMBEDDINGS_KEY_ENV
from .answer_cache import AnswerCache, digest
from .openai_client import ChatClient, api_key
from .usage import Usage

BATCH = 256  # texts a request embeds (OpenAI takes up to 2048)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


def cosines(endpoint: dict[str, Any], answers: list[str | None], references: list[str], cache_uri: str,
            field: str, usage: Usage | None = None) -> list[float]:
    """Each answer's cosine similarity to its reference, 0-1 (below 0 counts 0); an answer that is None
    (grader.extract found nothing) or empty scores 0 without a request. `field` names the endpoint in
    the spec, for its errors; `usage`: where the scores computed and found in the cache, and the tokens
    billed, are counted."""
    usage = usage or Usage()
    identity = {"baseUrl": endpoint.get("baseUrl"), "model": endpoint["model"]}
    scores, embedded = (AnswerCache.opened(cache_uri, purpose, identity, held=True)
                        for purpose in ("cosine", "embeddings"))
    keys = [digest([a, r]) if a and r else None for a, r in zip(answers, references)]
    todo = {k: (a, r) for k, a, r in zip(keys, answers, references) if k and scores.get(k) is None}
    usage.cached += sum(1 for k in set(keys) if k and k not in todo)
    if todo:
        texts = list(dict.fromkeys([a for a, _ in todo.values()]
                                   + [r for _, r in todo.values() if embedded.get(digest(r)) is None]))
        vectors = dict(zip(texts, _embed(endpoint, texts, field, usage)))
        usage.requests += len(todo)
        new_references = {digest(r): {"embedding": vectors[r]} for _, r in todo.values() if r in vectors}
        if new_references:
            embedded.put_pack(new_references)

        def vector(text: str) -> list[float]:
            return vectors[text] if text in vectors else embedded.get(digest(text))["embedding"]

        scores.put_pack({k: {"cosine": cosine(vector(a), vector(r))} for k, (a, r) in todo.items()})
    return [min(1.0, max(0.0, scores.get(k)["cosine"])) if k else 0.0 for k in keys]  # rounding may pass 1


def _embed(endpoint: dict[str, Any], texts: list[str], field: str, usage: Usage) -> list[list[float]]:
    key = api_key(endpoint, EMBEDDINGS_KEY_ENV, field)

    async def embed_all() -> list[list[float]]:
        async with ChatClient(endpoint, key, field, usage=usage) as client:
            batches = await asyncio.gather(*(client.embed(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)))
        return [v for batch in batches for v in batch]

    return asyncio.run(embed_all())
