"""The operator as a user sees it: apply manifests, watch them run, read status and Events."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import kmock
import kubernetes_validate
import pytest

from llmfactory.controller.handlers import status_changes
from llmfactory.controller.reconcile import attempt_ending
from llmfactory_runtime.store import open_store
from tests.e2e.test_local_runner import pipeline
from tests.operator.conftest import phase_is
from tests.operator.harness import kill_tree

pytestmark = pytest.mark.asyncio
ORDER = (("DatasetBuild", "data"), ("FineTune", "ft"), ("Benchmark", "bench"), ("Quantization", "gguf"))


def condition(obj, ctype):
    return next(c for c in obj["status"]["conditions"] if c["type"] == ctype)


def posted_events(cluster, name):
    return [e for e in cluster.objects("events") if e.get("involvedObject", {}).get("name") == name]


async def events_for(cluster, name, *reasons, timeout: float = 10):
    """The object's Events once `reasons` are among them, each as often as named (or the timeout
    has passed): kopf posts Events from a queue, so one may come a moment after the status it explains."""
    for _ in range(int(timeout * 10)):
        if Counter(reasons) <= Counter(e["reason"] for e in posted_events(cluster, name)):
            break
        await asyncio.sleep(0.1)
    return posted_events(cluster, name)


def story(cluster, job_controller, obj) -> str:
    """What a failed assertion on a run shows: its whole status, its Events and the end of each
    pod's log (a dict as the message would be cut short)."""
    name = obj["metadata"]["name"]
    events = "\n".join(f"  {e['type']} {e['reason']}: {e['message']}" for e in posted_events(cluster, name))
    logs = "".join(f"\n--- {path.relative_to(job_controller.workdir)}\n" + "\n".join(path.read_text().splitlines()[-15:])
                   for path in sorted(job_controller.workdir.glob("*/attempt-*.log")))
    unrun = "".join(f"\n{error}" for error in job_controller.errors)
    return f"status: {json.dumps(obj.get('status'), indent=1)}\nevents:\n{events}\npod logs:{logs}{unrun}"


@pytest.mark.slow
async def test_four_resources_applied_at_once_run_in_order(cluster, operator, job_controller, tiny_model):
    # The FineTune's Job runs one process (the multi-node tests run torchrun's; the local runner's quickstart
    # pipeline test, two on one node).
    manifests = pipeline(tiny_model)
    for manifest in reversed(manifests):  # dependents first: they must wait
        await cluster.apply(manifest)
    bench = await cluster.wait_for("Benchmark", "bench", phase_is("Waiting"))
    assert condition(bench, "Ready")["status"] == "False"
    assert condition(bench, "Reconciling")["reason"] == "WaitingForDependency"
    assert "FineTune ft" in condition(bench, "Ready")["message"]

    finished = {}
    for kind, name in ORDER:
        obj = await cluster.wait_for(kind, name, phase_is("Succeeded", "Failed"), timeout=240)
        status = obj["status"]
        assert status["phase"] == "Succeeded", status
        assert [(c["type"], c["status"]) for c in status["conditions"]] == [
            ("Ready", "True"), ("Reconciling", "False"), ("Stalled", "False")]
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        assert status["progress"]["percent"] == 100.0 and status["headline"] and status["attempts"] == 1
        # The status carries the run's committed result, as the store has it.
        run = open_store(status["artifactUri"])
        assert status["result"] == run.read_json("result.json") and status["jobName"]
        reasons = [e["reason"] for e in await events_for(cluster, name, "JobCreated", "Succeeded")]
        assert "JobCreated" in reasons and "Succeeded" in reasons
        finished[kind] = obj
    assert finished["FineTune"]["status"]["result"]["datasetDigest"] == finished["DatasetBuild"]["status"]["result"]["digest"]
    assert finished["FineTune"]["status"]["result"]["processes"] == 1
    # The planner's memory and time estimate for the tiny model, read from its config.json.
    assert "GiB per GPU" in finished["FineTune"]["status"]["estimate"]

    # One Job and one ConfigMap per resource, owned by it, valid for every supported Kubernetes.
    jobs, config_maps = cluster.objects("jobs"), cluster.objects("configmaps")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(o["status"]["jobName"] for o in finished.values())
    assert len(config_maps) == 4
    uids = {o["metadata"]["uid"] for o in finished.values()}
    for child in jobs + config_maps:
        assert child["metadata"]["ownerReferences"][0]["uid"] in uids
        clean = {k: v for k, v in child.items() if k != "status"}
        clean["metadata"] = {k: v for k, v in child["metadata"].items()
                             if k not in ("uid", "resourceVersion", "creationTimestamp", "generation")}
        for version in ("1.29.0", "1.33.0"):
            kubernetes_validate.validate(clean, version, strict=True)


async def test_spec_change_makes_a_new_job_and_the_same_spec_reuses_the_result(cluster, operator, job_controller,
                                                                             tiny_model):
    data = pipeline(tiny_model)[0]
    # A resource that ran on the dataset: a new dataset is a new task for it, run without being asked.
    bench = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "ppl"},
             "spec": {"model": {"source": {"uri": f"file://{tiny_model}"}},
                      "perplexity": {"dataset": {"datasetBuildRef": {"name": "data"}}}}}
    await cluster.apply(data)
    await cluster.apply(bench)
    first = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
    measured = await cluster.wait_for("Benchmark", "ppl", phase_is("Succeeded"), timeout=120)
    # ... and its Job's own last word seen (it would reconcile the Benchmark once more by itself).
    await cluster.wait_for("Benchmark", "ppl", lambda o: "succeeded=1" in o["metadata"].get("annotations", {}).get(
        "llmfactory.dev/last-change-seen", ""), timeout=60)
    await cluster.patch_spec("DatasetBuild", "data", {"split": {"validation": 0.1, "test": 0.1, "seed": 7}})
    second = await cluster.wait_for("DatasetBuild", "data", lambda o: phase_is("Succeeded")(o) and
                                    o["status"]["taskDigest"] != first["status"]["taskDigest"], timeout=120)
    assert second["status"]["observedGeneration"] == 2
    remeasured = await cluster.wait_for("Benchmark", "ppl", lambda o: phase_is("Succeeded")(o) and
                                        o["status"]["taskDigest"] != measured["status"]["taskDigest"], timeout=120)
    assert remeasured["metadata"]["generation"] == 1  # its spec never changed
    assert len(cluster.objects("jobs")) == 4  # the old Jobs are left alone
    assert open_store(first["status"]["artifactUri"]).is_committed()

    # Delete and re-apply the original: its finished result is reused, no Job is run again, and the
    # Benchmark, back on the first dataset, reuses its first result too.
    await cluster.delete("DatasetBuild", "data")
    await cluster.wait_gone("DatasetBuild", "data")
    await cluster.apply(data)
    again = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=60)
    assert again["status"]["taskDigest"] == first["status"]["taskDigest"]
    assert again["status"]["result"] == first["status"]["result"]
    back = await cluster.wait_for("Benchmark", "ppl", lambda o: phase_is("Succeeded")(o) and
                                  o["status"]["taskDigest"] == measured["status"]["taskDigest"], timeout=60)
    assert back["status"]["result"] == measured["status"]["result"]
    assert len(cluster.objects("jobs")) == 4
    # Succeeded three times by this name: the first spec, the second, and the re-applied object's reuse.
    assert any("reused" in e["message"] for e in await events_for(cluster, "data", *["Succeeded"] * 3))


