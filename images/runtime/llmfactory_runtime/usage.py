"""What a run asked of a model: an API endpoint's answers and billed tokens, or a local model's
answers, with the cost at the endpoint's price (the results' teacherUsage, judgeUsage, graderUsage...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Usage:
    """What a phase asked of one endpoint (or local model): answers it paid for (requests: cache
    misses, an answer, a rating, a score), answers found in the cache instead (cached), and the tokens
    the endpoint billed (re-asks and every request of an answer included)."""

    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def billed(self, prompt_tokens: int, completion_tokens: int = 0) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def paid(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """An answer received, with its tokens."""
        self.requests += 1
        self.billed(prompt_tokens, completion_tokens)

    def since(self, earlier: "Usage") -> "Usage":
        """What was asked after `earlier` (this count as it was then)."""
        return Usage(self.requests - earlier.requests, self.cached - earlier.cached,
                     self.prompt_tokens - earlier.prompt_tokens, self.completion_tokens - earlier.completion_tokens)

    def report(self, price: dict[str, float] | None = None) -> dict[str, Any]:
        """The result's usage (its ApiUsage), with the cost at the endpoint's price when it has one."""
        out = {"requests": self.requests, "cached": self.cached, "promptTokens": self.prompt_tokens,
               "completionTokens": self.completion_tokens}
        if price:
            out["costUsd"] = round(self.prompt_tokens * price["inputPerMillion"] / 1e6
                                   + self.completion_tokens * price["outputPerMillion"] / 1e6, 6)
        return out
