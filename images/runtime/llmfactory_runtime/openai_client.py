"""An asynchronous OpenAI-compatible client (chat completions, and embeddings) that uses a provider's
rate limit fully and never gives up on a transient error: the DatasetBuild teacher, the Benchmark
judge, the graders' judge and embeddings.

- `concurrency` requests in flight; requests and tokens per minute as token buckets (the token
  cost of a request is reserved up front from its prompt length and max_tokens, and corrected
  with the usage the answer reports);
- 429, 408, 5xx, timeouts and dropped connections are retried with exponential backoff and full
  jitter, waiting at least what `Retry-After` asks; any other 4xx fails at once with the
  provider's message (a wrong key, an unknown model, a bad parameter cannot get better); 401, 403
  and 404 are the spec's fault and fail as an invalid task naming the endpoint's field.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import httpx

from . import (EMBEDDINGS_KEY_ENV, GRADER_KEY_ENV, JUDGE_KEY_ENV, REJECTED_KEY_ENV,  # noqa: F401 - re-exported
               TEACHER_KEY_ENV)
from . import api_keys
from .task import InvalidTask
from .usage import Usage
RETRYABLE = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}


class EndpointError(Exception):
    """The endpoint refused a request for a reason retrying cannot fix, or kept failing."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # A reasoning model's chain of thought, apart from its answer: DeepSeek's and vLLM's (a
    # --reasoning-parser) reasoning_content, OpenRouter's and newer vLLM's reasoning.
    reasoning: str | None = None
    # Its tokens among completion_tokens, where the API says (usage.completion_tokens_details: OpenAI's,
    # whose reasoning models keep the thoughts to themselves, and vLLM's with a reasoning parser).
    reasoning_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason != "length"


def endpoint_identity(endpoint: dict[str, Any]) -> dict[str, Any]:
    """What of an endpoint decides its answers, for the caches that keep them: its URL and model, and the
    reasoning effort and chat template arguments it is asked with (only where set: caches from before
    they were fields stay found)."""
    return {"baseUrl": endpoint.get("baseUrl"), "model": endpoint["model"],
            **{k: endpoint[k] for k in ("reasoningEffort", "chatTemplateKwargs") if endpoint.get(k)}}


def api_key(endpoint: dict[str, Any], env_name: str, field: str) -> str | None:
    """The key from the environment, where the Job put it by secretKeyRef (locally: export it)."""
    ref = endpoint.get("apiKeySecret")
    if not ref:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise InvalidTask(f"{field}.apiKeySecret names Secret {ref['name']} key {ref['key']}, but {env_name} is "
                          f"not set: on a cluster the operator passes it to the pod; locally, export {env_name}")
    return key


def require_keys(spec: dict[str, Any]) -> None:
    """Every API key the spec names is there (api_key): before any work, so that a missing judge's or
    tracker's key fails the run now, not after the model has loaded and answered."""
    for holder, env_name, field in api_keys(spec):
        api_key(holder, env_name, field)


class TokenBucket:
    """`rate` units per minute, holding at most a minute's worth; `take` waits until there is enough."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.capacity, self.clock = per_minute / 60.0, float(per_minute), clock
        self.level, self.stamp = float(per_minute), clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, amount: float) -> float:
        self._refill()
        amount = min(amount, self.capacity)  # a request larger than a minute's budget waits for a full bucket
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount  # may go negative: a later correction is debt the next requests wait for

    async def acquire(self, amount: float, sleep=asyncio.sleep) -> None:
        while (delay := self.wait_time(amount)) > 0:
            await sleep(delay)
        self.take(min(amount, self.capacity))


def retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the server asked us to wait (Retry-After as seconds or an HTTP date; retry-after-ms)."""
    if response is None:
        return None
    if ms := response.headers.get("retry-after-ms"):
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Full jitter: a random wait up to base * 2^attempt, capped (many clients do not retry in step)."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


# Refusals that say the endpoint's settings are wrong, not the request: what to check.
SPEC_FAULTS = {401: "check apiKeySecret", 403: "check apiKeySecret", 404: "check baseUrl and model"}


