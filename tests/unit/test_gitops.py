"""GitOps health: Argo CD's Lua health check, run in Lua 5.1 (Argo CD's gopher-lua dialect)
against statuses the operator's own status module writes; the example GitOps manifests parse."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import lupa.lua51 as lupa
import pytest
import yaml

from llmfactory.controller.status import situation, succeeded

ROOT = Path(__file__).resolve().parents[2]
LUA = (ROOT / "gitops" / "argocd" / "health.lua").read_text()
FINETUNE_RESULT = {"firstLoss": 1.4, "finalLoss": 0.8, "tokensPerSecond": 7500.0}


def health(obj: dict) -> tuple[str, str]:
    lua = lupa.LuaRuntime()
    check = lua.eval(f"function(obj) {LUA} end")
    result = check(lua.table_from(obj, recursive=True))
    return result["status"], result["message"]


def resource(status: dict | None, generation: int = 2, kind: str = "FineTune") -> dict:
    obj = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": kind,
           "metadata": {"name": "ft", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("status, expected, words", [
    (situation("Pending", "Planned", "task planned", {}, 2), "Progressing", "task planned"),
    (situation("Waiting", "WaitingForDependency", "waiting for DatasetBuild data (spec.dataset.datasetBuildRef)",
               {}, 2), "Progressing", "DatasetBuild data"),
    (situation("Running", "Running", "step 120/900, loss 0.91", {}, 2), "Progressing", "loss 0.91"),
    (situation("Running", "Queued", "Job ft-1 is suspended, waiting for admission (Kueue)", {}, 2),
     "Suspended", "Kueue"),
    (situation("Waiting", "Suspended", "spec.suspend is true: Job ft-1 is suspended and its pods stopped", {}, 2),
     "Suspended", "spec.suspend"),
    (situation("Pending", "RetryRequested", "llmfactory.dev/retry=1: the failed run starts again", {}, 2),
     "Progressing", "starts again"),
    (situation("Running", "OOMKilled", "pod ft-1-abc ran out of memory; raise spec.resources.memory", {}, 2),
     "Progressing", "OOMKilled"),
    (situation("Failed", "InvalidSpec", "spec.hyperparameters.batchSize: must be >= 1", {}, 2),
     "Degraded", "spec.hyperparameters.batchSize"),
    (succeeded("FineTune", FINETUNE_RESULT, {}, 2), "Healthy", "loss 1.400 -> 0.800"),
    (succeeded("FineTune", {**FINETUNE_RESULT, "bestStep": 40, "stoppedEarly": True}, {}, 2), "Healthy",
     "loss 1.400 -> 0.800, best eval at step 40 (stopped early)"),
])
def test_each_operator_situation_maps_to_argo_health(status, expected, words):
    state, message = health(resource(status))
    assert state == expected and words in message, (state, message)


def test_failed_benchmark_gates_are_degraded():
    result = {"gates": [{"gate": "judge.score >= 6.5", "passed": False, "value": 5.1}], "passed": False,
              "metrics": {"judge.score": 5.1}, "reportUri": "s3://b/r"}
    state, message = health(resource(succeeded("Benchmark", result, {}, 2), kind="Benchmark"))
    assert state == "Degraded" and "judge.score >= 6.5" in message


def test_a_status_older_than_the_spec_is_progressing_even_if_it_said_ready():
    """Right after a Git change the old status still says Ready: Argo CD must not call the new spec healthy."""
    state, message = health(resource(succeeded("FineTune", FINETUNE_RESULT, {}, 1), generation=2))
    assert state == "Progressing" and "generation 2" in message


def test_no_status_yet_is_progressing():
    assert health(resource(None))[0] == "Progressing"


def test_argocd_configmap_carries_the_check_for_every_kind():
    cm = yaml.safe_load((ROOT / "gitops" / "argocd" / "argocd-cm.yaml").read_text())
    keys = {f"resource.customizations.health.llmfactory.dev_{k}" for k in
            ("DatasetBuild", "FineTune", "Benchmark", "Quantization")}
    assert set(cm["data"]) == keys and all(v == LUA for v in cm["data"].values())


@pytest.mark.parametrize("path", sorted((ROOT / "gitops").rglob("*.yaml")), ids=lambda p: p.name)
def test_gitops_examples_point_at_this_chart(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)
    chart_values = yaml.safe_load((ROOT / "charts/llmfactory/values.yaml").read_text())
    schema = json.loads((ROOT / "charts/llmfactory/values.schema.json").read_text())
    charts = [d["spec"]["source"]["path"] for d in docs if d["kind"] == "Application" and
              d["spec"]["source"]["repoURL"].endswith("llmfactory/llmfactory.git")]
    charts += [d["spec"]["chart"]["spec"]["chart"] for d in docs if d["kind"] == "HelmRelease"]
    for chart in charts:
        assert (ROOT / chart / "Chart.yaml").exists()
    for d in docs:  # values given to the chart are values the chart's schema accepts, as Helm merges them
        spec = d.get("spec") or {}
        values = spec.get("values") if d["kind"] == "HelmRelease" else \
            spec.get("source", {}).get("helm", {}).get("valuesObject")
        if values:
            jsonschema.validate(merged(chart_values, values), schema)


def merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out
