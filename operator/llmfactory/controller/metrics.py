"""Prometheus metrics of the operator, served on /metrics (llmfactory operator --metrics-port)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("llmfactory_reconciles_total", "Reconciliations, by kind and resulting phase", ["kind", "phase"])
ERRORS = Counter("llmfactory_reconcile_errors_total", "Reconciliations that raised, by kind", ["kind"])
LATENCY = Histogram("llmfactory_reconcile_seconds", "Time one reconciliation took, by kind", ["kind"])
RESOURCES = Gauge("llmfactory_resources", "Resources this operator has seen, by kind and phase", ["kind", "phase"])
JOBS_CREATED = Counter("llmfactory_jobs_created_total", "Jobs created, by kind", ["kind"])
JOBS_FAILED = Counter("llmfactory_jobs_failed_total", "Jobs that failed for good, by kind", ["kind"])
JOBS_RETRIED = Counter("llmfactory_job_retries_total", "Pod attempts that failed and were retried, by kind", ["kind"])

_phases: dict[tuple[str, str, str], str] = {}  # (kind, namespace, name) -> last phase


@contextmanager
def timed(kind: str):
    start = time.perf_counter()
    try:
        yield
    except Exception:
        ERRORS.labels(kind).inc()
        raise
    finally:
        LATENCY.labels(kind).observe(time.perf_counter() - start)


def observe(kind: str, namespace: str, name: str, phase: str | None, event_reason: str | None,
            job_created: bool = False) -> None:
    RECONCILES.labels(kind, phase or "Unknown").inc()
    key = (kind, namespace, name)
    previous = _phases.get(key)
    if phase and phase != previous:
        if previous:
            RESOURCES.labels(kind, previous).dec()
        RESOURCES.labels(kind, phase).inc()
        _phases[key] = phase
    if job_created:
        JOBS_CREATED.labels(kind).inc()
    if event_reason == "JobFailed":
        JOBS_FAILED.labels(kind).inc()
    elif event_reason == "Retrying":
        JOBS_RETRIED.labels(kind).inc()


def forget(kind: str, namespace: str, name: str) -> None:
    phase = _phases.pop((kind, namespace, name), None)
    if phase:
        RESOURCES.labels(kind, phase).dec()