class ChatClient:
    def __init__(self, endpoint: dict[str, Any], key: str | None, field: str,
                 transport: httpx.AsyncBaseTransport | None = None, backoff_base: float = 1.0,
                 usage: Usage | None = None):
        """`usage`: where the tokens of each reply are counted (its caller counts the answers)."""
        self.endpoint, self.field, self.backoff_base, self.usage = endpoint, field, backoff_base, usage
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=endpoint.get("baseUrl", "https://api.openai.com/v1").rstrip("/"),
                                      headers=headers, transport=transport,
                                      timeout=httpx.Timeout(endpoint.get("timeoutSeconds", 120)))
        self.concurrency = endpoint.get("concurrency", 16)
        self.slots = asyncio.Semaphore(self.concurrency)
        rpm, tpm = endpoint.get("requestsPerMinute"), endpoint.get("tokensPerMinute")
        self.requests = TokenBucket(rpm) if rpm else None
        self.tokens = TokenBucket(tpm) if tpm else None
        self.retries = 0

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def each(self, items: Iterable[Any], work: Callable[[Any], Awaitable[None]]) -> None:
        """work(item) for every item, as many at once as keep the client's requests in flight (twice
        `concurrency`: one request goes out while another's answer is saved): a task for each of those,
        not one for each item (a million prompts' waiting tasks held ~1.7 GB)."""
        pending = iter(items)

        async def worker() -> None:
            for item in pending:
                await work(item)

        await asyncio.gather(*(worker() for _ in range(2 * self.concurrency)))

    async def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
                       **extra: Any) -> Completion:
        effort = self.endpoint.get("reasoningEffort")
        # A reasoning model (OpenAI's o-series, gpt-5) refuses max_tokens and any temperature but its own.
        limits = ({"max_completion_tokens": max_tokens, "reasoning_effort": effort} if effort else
                  {"max_tokens": max_tokens, "temperature": temperature})
        template = self.endpoint.get("chatTemplateKwargs")  # vLLM's, SGLang's, llama.cpp's
        body = {"model": self.endpoint["model"], "messages": messages, **limits,
                **({"chat_template_kwargs": template} if template else {}), **extra}
        # ~4 characters a token: reserved now, corrected by the reported usage afterwards.
        reserved = sum(len(m["content"]) for m in messages) / 4 + max_tokens
        return self._parse(await self._post("/chat/completions", body, reserved), reserved)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """The embedding of each text ({baseUrl}/embeddings, one request for them all)."""
        reserved = sum(len(t) for t in texts) / 4
        response = await self._post("/embeddings", {"model": self.endpoint["model"], "input": texts}, reserved)
        try:
            payload = response.json()
            vectors = [[float(x) for x in d["embedding"]] for d in sorted(payload["data"], key=lambda d: d["index"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise EndpointError(f"{self.endpoint.get('baseUrl')}: not embeddings ({exc}): {response.text[:200]}") from None
        if len(vectors) != len(texts):
            raise EndpointError(f"{self.endpoint.get('baseUrl')}: {len(vectors)} embeddings for {len(texts)} texts")
        prompt = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
        if self.tokens and prompt:
            self.tokens.take(prompt - reserved)
        if self.usage:
            self.usage.billed(prompt)
        return vectors

    async def _post(self, path: str, body: dict[str, Any], reserved: float) -> httpx.Response:
        """The endpoint's 200 answer to the request, within the limits, retried as the module says."""
        async with self.slots:
            for attempt in range(self.endpoint.get("maxRetries", 8) + 1):
                if self.requests:
                    await self.requests.acquire(1)
                if self.tokens:
                    await self.tokens.acquire(reserved)
                response, problem = None, None
                try:
                    response = await self.http.post(path, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if response is not None and response.status_code == 200:
                    return response
                if response is not None and response.status_code in SPEC_FAULTS:
                    raise InvalidTask(f"{self.field}: {self.endpoint.get('baseUrl')}: HTTP {response.status_code}: "
                                      f"{_error_message(response)} ({SPEC_FAULTS[response.status_code]})")
                if response is not None and response.status_code not in RETRYABLE:
                    raise EndpointError(f"{self.endpoint.get('baseUrl')}: HTTP {response.status_code}: "
                                        f"{_error_message(response)}", response.status_code)
                problem = problem or f"HTTP {response.status_code}: {_error_message(response)}"
                if attempt == self.endpoint.get("maxRetries", 8):
                    break
                self.retries += 1
                await asyncio.sleep(max(retry_after(response) or 0.0, backoff(attempt, self.backoff_base)))
        raise EndpointError(f"{self.endpoint.get('baseUrl')}: gave up after {attempt + 1} attempts: {problem}")

    def _parse(self, response: httpx.Response, reserved: float) -> Completion:
        data = response.json()
        try:
            choice = data["choices"][0]
            # Stripped: the chat template sets the whitespace around a turn, not the answer (the
            # transformers engine's are stripped too: generate.to_generation).
            text = (choice["message"].get("content") or "").strip()
            reasoning = next((r.strip() for r in (choice["message"].get("reasoning_content"),
                                                  choice["message"].get("reasoning")) if isinstance(r, str)), None)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{self.endpoint.get('baseUrl')}: not a chat completion: {str(data)[:200]}") from None
        usage = data.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        if self.tokens and usage:
            self.tokens.take(prompt + completion - reserved)
        if self.usage:
            self.usage.billed(prompt, completion)
        details = usage.get("completion_tokens_details") or {}
        thought_tokens = details.get("reasoning_tokens") if isinstance(details, dict) else None
        return Completion(text, choice.get("finish_reason") or "stop", prompt, completion, reasoning or None,
                          int(thought_tokens) if thought_tokens else None)


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        if error:
            return str(error)[:300]
    except (ValueError, AttributeError):
        pass
    return response.text[:300]
