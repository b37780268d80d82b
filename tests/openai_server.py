"""A local OpenAI-compatible chat-completions and embeddings server (aiohttp, in a thread of its own)
for the teacher, judge and embeddings tests: scripted answers, latency, rate-limit and server errors,
and a log of every request as the provider would see it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web


@dataclass
class Request:
    at: float
    messages: list[dict[str, str]]
    body: dict[str, Any]
    authorization: str | None
    status: int = 0
    delivered_at: float | None = None
    billed: tuple[int, int] = (0, 0)  # the usage answered: prompt and completion tokens

    @property
    def last_user(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def default_reply(request: Request) -> dict[str, Any]:
    return {"text": f"Answer: {request.last_user}"}


def letter_counts(text: str) -> list[float]:
    """The default embedding: how often each of a-z occurs (casefolded), so that cosines can be worked
    out by hand."""
    text = text.casefold()
    return [float(text.count(chr(c))) for c in range(ord("a"), ord("z") + 1)]


@dataclass
class OpenAIServer:
    """`reply(request)` -> {text, finish_reason?, reasoning?, hiddenReasoning?} or {status, headers?, error?}
    for a failure; `delay` (seconds) holds the answer back. Its tokens are words; a reasoning_content's
    (and hiddenReasoning's words, thoughts an OpenAI reasoning model keeps to itself) are among the
    completion tokens, reported as its reasoning tokens."""

    reply: Callable[[Request], dict[str, Any]] = default_reply
    embed: Callable[[str], list[float]] = letter_counts  # /embeddings: each input's vector
    embedded: list[str] = field(default_factory=list)  # every text /embeddings was asked for, in order
    embedding_tokens: int = 0  # the prompt tokens /embeddings billed
    latency: float = 0.0
    api_key: str | None = None
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def _handle(self, http: web.Request) -> web.Response:
        body = await http.json()
        req = Request(time.monotonic(), body["messages"], body, http.headers.get("Authorization"))
        self.requests.append(req)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.api_key and req.authorization != f"Bearer {self.api_key}":
                req.status = 401
                return web.json_response({"error": {"message": "Incorrect API key provided",
                                                    "type": "invalid_request_error"}}, status=401)
            out = self.reply(req)
            if out.get("delay"):  # a slow answer: longer than the client's timeout, it is a timeout
                await asyncio.sleep(out["delay"])
            if "status" in out:
                req.status = out["status"]
                return web.json_response({"error": {"message": out.get("error", "scripted failure")}},
                                         status=out["status"], headers=out.get("headers"))
            if any("reasoning_content" in m for m in req.messages):  # as DeepSeek's API refuses it
                req.status = 400
                return web.json_response({"error": {"message": "reasoning_content is not allowed in the input "
                                                               "messages"}}, status=400)
            req.status = 200
            text = out["text"]
            thought = len((out.get("reasoning") or "").split()) + out.get("hiddenReasoning", 0)
            req.billed = (sum(len(m["content"]) for m in req.messages) // 4 + 1, len(text.split()) + thought)
            response = web.json_response({
                "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, **(
                                 {"reasoning_content": out["reasoning"]} if out.get("reasoning") else {})},
                             "finish_reason": out.get("finish_reason", "stop")}],
                "usage": {"prompt_tokens": req.billed[0], "completion_tokens": req.billed[1],
                          "total_tokens": sum(req.billed),
                          **({"completion_tokens_details": {"reasoning_tokens": thought}} if thought else {})}})
            req.delivered_at = time.monotonic()
            return response
        finally:
            self.in_flight -= 1

    async def _embeddings(self, http: web.Request) -> web.Response:
        body = await http.json()
        if self.api_key and http.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if any(not t for t in texts):  # as OpenAI answers
            return web.json_response({"error": {"message": "'$.input' is invalid"}}, status=400)
        self.embedded += texts
        self.embedding_tokens += sum(len(t) for t in texts) // 4 + 1
        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": self.embed(t)} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": sum(len(t) for t in texts) // 4 + 1, "total_tokens": 0}})

    def start(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ready = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            app.router.add_post("/v1/embeddings", self._embeddings)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", port).start())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)
        return f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def billed(self, model: str) -> dict[str, int]:
        """The chat tokens answered to requests for `model`, as an ApiUsage counts them."""
        asked = [r.billed for r in self.requests if r.body["model"] == model]
        return {"promptTokens": sum(p for p, _ in asked), "completionTokens": sum(c for _, c in asked)}

    def asked(self, text: str) -> list[Request]:
        return [r for r in self.requests if r.last_user == text]
