"""What the planner checked a resource's dependents against before it ran (what its spec promised) is
what its finished result holds: a promise that a run breaks would refuse good pipelines, or pass bad ones."""

from __future__ import annotations

from typing import Any

from llmfactory.planner import parse, promised, promises_among
from llmfactory.planner.promise import PENDING


def assert_promise_kept(manifests: list[dict], name: str, result: dict[str, Any]) -> None:
    """`result` (the finished run of the manifest named `name`, beside the others applied with it)
    holds each field its spec promised, as promised, and none promised absent."""
    resources = [parse(m) for m in manifests]
    [res] = [r for r in resources if r.name == name]
    promise = promised(res, promises_among(resources))
    for key, value in promise.items():
        assert key in result and _matches(value, result[key]), (name, key, value, result.get(key))
    # Which fields hold references a GRPO run finds; promised absent, so that nothing is checked early.
    # A null is absent: a merge patch of status drops it.
    for key in promise.absent - {"datasetReferenceFields"}:
        assert result.get(key) is None, (name, key, result[key])


def assert_task_kept_promise(task: dict[str, Any], result: dict[str, Any]) -> None:
    """assert_promise_kept for a planned task (its spec with the defaults filled in), run alone."""
    resource = task["resource"]
    manifest = {"apiVersion": task["apiVersion"], "kind": resource["kind"],
                "metadata": {"name": resource["name"], "namespace": resource["namespace"]}, "spec": task["spec"]}
    assert_promise_kept([manifest], resource["name"], result)


def _matches(promised_value: Any, value: Any) -> bool:
    """PENDING stands for any value; PENDING + a file name for any URI ending with it."""
    if isinstance(promised_value, str) and promised_value.startswith(PENDING):
        return isinstance(value, str) and value.endswith(promised_value.removeprefix(PENDING))
    if isinstance(promised_value, dict):
        return isinstance(value, dict) and all(k in value and _matches(v, value[k]) for k, v in promised_value.items())
    if isinstance(promised_value, list):  # the first artifacts
        return isinstance(value, list) and len(value) >= len(promised_value) and all(
            _matches(p, v) for p, v in zip(promised_value, value))
    return promised_value == value
