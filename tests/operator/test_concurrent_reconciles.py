"""Reconciliations that overlap: kopf runs the progress timer in parallel with the change handlers
of the same object, and a pod commits its result and ends while the operator looks at its run."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmfactory.controller.handlers import _reconcile
from llmfactory.controller.kube import Kube
from llmfactory.controller.reconcile import reconcile
from llmfactory_runtime.store import open_store, write_result
from tests.operator.test_reconcile import condition, end_job, failed

pytestmark = pytest.mark.asyncio


def fine_tune(tiny_model, tmp_path) -> dict:
    from tests.runtime.finetune_helpers import write_dataset
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ft", "namespace": "default"},
            "spec": {"baseModel": {"uri": f"file://{tiny_model}"}, "dataset": {"uri": write_dataset(tmp_path / "data")},
                     "hyperparameters": {"epochs": 1, "batchSize": 2, "maxSeqLength": 96}}}


class SlowJobReads(Kube):
    """An API server under load: the first read of the Job answers, then the reply takes until
    `resume` is set (the reconciliation holding it works from what the Job was)."""

    def __init__(self, job_name: str):
        super().__init__()
        self.job_name, self.read, self.resume = job_name, threading.Event(), threading.Event()

    def get(self, path: str) -> dict:
        obj = super().get(path)
        if path.endswith(f"/jobs/{self.job_name}") and not self.read.is_set():
            self.read.set()
            self.resume.wait(timeout=30)
        return obj


async def test_a_reconciliation_that_looked_before_the_job_failed_never_hides_the_failure(
        cluster, operator_settings, tiny_model, tmp_path):
    await cluster.apply(fine_tune(tiny_model, tmp_path))
    old_body = await cluster.get("FineTune", "ft")  # as an event delivered before any status was written
    lock = threading.Lock()  # the object's: the handlers of one object share it
    await asyncio.to_thread(_reconcile, old_body, Kube(), operator_settings, lock)
    job_name = (await cluster.get("FineTune", "ft"))["status"]["jobName"]

    # The timer's reconciliation reads the Job while it runs, and its reply is slow to come...
    slow = SlowJobReads(job_name)
    timer = asyncio.create_task(asyncio.to_thread(_reconcile, old_body, slow, operator_settings, lock))
    while not slow.read.is_set():
        await asyncio.sleep(0.01)
    # ...meanwhile the Job fails, and the change handler reconciles the object at once.
    await end_job(cluster, job_name, {"failed": 2, "conditions": failed(
        "BackoffLimitExceeded", "Job has reached the specified backoff limit")})
    change = asyncio.create_task(asyncio.to_thread(_reconcile, await cluster.get("FineTune", "ft"), Kube(),
                                                   operator_settings, lock))
    await asyncio.wait([change], timeout=1)  # long enough for it to patch, unless it waits its turn
    slow.resume.set()
    await timer
    await change

    # The failure stands, and the conditions say the same as the phase.
    obj = await cluster.get("FineTune", "ft")
    assert obj["status"]["phase"] == "Failed", obj["status"]
    assert condition(obj, "Stalled")["status"] == "True" and condition(obj, "Ready")["reason"] == "BackoffLimitExceeded"
    assert condition(obj, "Reconciling")["status"] == "False"


class CommitsAsTheJobIsRead(Kube):
    """The pod commits its result and ends between the operator's read of the store and its read
    of the Job."""

    def __init__(self, job_name: str, artifact_uri: str):
        super().__init__()
        self.job_name, self.artifact_uri, self.done = job_name, artifact_uri, False

    def get(self, path: str) -> dict:
        if path.endswith(f"/jobs/{self.job_name}") and not self.done:
            self.done = True
            write_result(open_store(self.artifact_uri), {"firstLoss": 2.1, "finalLoss": 1.2})
            self.patch(f"{path}/status", {"status": {"succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True", "reason": "Completed"}]}})
        return super().get(path)


async def test_a_result_committed_while_the_operator_looks_is_succeeded_not_a_job_without_result(
        cluster, operator_settings, tiny_model, tmp_path):
    await cluster.apply(fine_tune(tiny_model, tmp_path))
    await asyncio.to_thread(_reconcile, await cluster.get("FineTune", "ft"), Kube(), operator_settings,
                            threading.Lock())
    obj = await cluster.get("FineTune", "ft")
    kube = CommitsAsTheJobIsRead(obj["status"]["jobName"], obj["status"]["artifactUri"])
    outcome = await asyncio.to_thread(reconcile, obj, kube, operator_settings)
    assert kube.done and outcome.status["phase"] == "Succeeded", outcome.status
    assert outcome.status["headline"] == "loss 2.100 -> 1.200" and outcome.event[1] == "Succeeded"
