"""The operator scenario against a real cluster: `make e2e-cluster`.

Runs when KUBECONFIG points at a cluster and these are set, and is skipped otherwise:
  LLMFACTORY_E2E_STORE   s3://bucket/prefix reachable from here and from the cluster's pods
  LLMFACTORY_IMAGE       a runtime image the cluster can pull (make images)
  LLMFACTORY_S3_SECRET   optional: Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, created in the
                         test namespace from this process's AWS_* environment
  LLMFACTORY_S3_ENDPOINT optional: S3 endpoint URL as the pods see it
The operator runs here (as in development); the Jobs run on the cluster with the real runtime image.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from llmfactory.api import KINDS
from llmfactory.controller.kube import Kube, custom_path
from llmfactory.controller.settings import OperatorSettings
from llmfactory_runtime.store import open_store
from tests.e2e.test_local_runner import pipeline
from tests.operator.harness import Operator

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("KUBECONFIG", "LLMFACTORY_E2E_STORE", "LLMFACTORY_IMAGE")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not all(os.environ.get(v) for v in REQUIRED),
                       reason=f"needs a real cluster: set {', '.join(REQUIRED)}"),
]


@pytest.mark.asyncio
async def test_pipeline_on_a_real_cluster(tiny_model):
    store_root = os.environ["LLMFACTORY_E2E_STORE"].rstrip("/")
    run_id = uuid.uuid4().hex[:8]
    model_uri = f"{store_root}/e2e-models/{run_id}"
    open_store(model_uri).upload_dir(Path(tiny_model), "")

    kube = Kube()
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        kube.ensure("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(path.read_text()))
    namespace = f"llmfactory-e2e-{run_id}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    secret = os.environ.get("LLMFACTORY_S3_SECRET")
    if secret:
        data = {k: base64.b64encode(os.environ[k].encode()).decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        kube.create(f"/api/v1/namespaces/{namespace}/secrets",
                    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}, "data": data})
    settings = OperatorSettings(store_uri=f"{store_root}/e2e", image=os.environ["LLMFACTORY_IMAGE"], s3_secret=secret,
                                s3_endpoint=os.environ.get("LLMFACTORY_S3_ENDPOINT"), poll_seconds=5,
                                default_gpus={k: 0 for k in KINDS})
    operator = Operator(settings, namespaces=[namespace])
    await operator.start()
    try:
        for manifest in pipeline(Path("/unused")):
            manifest["metadata"]["namespace"] = namespace
            _point_models_at(manifest, model_uri)
            if manifest["kind"] == "FineTune":  # two pods that meet through the headless Service's DNS
                manifest["spec"]["resources"] = {"gpusPerNode": 0, "nodes": 2}
            kube.create(custom_path(KINDS[manifest["kind"]].plural, namespace), manifest)
        deadline = time.monotonic() + 1800
        for kind, name in (("DatasetBuild", "data"), ("FineTune", "ft"), ("Benchmark", "bench"), ("Quantization", "gguf")):
            while True:
                obj = await asyncio.to_thread(kube.get, custom_path(KINDS[kind].plural, namespace, name))
                phase = (obj.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    break
                assert time.monotonic() < deadline, f"{kind} {name} still {phase}"
                await asyncio.sleep(5)
            assert phase == "Succeeded", obj["status"]
        assert (await asyncio.to_thread(kube.get, custom_path("finetunes", namespace, "ft")))["status"]["result"][
            "processes"] == 2  # one run of two processes, one per pod
    finally:
        await operator.stop()
        kube.delete(f"/api/v1/namespaces/{namespace}")


def _point_models_at(manifest: dict, uri: str) -> None:
    spec = manifest["spec"]
    for holder in (spec.get("teacher"), spec.get("judge")):
        if holder:
            holder["model"] = {"uri": uri}
    if "baseModel" in spec:
        spec["baseModel"] = {"uri": uri}
