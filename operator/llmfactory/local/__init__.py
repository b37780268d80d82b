"""Run manifests without a cluster: the embedded default (llmfactory run -f ...)."""

from .runner import LocalRunner, Outcome

__all__ = ["LocalRunner", "Outcome"]