async def test_sharded_dataset_build_runs_one_pod_per_shard_and_merges(cluster, operator, job_controller,
                                                                        openai_server):
    prompts = [{"text": f"Give one fact about the number {i}.", "language": "en"} for i in range(8)]
    await cluster.apply({
        "apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "data"},
        "spec": {"sources": [{"inline": prompts}], "shards": 2, "filters": {"nearDuplicateThreshold": 0},
                 "teacher": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o", "concurrency": 2}}}})
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded", "Failed"), timeout=180)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    [job] = cluster.objects("jobs")
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    # The resource succeeds on the committed result; the Job's status follows once its last pod has exited.
    for _ in range(150):
        if (cluster.objects("jobs")[0].get("status") or {}).get("succeeded") == 2:
            break
        await asyncio.sleep(0.2)
    assert cluster.objects("jobs")[0]["status"].get("succeeded") == 2 and obj["status"]["attempts"] == 1
    result = obj["status"]["result"]
    assert sum(result["rows"].values()) == 8 and result["teacherUsage"]["requests"] == 8
    assert sorted(r.last_user for r in openai_server.requests) == sorted(p["text"] for p in prompts)


def two_node_fine_tune(tiny_model, tmp_path, epochs: int) -> dict:
    """FineTune `ft` on the tiny model: two pods (nodes) of one training process each."""
    from tests.runtime.finetune_helpers import write_dataset
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ft"},
            "spec": {"baseModel": {"uri": f"file://{tiny_model}"}, "dataset": {"uri": write_dataset(tmp_path / "data")},
                     "hyperparameters": {"epochs": epochs, "batchSize": 2, "maxSeqLength": 96},
                     "checkpointing": {"everySteps": 1000}, "resources": {"gpusPerNode": 1, "nodes": 2}}}


async def wait_until_training(run, timeout: float = 180) -> None:
    """Until the run's progress.json shows an optimizer step done. A generous bound: two pods'
    torchrun starts beside the other pytest process (its real `vllm serve` tests among it) once
    took over 60 s."""
    for _ in range(int(timeout * 10)):
        progress = run.read_json_or_none("progress.json") or {}
        if progress.get("stage") == "training" and progress.get("done"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{run.uri} did not start training in {timeout}s")


async def test_multi_node_fine_tune_pods_find_pod_0_through_the_service_and_train_as_one(
        cluster, operator, job_controller, tiny_model, tmp_path):
    await cluster.apply(two_node_fine_tune(tiny_model, tmp_path, epochs=1))
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Succeeded", "Failed"), timeout=180)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    [job], [service] = cluster.objects("jobs"), cluster.objects("services")
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    # Two pods, one process each, rendezvous at pod 0: one run of two processes, committed once.
    assert obj["status"]["result"]["processes"] == 2 and obj["status"]["attempts"] == 1


async def test_a_preempted_node_of_a_multi_node_fine_tune_stops_every_node_at_a_checkpoint_and_the_run_resumes(
        cluster, operator, job_controller, tiny_model, tmp_path):
    await cluster.apply(two_node_fine_tune(tiny_model, tmp_path, epochs=12))  # long enough to be caught training
    obj = await cluster.wait_for("FineTune", "ft", lambda o: "artifactUri" in o.get("status", {}))
    run, job_name = open_store(obj["status"]["artifactUri"]), obj["status"]["jobName"]
    await wait_until_training(run)
    job_controller.terminate(job_name, index=1)  # node 1 is preempted; node 0 is not told by Kubernetes
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Succeeded", "Failed"), timeout=180)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    # Both nodes checkpointed the same step and stopped with "interrupted": the attempt's Job ended
    # (its podFailurePolicy), and the next attempt, a Job of its own, resumed from that step.
    assert obj["status"]["result"]["resumedFromStep"] is not None and obj["status"]["attempts"] == 2
    first, second = sorted(cluster.objects("jobs"), key=lambda j: len(j["metadata"]["name"]))
    assert first["status"]["conditions"][0]["reason"] == "PodFailurePolicy" and second["metadata"]["name"] == f"{job_name}-2"
    assert second["metadata"]["annotations"]["llmfactory.dev/failures-before"] == "0"  # not counted
    assert job_controller.log_of(job_name).count("SIGTERM at step") >= 2  # pod 0's rank too, not only pod 1's
    # What happened, then what the operator did about it.
    stopped, restarted = [e for e in await events_for(cluster, "ft", "Interrupted", "Interrupted") if e["reason"] == "Interrupted"]
    assert "checkpoint saved" in stopped["message"] and stopped["type"] == restarted["type"] == "Warning"
    assert "attempt 2 resumes from the last checkpoint (not counted as a failure)" in restarted["message"]


@pytest.mark.extended(reason=(
    "test_a_multi_node_fine_tune_counts_only_real_failures_and_starts_each_attempt_once_the_last_ones_pods_are_gone "
    "counts a lost node's failure (the Jobs ended by hand) and the preempted-node test restarts every node "
    "from a checkpoint; only this test kills a node's processes"))
async def test_a_crashed_node_of_a_multi_node_fine_tune_restarts_every_node_from_the_last_checkpoint(
        cluster, operator, job_controller, tiny_model, tmp_path):
    from prometheus_client import REGISTRY

    def jobs_created():
        return REGISTRY.get_sample_value("llmfactory_jobs_created_total", {"kind": "FineTune"}) or 0.0
    before = jobs_created()
    ft = two_node_fine_tune(tiny_model, tmp_path, epochs=4)
    ft["spec"]["checkpointing"] = {"everySteps": 2}
    await cluster.apply(ft)
    obj = await cluster.wait_for("FineTune", "ft", lambda o: "artifactUri" in o.get("status", {}))
    run, job_name = open_store(obj["status"]["artifactUri"]), obj["status"]["jobName"]
    for _ in range(1200):
        if any(k.endswith("COMMITTED") for k in run.list("checkpoints")):
            break
        await asyncio.sleep(0.1)
    # Node 1 is lost: its processes die at once, no SIGTERM, no checkpoint. A replacement pod in the
    # same Job would meet the old pod 0 at the rendezvous, and both would wait for ever.
    kill_tree(job_controller.pods[(job_name, 1)].pid)
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Succeeded", "Failed"), timeout=240)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    assert obj["status"]["result"]["resumedFromStep"] and obj["status"]["attempts"] == 2
    jobs = {j["metadata"]["name"]: j for j in cluster.objects("jobs")}
    assert jobs[job_name]["status"]["conditions"][0]["reason"] == "BackoffLimitExceeded"
    assert jobs[f"{job_name}-2"]["metadata"]["annotations"]["llmfactory.dev/failures-before"] == "1"
    [retrying] = [e for e in await events_for(cluster, "ft", "Retrying") if e["reason"] == "Retrying"]
    assert "attempt 2 resumes from the last checkpoint (1 of 1 retries used)" in retrying["message"]
    assert jobs_created() == before + 2  # /metrics counts the second attempt's Job too


async def end_job(cluster, name: str, status: dict) -> None:
    """The Job controller's part, by hand."""
    async with cluster.session.patch(f"{cluster.server.url}/apis/batch/v1/namespaces/default/jobs/{name}/status",
                                     json={"status": status},
                                     headers={"Content-Type": "application/merge-patch+json"}) as resp:
        resp.raise_for_status()


def failed(reason: str, message: str) -> list[dict]:
    return [{"type": "Failed", "status": "True", "reason": reason, "message": message}]


async def test_a_multi_node_fine_tune_counts_only_real_failures_and_starts_each_attempt_once_the_last_ones_pods_are_gone(
        cluster, operator, job_controller, tiny_model, tmp_path):
    job_controller.paused = True  # this test plays the Job controller by hand
    await cluster.apply(two_node_fine_tune(tiny_model, tmp_path, epochs=1))
    obj = await cluster.wait_for("FineTune", "ft", lambda o: (o.get("status") or {}).get("jobName"))
    first = obj["status"]["jobName"]

    async def jobs(count: int) -> list[str]:
        for _ in range(200):
            names = sorted((j["metadata"]["name"] for j in cluster.objects("jobs")), key=len)
            if len(names) >= count:
                return names
            await asyncio.sleep(0.05)
        return names

    # Node 1 is preempted (its pod has DisruptionTarget); node 0's pod is still stopping.
    await end_job(cluster, first, {"active": 1, "failed": 1, "conditions": failed(
        "PodFailurePolicy", f"Pod default/{first}-1-x has condition DisruptionTarget matching FailJob rule at index 2")})
    obj = await cluster.wait_for("FineTune", "ft", reason_is("Interrupted"))
    assert "attempt 2 starts once its pods have stopped" in obj["status"]["conditions"][0]["message"]
    await asyncio.sleep(1)  # two timer ticks: still no second attempt while a pod of the first runs
    assert await jobs(1) == [first]
    await end_job(cluster, first, {"active": 0})
    assert await jobs(2) == [first, f"{first}-2"]
    # Real failures are counted: backoffLimit 1 allows one retry, and the next failure is final.
    await end_job(cluster, f"{first}-2", {"failed": 1, "conditions": failed(
        "BackoffLimitExceeded", "Job has reached the specified backoff limit")})
    assert await jobs(3) == [first, f"{first}-2", f"{first}-3"]
    await end_job(cluster, f"{first}-3", {"failed": 1, "conditions": failed(
        "BackoffLimitExceeded", "Job has reached the specified backoff limit")})
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Failed"))
    assert condition(obj, "Stalled")["reason"] == "BackoffLimitExceeded" and obj["status"]["attempts"] == 3
    await asyncio.sleep(1)
    assert await jobs(4) == [first, f"{first}-2", f"{first}-3"]  # no fourth attempt

    # Asked to retry: every attempt's Job goes, and the run starts over at attempt 1 with its whole
    # failure budget (and deadline).
    failed_uids = {j["metadata"]["uid"] for j in cluster.objects("jobs")}
    await cluster.annotate("FineTune", "ft", {"llmfactory.dev/retry": "quota-raised"})
    for _ in range(200):
        if [j["metadata"]["uid"] not in failed_uids for j in cluster.objects("jobs")] == [True]:
            break
        await asyncio.sleep(0.05)
    [again] = cluster.objects("jobs")
    assert again["metadata"]["name"] == first and again["metadata"]["uid"] not in failed_uids
    assert again["metadata"]["annotations"]["llmfactory.dev/failures-before"] == "0"
    obj = await cluster.wait_for("FineTune", "ft", lambda o: o["status"].get("attempts") == 1)
    assert obj["status"]["phase"] == "Running" and obj["status"]["lastHandledRetry"] == "quota-raised"


async def test_a_multi_node_fine_tunes_attempts_share_one_active_deadline(cluster, operator, job_controller,
                                                                         operator_settings, tiny_model, tmp_path):
    """A Job's activeDeadlineSeconds spans its pods' retries; a multi-node run's attempts are Jobs of
    their own, and together get no more than the deadline (the operator's, 7 days by default; here the
    resource's own, 6 days, as Kubeflow's runPolicy sets one)."""
    job_controller.paused = True  # this test plays the Job controller by hand
    deadline, day = 6 * 24 * 3600, 24 * 3600
    assert deadline < operator_settings.active_deadline_seconds
    ft = two_node_fine_tune(tiny_model, tmp_path, epochs=1)
    ft["spec"]["activeDeadlineSeconds"] = deadline
    await cluster.apply(ft)
    obj = await cluster.wait_for("FineTune", "ft", lambda o: (o.get("status") or {}).get("jobName"))
    first = obj["status"]["jobName"]

    def ran(days: float, reason: str, message: str) -> dict:
        now = datetime.now(timezone.utc)
        return {"active": 0, "failed": 1, "startTime": f"{now - timedelta(days=days):%Y-%m-%dT%H:%M:%SZ}",
                "conditions": [{**failed(reason, message)[0], "lastTransitionTime": f"{now:%Y-%m-%dT%H:%M:%SZ}"}]}
    # Attempt 1 ran 4 days, then a node was preempted: attempt 2 gets the 2 days left.
    await end_job(cluster, first, ran(4, "PodFailurePolicy",
                                      f"Pod default/{first}-1-x has condition DisruptionTarget matching FailJob rule at index 2"))
    obj = await cluster.wait_for("FineTune", "ft", lambda o: o["status"].get("jobName") == f"{first}-2")
    [second] = [j for j in cluster.objects("jobs") if j["metadata"]["name"] == f"{first}-2"]
    assert deadline - 4 * day - 5 <= second["spec"]["activeDeadlineSeconds"] <= deadline - 4 * day
    # Attempt 2 fails after 2.5 days: a retry is left (backoffLimit 1), time is not.
    await end_job(cluster, f"{first}-2", ran(2.5, "BackoffLimitExceeded", "Job has reached the specified backoff limit"))
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Failed"))
    stalled = condition(obj, "Stalled")
    assert stalled["reason"] == "DeadlineExceeded", story(cluster, job_controller, obj)
    assert f"used its activeDeadlineSeconds ({deadline} s) over 2 attempts" in stalled["message"]
    [event] = [e for e in await events_for(cluster, "ft", "DeadlineExceeded") if e["reason"] == "DeadlineExceeded"]
    assert event["type"] == "Warning"
    await asyncio.sleep(1)  # two timer ticks
    assert len(cluster.objects("jobs")) == 2  # no third attempt


async def test_a_status_patch_drops_the_progress_fields_a_new_stage_lacks():
    """The status is sent as a merge patch, which keeps keys it does not name: a stage without a
    total must not go on showing the last stage's percent and ETA."""
    current = {"progress": {"stage": "training", "percent": 40.0, "etaSeconds": 12, "done": 4}, "phase": "Running"}
    patch = status_changes({"progress": {"stage": "evaluating", "done": 4}, "phase": "Running"}, current)
    assert patch == {"progress": {"stage": "evaluating", "done": 4, "percent": None, "etaSeconds": None}}


async def test_an_invalid_task_ends_a_multi_node_fine_tune_and_a_preemption_does_not():
    rules = [{"action": "FailJob", "onExitCodes": {"containerName": "runtime", "operator": "In", "values": [2]}},
             {"action": "FailJob", "onExitCodes": {"containerName": "runtime", "operator": "In", "values": [3]}}]

    def job(reason, message):
        return {"spec": {"podFailurePolicy": {"rules": rules}}, "status": {"conditions": failed(reason, message)}}
    exits = "Container runtime for pod default/ft-1 failed with exit code {} matching FailJob rule at index {}"
    assert attempt_ending(job("PodFailurePolicy", exits.format(2, 0))) == "final"
    assert attempt_ending(job("PodFailurePolicy", exits.format(3, 1))) == "interrupted"
    assert attempt_ending(job("BackoffLimitExceeded", "")) == "failed"
    assert attempt_ending(job("DeadlineExceeded", "")) == "final"
    assert attempt_ending(job("PodFailurePolicy", "a message of another Kubernetes")) == "failed"  # counted: bounded
    assert attempt_ending({"spec": {}, "status": {"active": 2}}) is None


async def test_dataset_build_waits_for_its_config_map_and_reruns_when_it_changes(cluster, operator, job_controller,
                                                                                 openai_server):
    def prompts(n):
        return "".join(json.dumps({"prompt": f"Say something about the colour number {i}."}) + "\n" for i in range(n))

    await cluster.apply({
        "apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "data"},
        "spec": {"sources": [{"configMap": {"name": "prompts", "key": "en.jsonl"}, "language": "en"}],
                 "filters": {"nearDuplicateThreshold": 0},
                 "teacher": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o"}}}})
    waiting = await cluster.wait_for("DatasetBuild", "data", phase_is("Waiting"))
    assert "ConfigMap prompts (spec.sources[0].configMap) to exist" in condition(waiting, "Ready")["message"]
    await cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prompts"},
                         "data": {"en.jsonl": prompts(5)}})
    first = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded", "Failed"), timeout=120)
    assert first["status"]["phase"] == "Succeeded", first["status"]
    assert sum(first["status"]["result"]["rows"].values()) == 5
    job = next(j for j in cluster.objects("jobs") if j["metadata"]["name"] == first["status"]["jobName"])
    assert {"name": "source-0", "configMap": {"name": "prompts", "items": [{"key": "en.jsonl", "path": "en.jsonl"}]}} \
        in job["spec"]["template"]["spec"]["volumes"]

    # An edited ConfigMap is new input: a new task, a new Job, only the new prompts paid for.
    async with cluster.session.patch(f"{cluster.server.url}/api/v1/namespaces/default/configmaps/prompts",
                                     json={"data": {"en.jsonl": prompts(7)}},
                                     headers={"Content-Type": "application/merge-patch+json"}) as resp:
        resp.raise_for_status()
    second = await cluster.wait_for("DatasetBuild", "data", lambda o: phase_is("Succeeded")(o) and
                                    o["status"]["taskDigest"] != first["status"]["taskDigest"], timeout=120)
    assert sum(second["status"]["result"]["rows"].values()) == 7
    assert second["status"]["result"]["teacherUsage"] == {**second["status"]["result"]["teacherUsage"],
                                                         "requests": 2, "cached": 5}


async def test_a_stopped_dataset_build_pod_is_an_interruption_and_the_next_pod_pays_only_for_the_rest(
        cluster, operator, job_controller, openai_server):
    """A pod stopped by Kubernetes (SIGTERM: a preemption, an eviction, `kubectl delete pod`) is not
    a failure: the Job makes a new pod, which asks the teacher only what was never answered."""
    openai_server.latency = 0.3
    prompts = [{"text": f"Say one thing about the colour number {i}.", "language": "en"} for i in range(16)]
    await cluster.apply({
        "apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "data"},
        "spec": {"sources": [{"inline": prompts}], "filters": {"nearDuplicateThreshold": 0},
                 "languageDetection": None, "samplesPerLanguage": None,
                 "teacher": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o", "concurrency": 2}}}})
    obj = await cluster.wait_for("DatasetBuild", "data", lambda o: (o.get("status") or {}).get("jobName"))
    for _ in range(600):
        if sum(r.delivered_at is not None for r in openai_server.requests) >= 4:
            break
        await asyncio.sleep(0.1)
    delivered = {r.last_user for r in openai_server.requests if r.delivered_at is not None}
    await asyncio.sleep(0.15)  # these answers are saved; the next ones are in flight
    job_controller.terminate(obj["status"]["jobName"])
    before = len(openai_server.requests)
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded", "Failed"), timeout=120)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    assert sum(obj["status"]["result"]["rows"].values()) == 16
    again = {r.last_user for r in openai_server.requests[before:]} & delivered
    assert not again, f"paid twice for {again}"
    [job] = cluster.objects("jobs")
    assert not job["status"].get("failed")  # exit code 3: ignored by the podFailurePolicy
    [stopped] = [e for e in await events_for(cluster, "data", "Interrupted") if e["reason"] == "Interrupted"]
    assert stopped["message"].startswith("SIGTERM") and "a new pod resumes from it" in stopped["message"]


async def test_invalid_spec_is_stalled_with_the_field_named(cluster, operator, tiny_model):
    bench = pipeline(tiny_model)[2]
    bench["spec"]["model"] = {"source": {"uri": f"file://{tiny_model}"}}
    del bench["spec"]["perplexity"]
    bench["spec"]["gates"] = [{"metric": "mtbench.score", "op": ">=", "value": 6.5}]
    await cluster.apply(bench)
    obj = await cluster.wait_for("Benchmark", "bench", phase_is("Failed"))
    stalled = condition(obj, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert "spec.gates[0].metric" in stalled["message"] and "judge.score" in stalled["message"]
    assert condition(obj, "Ready")["status"] == "False"
    assert cluster.objects("jobs") == []

    # What waits on it says that it failed and why, rather than only that it waits.
    gated = pipeline(tiny_model)[3]
    gated["spec"] = {"types": ["f16"], "model": {"source": {"uri": f"file://{tiny_model}"}}, "benchmarkRef": {"name": "bench"}}
    await cluster.apply(gated)
    waiting = await cluster.wait_for("Quantization", "gguf", phase_is("Waiting"))
    ready = condition(waiting, "Ready")
    assert ready["reason"] == "DependencyFailed" and condition(waiting, "Reconciling")["status"] == "True"
    assert ready["message"].startswith("waiting for Benchmark bench (spec.benchmarkRef) to succeed; it failed "
                                       "(InvalidSpec): spec.gates[0].metric"), ready["message"]
    [event] = [e for e in await events_for(cluster, "gguf", "DependencyFailed") if e["reason"] == "DependencyFailed"]
    assert event["type"] == "Warning" and "spec.gates[0].metric" in event["message"]


async def test_a_resource_refused_for_what_anothers_spec_promises_waits_once_that_spec_is_mended(
        cluster, operator, tiny_model):
    """A FineTune with objective dpo on a build of conversations is refused as soon as the build is
    applied, not once it has run; the build's spec mended, the FineTune waits for it at once (nothing
    else would plan a refused resource again until the build finished)."""
    data, ft = pipeline(tiny_model)[:2]
    ft["spec"]["objective"] = "dpo"
    await cluster.apply(ft)
    await cluster.wait_for("FineTune", "ft", phase_is("Waiting"))  # nothing known yet of what it reads
    await cluster.apply(data)  # no job controller here: the build's Job never runs
    refused = await cluster.wait_for("FineTune", "ft", phase_is("Failed"))
    stalled = condition(refused, "Stalled")
    assert stalled["reason"] == "InvalidSpec" and stalled["message"].startswith(
        "spec.dataset.datasetBuildRef: DatasetBuild data writes conversations (format chatml), but objective dpo "
        "trains on preference pairs"), stalled
    assert not [j for j in cluster.objects("jobs") if j["metadata"]["name"].startswith("ft-")]
    # Once kopf is done with the build's creation, so that only the change of its spec can plan the FineTune.
    await cluster.wait_for("DatasetBuild", "data", lambda o: "kopf.zalando.org/last-handled-configuration" in (
        o["metadata"].get("annotations") or {}))
    await cluster.patch_spec("DatasetBuild", "data", {"preferences": {"rejected": {"model": data["spec"]["teacher"]["model"]}}})
    waiting = await cluster.wait_for("FineTune", "ft", phase_is("Waiting"), timeout=30)
    assert condition(waiting, "Ready")["message"] == "waiting for DatasetBuild data (spec.dataset.datasetBuildRef) to succeed"


async def test_a_quantization_that_fails_validation_is_failed_and_what_reads_it_waits(
        cluster, operator, operator_settings, tiny_model):
    """Its result found committed in the store (a finished run of the same task) with a file llama.cpp
    reads otherwise than the model: Failed, reason ValidationFailed, quoting it, a Warning Event
    saying so; a Benchmark of it waits."""
    from llmfactory.planner import parse, plan
    from llmfactory_runtime.store import write_result

    gguf = pipeline(tiny_model)[3]
    gguf["spec"] = {"model": {"source": {"uri": f"file://{tiny_model}"}}, "types": ["q4_0"]}
    task = plan(parse(gguf), lambda *k: None, operator_settings.store_uri)
    miss = "llama.cpp cuts text into other tokens than the model's tokenizer"
    write_result(open_store(task["artifactUri"]), {
        "artifacts": [{"type": "q4_0", "uri": f"{task['artifactUri']}/gguf/gguf-q4_0.gguf", "sizeBytes": 1000,
                       "sha256": "0" * 64, "bitsPerWeight": 4.5, "failures": [miss],
                       "llamaCpp": {"tokenizerMatches": False, "answer": "", "tokensPerSecond": 1.0}}],
        "passed": False})
    await cluster.apply(gguf)
    obj = await cluster.wait_for("Quantization", "gguf", phase_is("Failed"))
    stalled = condition(obj, "Stalled")
    why = f"quantization finished but validation failed: q4_0: {miss}"
    assert (stalled["status"], stalled["reason"], stalled["message"]) == ("True", "ValidationFailed", why)
    assert obj["status"]["headline"] == "q4_0 0.0 MB" and cluster.objects("jobs") == []
    [event] = [e for e in await events_for(cluster, "gguf", "ValidationFailed") if e["reason"] == "ValidationFailed"]
    assert event["type"] == "Warning" and event["message"].endswith(why)

    bench = pipeline(tiny_model)[2]
    bench["spec"] = {"model": {"quantizationRef": {"name": "gguf"}}, "baseline": False,
                     "perplexity": {"dataset": {"uri": f"file://{tiny_model}"}}}
    await cluster.apply(bench)
    waiting = await cluster.wait_for("Benchmark", "bench", phase_is("Waiting"))
    assert condition(waiting, "Ready")["reason"] == "DependencyFailed"
    assert "(ValidationFailed): " + why in condition(waiting, "Ready")["message"]


async def test_invalid_task_fails_at_once_with_the_runtimes_error(cluster, operator, job_controller, tmp_path):
    data = pipeline(tmp_path / "no-such-model")[0]
    await cluster.apply(data)
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Failed"), timeout=60)
    stalled = condition(obj, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "PodFailurePolicy"
    assert "no-such-model" in stalled["message"] and "does not exist" in stalled["message"]
    assert obj["status"]["attempts"] == 1  # not retried: retrying cannot help
    assert any(e["reason"] == "JobFailed" and e["type"] == "Warning" for e in await events_for(cluster, "data", "JobFailed"))


async def test_crashing_run_is_retried_then_failed(cluster, operator, job_controller, tiny_model, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in Path(tiny_model).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "not a number"}))
    data = pipeline(broken)[0]
    await cluster.apply(data)
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Failed"), timeout=120)
    assert condition(obj, "Stalled")["reason"] == "BackoffLimitExceeded"
    assert obj["status"]["attempts"] == 2  # the operator's backoffLimit 1: one retry
    # The resource's own backoffLimit (Kubeflow's runPolicy): none.
    await cluster.apply({**data, "metadata": {"name": "data-once"}, "spec": {**data["spec"], "backoffLimit": 0}})
    obj = await cluster.wait_for("DatasetBuild", "data-once", phase_is("Failed"), timeout=120)
    assert condition(obj, "Stalled")["reason"] == "BackoffLimitExceeded" and obj["status"]["attempts"] == 1


async def failed_for_a_missing_model(cluster, tmp_path) -> tuple[dict, dict, Path]:
    """DatasetBuild `data` whose teacher model is not there (yet): Failed at once, an invalid task.
    (Its failed state, its Job, where the model belongs.)"""
    model = tmp_path / "model-to-come"
    await cluster.apply(pipeline(model)[0])
    failed = await cluster.wait_for("DatasetBuild", "data", phase_is("Failed"), timeout=60)
    [job] = cluster.objects("jobs")
    return failed, job, model


async def test_a_failed_run_stays_failed_when_its_job_is_gone_and_runs_again_when_a_retry_is_asked(
        cluster, operator, job_controller, tiny_model, tmp_path):
    failed, job, model = await failed_for_a_missing_model(cluster, tmp_path)
    shutil.copytree(tiny_model, model)  # the cause is mended outside the spec (a model uploaded, a Secret fixed)
    # A week later the TTL controller deletes the finished Job, and the operator is upgraded
    # (restarted); someone labels the resource. None of that runs the failed task again.
    await cluster.delete_child("apis/batch/v1", "jobs", job["metadata"]["name"])
    await operator.stop()
    await operator.start()
    await cluster.annotate("DatasetBuild", "data", {"example.com/owner": "team-a"})
    await asyncio.sleep(3)  # six timer ticks
    obj = await cluster.get("DatasetBuild", "data")
    assert obj["status"]["phase"] == "Failed" and cluster.objects("jobs") == [], story(cluster, job_controller, obj)
    assert condition(obj, "Stalled") == condition(failed, "Stalled")

    await cluster.annotate("DatasetBuild", "data", {"llmfactory.dev/retry": "2026-11-24T18:00:00Z"})
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
    assert obj["status"]["lastHandledRetry"] == "2026-11-24T18:00:00Z"
    assert obj["status"]["taskDigest"] == failed["status"]["taskDigest"]  # the same task, run again
    assert [j["metadata"]["name"] for j in cluster.objects("jobs")] == [job["metadata"]["name"]]
    reasons = [e["reason"] for e in await events_for(cluster, "data", "JobFailed", "RetryRequested", "JobCreated", "Succeeded")]
    assert reasons.index("JobFailed") < reasons.index("RetryRequested") < reasons.index("Succeeded"), reasons
    assert reasons.count("JobCreated") == 2


async def test_a_spec_change_that_keeps_the_task_runs_a_failed_run_again_in_a_new_job(
        cluster, operator, job_controller, tiny_model, tmp_path):
    failed, job, model = await failed_for_a_missing_model(cluster, tmp_path)
    shutil.copytree(tiny_model, model)
    await cluster.patch_spec("DatasetBuild", "data", {"resources": {"memory": "8Gi"}})  # after an OOM kill, say
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
    assert obj["status"]["taskDigest"] == failed["status"]["taskDigest"]
    [retried] = cluster.objects("jobs")
    assert retried["metadata"]["uid"] != job["metadata"]["uid"]  # the failed Job was deleted, a new one made
    assert retried["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "8Gi"
    [event] = [e for e in await events_for(cluster, "data", "RetryRequested") if e["reason"] == "RetryRequested"]
    assert "the spec changed" in event["message"] and job["metadata"]["name"] in event["message"]


async def test_a_resource_made_again_under_a_deleted_ones_name_waits_for_the_old_job_to_be_collected(
        cluster, operator, job_controller, tiny_model, tmp_path):
    """Delete and apply again at once (kubectl replace --force, Argo CD's Replace): the garbage
    collector has not yet removed the old resource's Job, which has the new one's name. Adopting it
    would report the old run's failure as the new one's."""
    _, old_job, model = await failed_for_a_missing_model(cluster, tmp_path)
    await cluster.delete("DatasetBuild", "data")
    await cluster.wait_gone("DatasetBuild", "data")
    shutil.copytree(tiny_model, model)
    await cluster.apply(pipeline(model)[0])
    obj = await cluster.wait_for("DatasetBuild", "data", lambda o: (o.get("status") or {}).get("conditions"))
    await asyncio.sleep(2)  # four timer ticks: still waiting, never the old run's Failed
    obj = await cluster.get("DatasetBuild", "data")
    assert obj["status"]["phase"] == "Pending", story(cluster, job_controller, obj)
    ready = condition(obj, "Ready")
    assert ready["reason"] == "OldJobPresent" and old_job["metadata"]["name"] in ready["message"]
    assert "garbage-collected" in ready["message"]

    # The garbage collector's turn, the old Job first: its ConfigMap, under the new run's name too,
    # would be collected under the new Job, whose pod could then never mount its task.
    await cluster.delete_child("apis/batch/v1", "jobs", old_job["metadata"]["name"])
    await asyncio.sleep(2)
    obj = await cluster.get("DatasetBuild", "data")
    assert cluster.objects("jobs") == [] and obj["status"]["phase"] == "Pending", story(cluster, job_controller, obj)
    ready = condition(obj, "Ready")
    assert ready["reason"] == "OldJobPresent" and f"ConfigMap {old_job['metadata']['name']}" in ready["message"]
    await cluster.delete_child("api/v1", "configmaps", old_job["metadata"]["name"])
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
    [job] = cluster.objects("jobs")
    assert job["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]


@pytest.mark.extended(reason=(
    "test_a_hundred_restarts_at_random_moments_create_one_job_each restarts the operator around pending Jobs; "
    "this test also around Jobs that run and finish"))
async def test_operator_restarts_never_create_a_second_job(cluster, operator, job_controller, tiny_model):
    job_controller.paused = True  # Jobs stay pending while the operator restarts around them
    for manifest in pipeline(tiny_model)[:2]:  # a dependency and its dependent (the whole chain: test above)
        await cluster.apply(manifest)
    await cluster.wait_for("DatasetBuild", "data", phase_is("Running"))
    rng = random.Random(0)
    for _ in range(6):
        await operator.stop()
        await asyncio.sleep(rng.uniform(0, 0.3))
        await operator.start()
        await asyncio.sleep(rng.uniform(0, 1.0))
    assert len(cluster.objects("jobs")) == 1
    job_controller.paused = False
    for kind, name in ORDER[:2]:
        await cluster.wait_for(kind, name, phase_is("Succeeded"), timeout=240)
        await operator.stop()
        await operator.start()
    names = [j["metadata"]["name"] for j in cluster.objects("jobs")]
    assert len(names) == len(set(names)) == 2


async def test_deletion_policy_delete_removes_the_artifacts(cluster, operator, job_controller, tiny_model,
                                                            operator_settings):
    keep, drop = pipeline(tiny_model)[0], pipeline(tiny_model)[0]
    drop["metadata"] = {"name": "drop"}
    drop["spec"]["deletionPolicy"] = "Delete"
    await cluster.apply(keep)
    await cluster.apply(drop)
    for name in ("data", "drop"):
        await cluster.wait_for("DatasetBuild", name, phase_is("Succeeded"), timeout=120)
    dropped = await cluster.get("DatasetBuild", "drop")
    assert "llmfactory.dev/artifacts" in dropped["metadata"].get("finalizers", [])
    store = open_store(operator_settings.store_uri)
    await cluster.delete("DatasetBuild", "drop")
    await cluster.delete("DatasetBuild", "data")
    for name in ("data", "drop"):
        for _ in range(100):
            if await cluster.get("DatasetBuild", name) is None:
                break
            await asyncio.sleep(0.2)
        assert await cluster.get("DatasetBuild", name) is None
    assert store.list("default/datasetbuild/drop") == []
    assert store.list("default/datasetbuild/data")  # Retain, the default, keeps them


async def test_metrics_count_reconciles_jobs_and_phases(cluster, operator, job_controller, tiny_model):
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    created = value("llmfactory_jobs_created_total", kind="DatasetBuild")
    succeeded = value("llmfactory_resources", kind="DatasetBuild", phase="Succeeded")
    data = pipeline(tiny_model)[0]
    data["metadata"]["name"] = "counted"
    await cluster.apply(data)
    await cluster.wait_for("DatasetBuild", "counted", phase_is("Succeeded"), timeout=120)
    await asyncio.sleep(1)
    assert value("llmfactory_jobs_created_total", kind="DatasetBuild") == created + 1
    assert value("llmfactory_resources", kind="DatasetBuild", phase="Succeeded") == succeeded + 1
    assert value("llmfactory_reconciles_total", kind="DatasetBuild", phase="Running") >= 1
    assert value("llmfactory_reconcile_seconds_count", kind="DatasetBuild") >= 2
    await cluster.delete("DatasetBuild", "counted")
    # Gone from the gauge once its deletion is handled (its finalizer runs first: a second or more on a busy machine).
    deadline = time.monotonic() + 10
    while value("llmfactory_resources", kind="DatasetBuild", phase="Succeeded") != succeeded and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert value("llmfactory_resources", kind="DatasetBuild", phase="Succeeded") == succeeded


async def test_pod_problems_are_shown_on_the_resource(cluster, operator, job_controller, tiny_model):
    """An image that cannot be pulled or a pod that cannot be scheduled is visible without
    `kubectl describe pod`: its reason and message are copied into the conditions."""
    job_controller.paused = True
    await cluster.apply(pipeline(tiny_model)[0])
    obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Running"))
    job = obj["status"]["jobName"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{job}-x7k2p", "namespace": "default", "labels": {"job-name": job}},
           "spec": {"containers": [{"name": "runtime", "image": "registry.example/runtime:missing"}]},
           "status": {"phase": "Pending", "containerStatuses": [{
               "name": "runtime", "ready": False, "restartCount": 0, "image": "registry.example/runtime:missing",
               "imageID": "", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                    "message": "Back-off pulling image registry.example/runtime:missing"}}}]}}
    async with cluster.session.post(f"{cluster.server.url}/api/v1/namespaces/default/pods", json=pod) as resp:
        resp.raise_for_status()
    obj = await cluster.wait_for("DatasetBuild", "data",
                                 lambda o: o["status"]["conditions"][0]["reason"] == "ImagePullBackOff")
    assert "runtime:missing" in obj["status"]["conditions"][0]["message"]
    assert any(e["reason"] == "ImagePullBackOff" and e["type"] == "Warning" for e in await events_for(cluster, "data", "ImagePullBackOff"))

    unschedulable = {"status": {"phase": "Pending", "containerStatuses": [], "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}}
    async with cluster.session.patch(f"{cluster.server.url}/api/v1/namespaces/default/pods/{job}-x7k2p",
                                     json=unschedulable,
                                     headers={"Content-Type": "application/merge-patch+json"}) as resp:
        resp.raise_for_status()
    obj = await cluster.wait_for("DatasetBuild", "data",
                                 lambda o: o["status"]["conditions"][0]["reason"] == "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in obj["status"]["conditions"][0]["message"]


def reason_is(reason: str):
    return lambda o: (o.get("status") or {}).get("conditions", [{}])[0].get("reason") == reason


async def kueue_sets_suspend(cluster, job_name: str, suspend: bool) -> None:
    """Kueue admits a workload by unsuspending its Job, and preempts it by suspending it again."""
    async with cluster.session.patch(f"{cluster.server.url}/apis/batch/v1/namespaces/default/jobs/{job_name}",
                                     json={"spec": {"suspend": suspend}},
                                     headers={"Content-Type": "application/merge-patch+json"}) as resp:
        resp.raise_for_status()


async def test_queued_job_waits_for_kueue(cluster, operator, job_controller, tiny_model):
    data = pipeline(tiny_model)[0]
    data["spec"]["queueName"] = "h100-queue"
    await cluster.apply(data)
    obj = await cluster.wait_for("DatasetBuild", "data", reason_is("Queued"))
    job = cluster.objects("jobs")[0]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100-queue"
    await kueue_sets_suspend(cluster, job["metadata"]["name"], False)  # admitted: it runs
    await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
    assert obj["status"]["phase"] == "Running"


@pytest.mark.extended(reason=(
    "test_spec_suspend_pauses_a_fine_tune_at_a_checkpoint_and_resuming_goes_on_from_it suspends a running "
    "Job (its pods checkpoint, the run resumes) and test_queued_job_waits_for_kueue waits for admission; "
    "this test has Kueue do both"))
async def test_a_fine_tune_preempted_by_kueue_checkpoints_waits_queued_and_resumes_when_readmitted(
        cluster, operator, job_controller, tiny_model, tmp_path):
    ft = two_node_fine_tune(tiny_model, tmp_path, epochs=8)
    ft["spec"]["queueName"] = "h100-queue"
    await cluster.apply(ft)
    obj = await cluster.wait_for("FineTune", "ft", reason_is("Queued"))
    run, job_name = open_store(obj["status"]["artifactUri"]), obj["status"]["jobName"]
    await kueue_sets_suspend(cluster, job_name, False)
    await wait_until_training(run)
    await kueue_sets_suspend(cluster, job_name, True)  # a higher-priority workload takes the GPUs
    for _ in range(300):  # every pod checkpoints the same step and stops
        if (run.read_json_or_none("progress.json") or {}).get("state") == "Interrupted":
            break
        await asyncio.sleep(0.1)
    [saved] = [k for k in run.list("checkpoints") if k.endswith("COMMITTED")]
    # Not failed: queued for the quota again, with the progress it had.
    obj = await cluster.wait_for("FineTune", "ft", lambda o: reason_is("Queued")(o) and o["status"]["progress"].get("done"))
    assert obj["status"]["phase"] == "Running"
    for _ in range(300):  # Kueue readmits a preempted workload once its pods are gone
        if not job_controller.running(job_name):
            break
        await asyncio.sleep(0.1)
    await kueue_sets_suspend(cluster, job_name, False)
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Succeeded", "Failed"), timeout=300)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    assert saved == f"step-{obj['status']['result']['resumedFromStep']}/COMMITTED"
    assert obj["status"]["attempts"] == 1 and not cluster.objects("jobs")[0]["status"].get("failed")


async def test_spec_suspend_pauses_a_fine_tune_at_a_checkpoint_and_resuming_goes_on_from_it(
        cluster, operator, job_controller, tiny_model, tmp_path):
    # ~300 steps in one process: on a fast machine the operator's suspend reached a 150-step run at
    # its step 98 once, and another time after its end (no SIGTERM, so no checkpoint to resume from).
    ft = two_node_fine_tune(tiny_model, tmp_path, epochs=12)
    ft["spec"]["resources"] = {"gpusPerNode": 1}
    await cluster.apply(ft)
    obj = await cluster.wait_for("FineTune", "ft", lambda o: "artifactUri" in o.get("status", {}))
    run, job_name, digest = open_store(obj["status"]["artifactUri"]), obj["status"]["jobName"], obj["status"]["taskDigest"]
    await wait_until_training(run)
    await cluster.patch_spec("FineTune", "ft", {"suspend": True})  # e.g. to lend the GPUs for a while
    obj = await cluster.wait_for("FineTune", "ft", reason_is("Suspended"))
    assert obj["status"]["phase"] == "Waiting" and "set spec.suspend to false" in condition(obj, "Ready")["message"]
    # The Job controller stops the suspended Job's pod, which checkpoints first: on a machine busy
    # with the rest of the suite, its save and upload have taken over 30 s.
    for _ in range(1200):
        if not job_controller.running(job_name):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the suspended Job's pod still ran 120 s after its SIGTERM")
    [saved] = [k for k in run.list("checkpoints") if k.endswith("COMMITTED")]
    await asyncio.sleep(1)  # two timer ticks: still paused, no new pod, no second Job
    assert not job_controller.running(job_name) and [j["spec"]["suspend"] for j in cluster.objects("jobs")] == [True]

    await cluster.patch_spec("FineTune", "ft", {"suspend": False})
    # A generous bound: on a busy machine the rest of a 150-step run alone has taken over two minutes.
    obj = await cluster.wait_for("FineTune", "ft", phase_is("Succeeded", "Failed"), timeout=600)
    assert obj["status"]["phase"] == "Succeeded", story(cluster, job_controller, obj)
    # The same task (suspend is not in the digest), resumed where it stopped, nothing counted as failed.
    assert obj["status"]["taskDigest"] == digest and saved == f"step-{obj['status']['result']['resumedFromStep']}/COMMITTED"
    [job] = cluster.objects("jobs")
    assert job["spec"]["suspend"] is False and not job["status"].get("failed")
    reasons = [e["reason"] for e in await events_for(cluster, "ft", "Suspended", "Resumed", "Succeeded")]
    assert reasons.index("Suspended") < reasons.index("Resumed") < reasons.index("Succeeded")


@pytest.mark.parametrize("kueue_api", ["kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1"])  # Kueue >= 0.15, older
async def test_spec_suspend_in_a_kueue_queue_deactivates_the_jobs_workload(cluster, operator, tiny_model, kueue_api):
    """Kueue owns a queued Job's suspend (it would admit a Job suspended by anyone else at once):
    the Workload it made for the Job is deactivated instead, and activated again on resume."""
    cluster.server.resources[f"{kueue_api}/workloads"] = kmock.ResourceInfo(  # the one version this Kueue serves
        kind="Workload", namespaced=True, verbs={"list", "get", "create", "patch"})
    data = pipeline(tiny_model)[0]
    data["spec"].update(queueName="h100-queue", suspend=True)
    await cluster.apply(data)
    obj = await cluster.wait_for("DatasetBuild", "data", reason_is("Suspended"))
    assert "waiting for Kueue's Workload" in condition(obj, "Ready")["message"]
    [job] = cluster.objects("jobs")
    workload = {"apiVersion": kueue_api, "kind": "Workload",
                "metadata": {"name": f"job-{job['metadata']['name']}-1a2b3", "namespace": "default", "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                     "uid": job["metadata"]["uid"], "controller": True}]},
                "spec": {"active": True, "queueName": "h100-queue"}}
    async with cluster.session.post(f"{cluster.server.url}/apis/{kueue_api}/namespaces/default/workloads",
                                    json=workload) as resp:
        resp.raise_for_status()

    def active() -> bool:
        return cluster.objects("workloads")[0]["spec"]["active"]
    obj = await cluster.wait_for("DatasetBuild", "data", lambda o: "is deactivated" in condition(o, "Ready")["message"])
    assert workload["metadata"]["name"] in condition(obj, "Ready")["message"] and active() is False
    await cluster.patch_spec("DatasetBuild", "data", {"suspend": False})
    await cluster.wait_for("DatasetBuild", "data", reason_is("Queued"))  # back in the queue, for Kueue to admit
    assert active() is True and cluster.objects("jobs")[0]["spec"]["suspend"] is True  # the Job is Kueue's
    assert [e["reason"] for e in await events_for(cluster, "data", "Suspended", "Resumed")
            if e["reason"] in ("Suspended", "Resumed")] == ["Suspended", "Resumed"]


@pytest.mark.slow
async def test_a_hundred_restarts_at_random_moments_create_one_job_each(cluster, operator, tiny_model):
    """No Job controller here: Jobs stay pending, so every restart finds them mid-run."""
    manifests = pipeline(tiny_model)[:1] + [
        {**pipeline(tiny_model)[0], "metadata": {"name": f"data-{i}"}} for i in range(3)]
    rng = random.Random(42)
    for manifest in manifests:
        await cluster.apply(manifest)
        await asyncio.sleep(rng.uniform(0, 0.05))
    for _ in range(100):
        await operator.kill()
        await operator.start()
        await asyncio.sleep(rng.uniform(0, 0.15))
    await cluster.wait_for("DatasetBuild", "data-2", phase_is("Running"))
    owners = [j["metadata"]["ownerReferences"][0]["name"] for j in cluster.objects("jobs")]
    assert sorted(owners) == sorted(m["metadata"]["name"] for m in manifests)


@pytest.mark.slow
@pytest.mark.parametrize("operator_settings", [{"poll_seconds": 3600}], indirect=True)
async def test_finished_jobs_and_finished_dependencies_are_noticed_at_once_not_on_the_timer(
        cluster, operator, job_controller, tiny_model):
    """With an hour between timer ticks, only watching Jobs and upstream status moves the pipeline."""
    data, ft = pipeline(tiny_model)[:2]
    await cluster.apply(ft)
    await cluster.wait_for("FineTune", "ft", phase_is("Waiting"))
    await cluster.apply(data)
    await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
    done = await cluster.wait_for("FineTune", "ft", phase_is("Succeeded", "Failed"), timeout=120)
    assert done["status"]["phase"] == "Succeeded"
    assert done["metadata"]["annotations"]["llmfactory.dev/last-change-seen"].startswith("Job ")
