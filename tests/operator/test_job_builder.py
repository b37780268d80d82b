"""Every object the operator creates, in every variant, is valid for every Kubernetes version we
support, and carries what a GPU platform team expects."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from llmfactory.controller.job_builder import TASK_PATH, build, child_name
from llmfactory.controller.settings import OperatorSettings
from llmfactory.planner import parse, plan

# Every Kubernetes version kubernetes-validate ships, from 1.29 on.
K8S_VERSIONS = sorted({v for v in kubernetes_validate.utils.all_versions()
                       if tuple(map(int, v.split(".")[:2])) >= (1, 29)}, key=lambda v: tuple(map(int, v.split("."))))
SETTINGS = OperatorSettings(
    store_uri="s3://bucket/llmfactory", image="registry.example/llmfactory/runtime:0.1.0",
    s3_endpoint="http://minio.storage:9000", s3_secret="llmfactory-s3", service_account="llmfactory-runtime",
    hf_token_secret="hf-token",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def fine_tune(resources=None, **spec):
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune",
            "metadata": {"name": "llama3-seed", "namespace": "ml", "uid": "6c1b0a4e-0000-4000-8000-000000000001"},
            "spec": {"baseModel": {"huggingface": "meta-llama/Meta-Llama-3-8B-Instruct"},
                     "dataset": {"uri": "s3://bucket/data"}, "resources": resources or {}, **spec}}


PROMPTS = {"data": {"ru.jsonl": '{"prompt": "Привет"}\n', "en.jsonl": '{"prompt": "Hi"}\n'}}


def children(body, settings=SETTINGS):
    task = plan(parse(body), lambda *k: None, settings.store_uri, lambda ns, name: PROMPTS)
    return task, build(body, task, settings)


def dataset_build(**spec):
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild",
            "metadata": {"name": "seed-data", "namespace": "ml", "uid": "6c1b0a4e-0000-4000-8000-000000000002"},
            "spec": {"sources": [{"huggingface": {"id": "lightblue/tagengo-gpt4"}}],
                     "teacher": {"openai": {"model": "gpt-4o", "apiKeySecret": {"name": "openai", "key": "api-key"}}},
                     **spec}}


def quantization(**spec):
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization",
            "metadata": {"name": "q", "namespace": "ml", "uid": "u"},
            "spec": {"model": {"source": {"uri": "s3://bucket/model"}}, **spec}}


VARIANTS = {
    "sharded-dataset": dataset_build(shards=4),
    "dataset-without-teacher": {**dataset_build(), "spec": {"sources": [{"huggingface": {"id": "org/chats"}}]}},
    "text-corpus": {**dataset_build(), "spec": {"sources": [{"uri": "s3://corpora/fineweb/part-0.parquet"}],
                                                 "format": "text", "resources": {"ephemeralStorage": "500Gi"}}},
    "config-map-sources": dataset_build(sources=[{"configMap": {"name": "prompts", "key": "ru.jsonl"}},
                                                 {"configMap": {"name": "prompts", "key": "en.jsonl"}}]),
    "one-gpu": fine_tune(),
    "compressed-tensors": quantization(format="compressed-tensors", types=["fp8"]),
    "eight-gpus": fine_tune({"gpusPerNode": 8, "cpu": "64", "memory": "900Gi"}),
    "two-nodes": fine_tune({"gpusPerNode": 8, "nodes": 2}),
    "kueue": fine_tune(queueName="h100-queue"),
    "suspended": fine_tune(suspend=True),
    "zero3-two-nodes": fine_tune({"gpusPerNode": 8, "nodes": 2}, method="full",
                                 hyperparameters={"batchSize": 1, "gradientCheckpointing": True},
                                 distribution={"strategy": "deepspeed", "zeroStage": 3}),
    "qlora-wandb": fine_tune(method="qlora", tracking={
        "wandb": {"project": "seed", "apiKeySecret": {"name": "wandb", "key": "api-key"}},
        "mlflow": {"trackingUri": "https://mlflow.example.com", "apiKeySecret": {"name": "mlflow", "key": "token"}}}),
    "own-pool": fine_tune(scheduling={
        "nodeSelector": {"pool": "a100"}, "tolerations": [{"key": "a100", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["eu-1a"]}]}]}}},
        "priorityClassName": "training"}),
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_is_valid_kubernetes(variant, version):
    for obj in children(VARIANTS[variant])[1]:
        kubernetes_validate.validate(obj, version, strict=True)


def _job(objs):
    return next(o for o in objs if o["kind"] == "Job")


def test_single_gpu_job_is_locked_down_and_owned():
    task, objs = children(VARIANTS["one-gpu"])
    config_map, job = objs
    assert json.loads(config_map["data"]["task.json"]) == task
    name = child_name("llama3-seed", task["digest"])
    assert job["metadata"]["name"] == config_map["metadata"]["name"] == name
    for obj in objs:
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTune", "llama3-seed", True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "llmfactory_runtime", "finetune", "--task", TASK_PATH]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == SETTINGS.node_selector and pod["tolerations"] == SETTINGS.tolerations
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                  "capabilities": {"drop": ["ALL"]}}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    assert rules[1] == {"action": "Ignore", "onExitCodes": {"containerName": "runtime", "operator": "In", "values": [3]}}
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == SETTINGS.backoff_limit
    assert pod["serviceAccountName"] == "llmfactory-runtime"


def test_the_runtime_images_pull_secrets_and_the_platforms_extra_env_reach_every_jobs_pod():
    """A private registry's mirror of the runtime image, a proxy or NCCL's network interface: a
    platform team's settings (Helm's runtime.imagePullSecrets and extraEnv), beside the operator's own."""
    settings = SETTINGS.model_copy(update={"image_pull_secrets": ["regcred"], "extra_env": [
        {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"},
        {"name": "NCCL_SOCKET_IFNAME", "valueFrom": {"configMapKeyRef": {"name": "nccl", "key": "if"}}}]})
    for variant in ("one-gpu", "two-nodes", "sharded-dataset"):
        job = _job(children(VARIANTS[variant], settings)[1])
        pod = job["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HTTPS_PROXY"]["value"] == "http://proxy.corp:3128" and "valueFrom" in env["NCCL_SOCKET_IFNAME"]
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "llmfactory-s3"
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)
    assert "imagePullSecrets" not in _job(children(VARIANTS["one-gpu"])[1])["spec"]["template"]["spec"]


