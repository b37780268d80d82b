"""The operator scenarios against a real cluster: `make e2e-cluster`.

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
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from llmfactory.api import KINDS
from llmfactory.controller.kube import Kube, custom_path
from llmfactory.controller.settings import OperatorSettings
from llmfactory_runtime.store import open_store
from tests.e2e.test_local_runner import pipeline
from tests.operator.harness import Operator
from tests.runtime.finetune_helpers import write_dataset

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("KUBECONFIG", "LLMFACTORY_E2E_STORE", "LLMFACTORY_IMAGE")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not all(os.environ.get(v) for v in REQUIRED),
                       reason=f"needs a real cluster: set {', '.join(REQUIRED)}"),
]


@dataclass
class Cluster:
    kube: Kube
    namespace: str
    store_root: str
    run_id: str

    def upload(self, local: Path, name: str) -> str:
        """A local folder, copied where the cluster's pods can read it; its URI."""
        uri = f"{self.store_root}/e2e-inputs/{self.run_id}/{name}"
        open_store(uri).upload_dir(local, "")
        return uri

    # The client blocks: its calls go to a thread, so that the operator's own loop is never held up.
    async def apply(self, manifest: dict) -> None:
        manifest["metadata"]["namespace"] = self.namespace
        await asyncio.to_thread(self.kube.create, custom_path(KINDS[manifest["kind"]].plural, self.namespace), manifest)

    async def get(self, kind: str, name: str) -> dict:
        return await asyncio.to_thread(self.kube.get, custom_path(KINDS[kind].plural, self.namespace, name))

    async def list(self, group_version: str, plural: str, labels: dict[str, str]) -> list[dict]:
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return await asyncio.to_thread(self.kube.list, f"{prefix}/namespaces/{self.namespace}/{plural}", labels)

    async def evict(self, pod: str) -> None:
        """What `kubectl drain` and a cluster autoscaler's scale-down do to a pod."""
        await asyncio.to_thread(self.kube.create, f"/api/v1/namespaces/{self.namespace}/pods/{pod}/eviction", {
            "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": self.namespace}})

    async def wait_for(self, kind: str, name: str, predicate, deadline: float) -> dict:
        while True:
            obj = await self.get(kind, name)
            if predicate(obj.get("status") or {}):
                return obj
            assert time.monotonic() < deadline, f"{kind} {name}: {obj.get('status')}"
            await asyncio.sleep(5)

    async def finished(self, kind: str, name: str, deadline: float) -> dict:
        obj = await self.wait_for(kind, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), deadline)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        return obj["status"]


@pytest_asyncio.fixture
async def cluster():
    """A namespace of its own on the cluster, the CRDs, the store's Secret, and the operator
    watching that namespace; all of it removed afterwards (the CRDs stay)."""
    kube, run_id = Kube(), uuid.uuid4().hex[:8]
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        kube.ensure("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(path.read_text()))
    namespace = f"llmfactory-e2e-{run_id}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    secret = os.environ.get("LLMFACTORY_S3_SECRET")
    if secret:
        data = {k: base64.b64encode(os.environ[k].encode()).decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        kube.create(f"/api/v1/namespaces/{namespace}/secrets",
                    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}, "data": data})
    store_root = os.environ["LLMFACTORY_E2E_STORE"].rstrip("/")
    settings = OperatorSettings(store_uri=f"{store_root}/e2e", image=os.environ["LLMFACTORY_IMAGE"], s3_secret=secret,
                                s3_endpoint=os.environ.get("LLMFACTORY_S3_ENDPOINT"), poll_seconds=5,
                                default_gpus={k: 0 for k in KINDS})
    operator = Operator(settings, namespaces=[namespace])
    await operator.start()
    try:
        yield Cluster(kube, namespace, store_root, run_id)
    finally:
        await operator.stop()
        kube.delete(f"/api/v1/namespaces/{namespace}")


@pytest.mark.asyncio
async def test_pipeline_on_a_real_cluster(cluster, tiny_model):
    model_uri = cluster.upload(Path(tiny_model), "model")
    for manifest in pipeline(Path("/unused")):
        _point_models_at(manifest, model_uri)
        if manifest["kind"] == "FineTune":  # two pods that meet through the headless Service's DNS
            manifest["spec"]["resources"] = {"gpusPerNode": 0, "nodes": 2}
        await cluster.apply(manifest)
    deadline = time.monotonic() + 1800
    for kind, name in (("DatasetBuild", "data"), ("FineTune", "ft"), ("Benchmark", "bench"), ("Quantization", "gguf")):
        status = await cluster.finished(kind, name, deadline)
        if kind == "FineTune":
            assert status["result"]["processes"] == 2  # one run of two processes, one per pod


@pytest.mark.asyncio
async def test_an_evicted_node_of_a_multi_node_fine_tune_restarts_the_run_from_its_checkpoint(
        cluster, tiny_model, tmp_path):
    """What a node drain or a spot reclaim does: the Eviction API on one pod of a two-pod run. The
    real Job controller ends the attempt (podFailurePolicy), the operator starts attempt 2 once no
    pod of attempt 1 is left, and that attempt resumes from the checkpoint both pods saved."""
    write_dataset(tmp_path / "data")
    ft = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ft-evicted"}, "spec": {
        "baseModel": {"uri": cluster.upload(Path(tiny_model), "model")},
        "dataset": {"uri": cluster.upload(tmp_path / "data", "data")},
        # 64 short conversations packed: ~12 steps an epoch, ~500 in all; the first checkpoint is
        # at step 20, so the eviction lands mid-run.
        "hyperparameters": {"epochs": 40, "batchSize": 2, "maxSeqLength": 96},
        "checkpointing": {"everySteps": 20}, "resources": {"gpusPerNode": 0, "nodes": 2}}}
    await cluster.apply(ft)
    deadline = time.monotonic() + 1800
    status = (await cluster.wait_for("FineTune", "ft-evicted", lambda s: s.get("jobName"), deadline))["status"]
    run, job = open_store(status["artifactUri"]), status["jobName"]
    while not any(key.endswith("COMMITTED") for key in await asyncio.to_thread(run.list, "checkpoints")):
        assert time.monotonic() < deadline, "no checkpoint committed"
        await asyncio.sleep(2)
    [pod] = [p["metadata"]["name"] for p in await cluster.list("v1", "pods", {"job-name": job})
             if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"]
    await cluster.evict(pod)

    status = await cluster.finished("FineTune", "ft-evicted", deadline)
    assert status["attempts"] == 2 and status["result"]["resumedFromStep"], status
    jobs = {j["metadata"]["name"]: j for j in await cluster.list("batch/v1", "jobs", {"llmfactory.dev/name": "ft-evicted"})}
    assert set(jobs) == {job, f"{job}-2"}
    failed = [c for c in jobs[job]["status"]["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["reason"] == "PodFailurePolicy", jobs[job]["status"]
    assert jobs[f"{job}-2"]["metadata"]["annotations"]["llmfactory.dev/failures-before"] == "0"  # not counted
    assert any(e["reason"] == "Interrupted" and e["involvedObject"]["name"] == "ft-evicted"
               for e in await cluster.list("v1", "events", {}))


def _point_models_at(manifest: dict, uri: str) -> None:
    spec = manifest["spec"]
    for holder in (spec.get("teacher"), spec.get("judge")):
        if holder:
            holder["model"] = {"uri": uri}
    if "baseModel" in spec:
        spec["baseModel"] = {"uri": uri}