def test_a_resources_own_env_reaches_its_pods_over_the_platforms_and_leaves_its_task_as_it_was():
    """One FineTune's allocator setting, NCCL's debug level from a ConfigMap, a proxy's password from a
    Secret (Kubeflow TrainJob's trainer.env): its Jobs get them beside the operator's variables, over
    runtime.extraEnv where both name one; not part of what the run computes, so the same task."""
    settings = SETTINGS.model_copy(update={"extra_env": [{"name": "NCCL_DEBUG", "value": "WARN"},
                                                         {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"}]})
    own = [{"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
           {"name": "NCCL_DEBUG", "valueFrom": {"configMapKeyRef": {"name": "nccl", "key": "debug"}}},
           {"name": "PROXY_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "password"}}}]
    for variant in ("one-gpu", "two-nodes", "sharded-dataset"):
        body = VARIANTS[variant]
        task, _ = children(body, settings)
        with_env = {**body, "spec": {**body["spec"], "env": own}}
        env_task, objs = children(with_env, settings)
        assert env_task["digest"] == task["digest"] and "env" not in env_task["spec"]
        job = _job(objs)
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        names = [var["name"] for var in env]
        assert len(names) == len(set(names)) and {"HOME", "HF_HOME", "AWS_ACCESS_KEY_ID"} <= set(names)
        by_name = {var["name"]: var for var in env}
        assert [by_name[var["name"]] for var in own] == own  # the resource's, not the platform's NCCL_DEBUG
        assert by_name["HTTPS_PROXY"] == {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"}
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_a_resources_volumes_are_mounted_where_its_file_uris_read_and_leave_its_task_as_it_was():
    """Models on shared storage (a claim at /models, read-only) and a Hugging Face cache on NFS that
    every Job downloads into once (/cache/huggingface, below the cache emptyDir, writable): each pod
    of the run mounts them; where the data is mounted does not change what the run computes."""
    volumes = [{"name": "models", "mountPath": "/models", "persistentVolumeClaim": {"claimName": "models"},
                "subPath": "meta-llama"},
               {"name": "hf-cache", "mountPath": "/cache/huggingface", "readOnly": False,
                "nfs": {"server": "nfs.storage", "path": "/exports/hf"}}]
    for variant in ("one-gpu", "two-nodes", "sharded-dataset", "config-map-sources"):
        body = VARIANTS[variant]
        task, _ = children(body)
        mounted_task, objs = children({**body, "spec": {**body["spec"], "volumes": volumes}})
        assert mounted_task["digest"] == task["digest"] and "volumes" not in mounted_task["spec"]
        job = _job(objs)
        pod = job["spec"]["template"]["spec"]
        by_name = {v["name"]: v for v in pod["volumes"]}
        assert by_name["models"] == {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
        assert by_name["hf-cache"] == {"name": "hf-cache", "nfs": {"server": "nfs.storage", "path": "/exports/hf",
                                                                   "readOnly": False}}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "meta-llama"}
        assert mounts["hf-cache"] == {"name": "hf-cache", "mountPath": "/cache/huggingface", "readOnly": False}
        assert {"task", "shm", "tmp", "cache"} <= set(mounts) and len(pod["volumes"]) == len(mounts)
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_credentials_are_references_never_values():
    _, objs = children(VARIANTS["one-gpu"])
    env = _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
    secret_vars = {e["name"]: e for e in env if e["name"].startswith("AWS_") and e["name"] != "AWS_ENDPOINT_URL"}
    assert set(secret_vars) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for var in secret_vars.values():
        assert "value" not in var and var["valueFrom"]["secretKeyRef"]["name"] == "llmfactory-s3"


def test_every_secret_a_job_carries_is_a_credential_the_python_grader_never_sees():
    """The runtime keeps CREDENTIAL_ENV out of a python grader's process (the code it runs may be a
    model's): every variable a Job gets from a Secret must be in it."""
    from llmfactory_runtime import CREDENTIAL_ENV

    judge = {"model": "gpt-4o-mini", "apiKeySecret": {"name": "grader", "key": "token"}}
    bodies = [*VARIANTS.values(), dataset_build(filters={"judge": {"openai": judge}},
                                                preferences={"rejected": {"openai": judge}}),
              fine_tune(objective="grpo", grpo={"generations": 2, "grader": {"operation": "judge", "judge": judge}},
                        hyperparameters={"batchSize": 1})]
    from_secrets = {e["name"] for body in bodies for e in _job(children(body)[1])["spec"]["template"]["spec"]
                    ["containers"][0]["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WANDB_API_KEY", "LLMFACTORY_GRADER_API_KEY",
            "LLMFACTORY_REJECTED_API_KEY"} <= from_secrets
    assert from_secrets <= set(CREDENTIAL_ENV)


def test_tracker_keys_are_secret_references_and_training_gets_time_to_checkpoint():
    task, objs = children(VARIANTS["qlora-wandb"])
    pod = _job(objs)["spec"]["template"]["spec"]
    [key] = [e for e in pod["containers"][0]["env"] if e["name"] == "WANDB_API_KEY"]
    assert key == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    [token] = [e for e in pod["containers"][0]["env"] if e["name"] == "MLFLOW_TRACKING_TOKEN"]
    assert token == {"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "token"}}}
    # The task carries the reference (where the key is), never a key: the operator never reads the Secret.
    assert task["spec"]["tracking"]["wandb"]["apiKeySecret"] == {"name": "wandb", "key": "api-key"}
    assert pod["terminationGracePeriodSeconds"] == SETTINGS.termination_grace_seconds


def test_a_grpo_graders_judge_key_reaches_the_pod_only_by_reference():
    judge = {"model": "gpt-4o-mini", "apiKeySecret": {"name": "grader", "key": "token"}}
    task, objs = children(fine_tune(objective="grpo", grpo={"generations": 4, "grader": {
        "referenceField": "answer", "operation": "judge", "judge": judge}},
        hyperparameters={"batchSize": 1, "gradientCheckpointing": True}))
    env = _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
    [key] = [e for e in env if e["name"] == "LLMFACTORY_GRADER_API_KEY"]
    assert key == {"name": "LLMFACTORY_GRADER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "grader", "key": "token"}}}
    assert task["spec"]["grpo"]["grader"]["judge"]["apiKeySecret"] == {"name": "grader", "key": "token"}
    # A sum grader's judge part: the same variable, from that part's Secret.
    parts = [{"name": "format", "operation": "contains"},
             {"name": "quality", "operation": "judge", "judge": {**judge, "apiKeySecret": {"name": "rater", "key": "k"}}}]
    _, objs = children(fine_tune(objective="grpo", grpo={"generations": 4, "grader": {
        "referenceField": "answer", "operation": "sum", "parts": parts}}, hyperparameters={"batchSize": 1}))
    env = _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["valueFrom"] for e in env if e["name"] == "LLMFACTORY_GRADER_API_KEY"] == [
        {"secretKeyRef": {"name": "rater", "key": "k"}}]
    # A cosine part's embeddings endpoint: its own variable.
    parts[0] = {"name": "meaning", "operation": "similarity", "metric": "cosine",
                "embeddings": {"model": "text-embedding-3-large", "apiKeySecret": {"name": "openai", "key": "key"}}}
    task, objs = children(fine_tune(objective="grpo", grpo={"generations": 4, "grader": {
        "referenceField": "answer", "operation": "sum", "parts": parts}}, hyperparameters={"batchSize": 1}))
    env = _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["valueFrom"] for e in env if e["name"] == "LLMFACTORY_EMBEDDINGS_API_KEY"] == [
        {"secretKeyRef": {"name": "openai", "key": "key"}}]
    assert task["spec"]["grpo"]["grader"]["parts"][0]["embeddings"]["apiKeySecret"] == {"name": "openai", "key": "key"}


def test_teacher_and_answer_judge_keys_reach_the_pod_only_by_reference():
    task, objs = children(dataset_build(filters={"judge": {"openai": {
        "model": "gpt-4o-mini", "apiKeySecret": {"name": "judge", "key": "token"}}}}))
    env = _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
    [key] = [e for e in env if e["name"] == "LLMFACTORY_TEACHER_API_KEY"]
    assert key == {"name": "LLMFACTORY_TEACHER_API_KEY",
                   "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}}}
    [judge] = [e for e in env if e["name"] == "LLMFACTORY_JUDGE_API_KEY"]
    assert judge["valueFrom"] == {"secretKeyRef": {"name": "judge", "key": "token"}}
    assert task["inputs"] == {} and task["cacheUri"] == f"{SETTINGS.store_uri}/ml/cache"
    # The teacher is an API: no GPU is held for it (the operator's default for DatasetBuild is one).
    limits = _job(objs)["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert SETTINGS.default_gpus["DatasetBuild"] == 1 and "nvidia.com/gpu" not in limits
    # A local model judging the answers or writing the rejected answers of preference pairs gets the
    # GPU; an API model, its own key by reference and no GPU.
    api_rejected = {"openai": {"model": "gpt-4o-mini", "apiKeySecret": {"name": "weak", "key": "token"}}}
    for local in ({"filters": {"judge": {"model": {"huggingface": "org/judge"}}}},
                  {"preferences": {"rejected": {"model": {"huggingface": "org/student"}}}},
                  {"preferences": {"rejected": api_rejected, "rewardModel": {"huggingface": "org/reward"}}}):
        _, objs = children(dataset_build(**local))
        assert _job(objs)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _, objs = children(dataset_build(preferences={"rejected": api_rejected}))
    container = _job(objs)["spec"]["template"]["spec"]["containers"][0]
    [weak] = [e for e in container["env"] if e["name"] == "LLMFACTORY_REJECTED_API_KEY"]
    assert weak["valueFrom"] == {"secretKeyRef": {"name": "weak", "key": "token"}}
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    # Gated Hugging Face datasets and models: the token, too, only by reference.
    [token] = [e for e in env if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}} and "value" not in token
    # Without a teacher (the sources' own answers) only the judge's key reaches the pod, and no GPU is held.
    body = dataset_build(filters={"judge": {"openai": {"model": "gpt-4o-mini",
                                                       "apiKeySecret": {"name": "judge", "key": "token"}}}})
    del body["spec"]["teacher"]
    _, objs = children(body)
    container = _job(objs)["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"] if "API_KEY" in e["name"]} == {"LLMFACTORY_JUDGE_API_KEY"}
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    body["spec"]["shards"] = 3  # the judge's work over 3 pods
    _, objs = children(body)
    job = _job(objs)["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 3, 3)
    # difficulty's student behind an API and its grader's API judge: each key by reference.
    body["spec"] |= {"format": "graded", "difficulty": {
        "openai": {"model": "student", "apiKeySecret": {"name": "vllm", "key": "token"}},
        "grader": {"operation": "judge", "judge": {"model": "gpt-4o", "apiKeySecret": {"name": "grader", "key": "k"}}}}}
    _, objs = children(body)
    env = {e["name"]: e["valueFrom"] for e in _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
           if "API_KEY" in e["name"]}
    assert env["LLMFACTORY_DIFFICULTY_API_KEY"] == {"secretKeyRef": {"name": "vllm", "key": "token"}}
    assert env["LLMFACTORY_GRADER_API_KEY"] == {"secretKeyRef": {"name": "grader", "key": "k"}}


def test_deepspeed_runs_under_torchrun_with_its_config_in_the_task():
    task, objs = children(VARIANTS["zero3-two-nodes"])
    container = _job(objs)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "llmfactory_runtime.torchrun"]
    assert "--nnodes=2" in container["command"]
    assert task["spec"]["distribution"] == {"strategy": "deepspeed", "zeroStage": 3, "offload": "none"}
    assert task["estimate"]["total_gib"] < 80


def test_multi_gpu_runs_torchrun_on_one_node():
    _, objs = children(VARIANTS["eight-gpus"])
    container = _job(objs)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["python", "-m", "llmfactory_runtime.torchrun", "--nproc-per-node=8"]
    # SIGTERM: torchrun waits for the workers' checkpoint for the pod's grace period, not its own 30 s.
    grace = _job(objs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"--shutdown-timeout={grace - 10}" in container["command"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "64", "memory": "900Gi"}


def test_a_text_corpus_build_asks_for_the_local_disk_it_spills_its_documents_to():
    _, objs = children(VARIANTS["text-corpus"])
    pod = _job(objs)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"] == {"limits": {"ephemeral-storage": "500Gi"}, "requests": {"ephemeral-storage": "500Gi"}}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]  # on the node's disk, within the pod's request


def test_multi_node_is_an_indexed_job_with_a_headless_service():
    _, objs = children(VARIANTS["two-nodes"])
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
    service, job = objs[1], objs[2]
    assert service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert all(spec["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    command = spec["template"]["spec"]["containers"][0]["command"]
    name = service["metadata"]["name"]
    assert "--nnodes=2" in command and "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert f"--master-addr={name}-0.{name}" in command
    # Any pod's end ends the attempt (JobSet's rule): the operator, not the Job, starts the next one.
    rules = spec["podFailurePolicy"]["rules"]
    assert spec["backoffLimit"] == 0 and [r["action"] for r in rules] == ["FailJob"] * 3
    assert (job["metadata"]["labels"]["llmfactory.dev/attempt"],
            job["metadata"]["annotations"]["llmfactory.dev/failures-before"]) == ("1", "0")


def test_a_later_attempt_of_a_multi_node_fine_tune_is_a_new_job_whose_pods_meet_under_new_names():
    body = VARIANTS["two-nodes"]
    task, first = children(body)
    later = build(body, task, SETTINGS, attempt=3, failures=1, active_before=3600)
    assert [o["metadata"]["name"] for o in later[:2]] == [o["metadata"]["name"] for o in first[:2]]  # one Service
    name, job = first[1]["metadata"]["name"], later[2]
    assert job["metadata"]["name"] == f"{name}-3" and len(f"{job['metadata']['name']}-1") <= 63  # pod hostnames
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--master-addr={name}-3-0.{name}" in command and job["spec"]["template"]["spec"]["subdomain"] == name
    assert job["metadata"]["annotations"]["llmfactory.dev/failures-before"] == "1"
    # The attempts share one deadline: this one gets what the first two left.
    assert job["spec"]["activeDeadlineSeconds"] == SETTINGS.active_deadline_seconds - 3600
    assert job["metadata"]["annotations"]["llmfactory.dev/active-seconds-before"] == "3600"
    kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_a_resources_own_backoff_limit_and_deadline_replace_the_operators_and_leave_its_task_as_it_was():
    """Kubeflow's runPolicy: a run's retries and time are the resource's to set (a DatasetBuild on spot
    nodes retried more, a FineTune given a day); not part of what the run computes, so the same task."""
    own = {"backoffLimit": 7, "activeDeadlineSeconds": 2 * 24 * 3600}
    for variant in ("one-gpu", "two-nodes"):
        body = VARIANTS[variant]
        task, _ = children(body)
        limited = {**body, "spec": {**body["spec"], **own}}
        limited_task, objs = children(limited)
        assert limited_task["digest"] == task["digest"] and "backoffLimit" not in limited_task["spec"]
        job = _job(objs)
        assert job["spec"]["activeDeadlineSeconds"] == own["activeDeadlineSeconds"]
        assert job["spec"]["backoffLimit"] == (0 if variant == "two-nodes" else 7)  # attempts are the operator's there
        later = build(limited, limited_task, SETTINGS, attempt=2, failures=1, active_before=3600)
        if variant == "two-nodes":  # the attempts share the resource's deadline
            assert _job(later)["spec"]["activeDeadlineSeconds"] == own["activeDeadlineSeconds"] - 3600
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_sharded_dataset_build_is_an_indexed_job_with_one_pod_per_shard():
    task, objs = children(VARIANTS["sharded-dataset"])
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]  # no rendezvous: shards meet in the store
    spec = _job(objs)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["template"]["spec"]["containers"][0]["command"][-2:] == ["--shard", "$(JOB_COMPLETION_INDEX)"]
    assert task["spec"]["shards"] == 4 and task["digest"] == children(dataset_build())[0]["digest"]


def test_config_map_sources_are_mounted_read_only_where_the_runtime_reads_them():
    from llmfactory_runtime import CONFIG_MAPS_DIR

    task, objs = children(VARIANTS["config-map-sources"])
    pod = _job(objs)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"].startswith("source-")]
    assert volume["configMap"] == {"name": "prompts", "items": [{"key": "en.jsonl", "path": "en.jsonl"},
                                                                {"key": "ru.jsonl", "path": "ru.jsonl"}]}
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": f"{CONFIG_MAPS_DIR}/prompts", "readOnly": True}
    assert sorted(f["key"] for f in task["inputs"]["configMaps"].values()) == ["en.jsonl", "ru.jsonl"]


def test_resource_scheduling_overrides_the_operator_defaults():
    pod = _job(children(VARIANTS["own-pool"])[1])["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"][0]["key"] == "a100"
    assert pod["affinity"]["nodeAffinity"] and pod["priorityClassName"] == "training"
    # Scheduling is not part of what the run computes: same task digest.
    assert children(VARIANTS["own-pool"])[0]["digest"] == children(VARIANTS["one-gpu"])[0]["digest"]


def test_kueue_queue_label_and_suspended_job():
    _, objs = children(VARIANTS["kueue"])
    job = _job(objs)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100-queue"
    assert job["spec"]["suspend"] is True


def test_a_suspended_resource_gets_a_suspended_job_of_the_same_task():
    task, objs = children(VARIANTS["suspended"])
    job = _job(objs)
    assert job["spec"]["suspend"] is True and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert task["digest"] == children(VARIANTS["one-gpu"])[0]["digest"]  # resuming it runs the same task


def test_cpu_only_phase_gets_no_gpu_and_no_gpu_pool():
    pod = _job(children(quantization())[1])["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and pod["containers"][0]["resources"] == {}


def test_compressed_tensors_quantization_runs_on_the_gpu_pool():
    # GGUF conversion is CPU work (the operator's default for Quantization is no GPU); fp8/gptq/awq
    # through llmcompressor are GPU work unless the resource says otherwise.
    assert SETTINGS.default_gpus["Quantization"] == 0
    pod = _job(children(quantization(format="compressed-tensors", types=["fp8"]))[1])["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == SETTINGS.node_selector
    on_cpu = quantization(format="compressed-tensors", types=["fp8"], resources={"gpusPerNode": 0})
    assert "limits" not in _job(children(on_cpu)[1])["spec"]["template"]["spec"]["containers"][0]["resources"]


def test_settings_come_from_the_environment():
    settings = OperatorSettings.from_env({
        "LLMFACTORY_STORE_URI": "s3://b/p", "LLMFACTORY_IMAGE": "img:1", "LLMFACTORY_BACKOFF_LIMIT": "5",
        "LLMFACTORY_NODE_SELECTOR": '{"pool": "h100"}', "LLMFACTORY_POLL_SECONDS": "2.5",
        "LLMFACTORY_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]', "UNRELATED": "x"})
    assert (settings.store_uri, settings.image, settings.backoff_limit) == ("s3://b/p", "img:1", 5)
    assert settings.node_selector == {"pool": "h100"} and settings.poll_seconds == 2.5
    assert settings.tolerations == [{"key": "gpu", "operator": "Exists"}]
    with pytest.raises(ValueError, match="store_uri"):
        OperatorSettings.from_env({})
