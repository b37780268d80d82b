"""Task document + resource -> the ConfigMap and Job (and, for multi-node training, the headless
Service) that run it. Plain manifests; every one is validated against the official schemas in tests."""

from __future__ import annotations

import json
from typing import Any

from llmfactory_runtime import CONFIG_MAPS_DIR, EXIT_INTERRUPTED, EXIT_INVALID_TASK, api_keys

from ..api import KINDS
from ..api.dataset_build import DatasetBuildSpec
from ..api.quantization import QuantizationSpec
from .settings import OperatorSettings

TASK_DIR = "/etc/llmfactory"
TASK_PATH = f"{TASK_DIR}/task.json"
CONTAINER = "runtime"
RENDEZVOUS_PORT = 29500
MANAGED_BY = {"app.kubernetes.io/managed-by": "llmfactory"}
ATTEMPT_LABEL = "llmfactory.dev/attempt"
FAILURES_ANNOTATION = "llmfactory.dev/failures-before"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ACTIVE_ANNOTATION = "llmfactory.dev/active-seconds-before"


def child_name(resource_name: str, digest: str) -> str:
    """Deterministic per (resource, task): a restarted operator finds what it made. Job names
    must fit a label value (63 characters), and an Indexed Job's pod hostnames add a suffix."""
    return f"{resource_name[:48].rstrip('-.')}-{digest[:8]}"


def attempt_name(base: str, attempt: int) -> str:
    """A multi-node FineTune's attempt n > 1 is a Job of its own (below): `<base>-<n>`. Its pods'
    hostnames are new, so no pod of a new attempt can meet a pod of the old one at the rendezvous."""
    return base if attempt == 1 else f"{base}-{attempt}"


def attempt_of(job: dict[str, Any]) -> int:
    return int(job["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "1"))


def failures_before(job: dict[str, Any]) -> int:
    """Counted failures of the attempts before this Job (its annotation, written when it was made)."""
    return int((job["metadata"].get("annotations") or {}).get(FAILURES_ANNOTATION, "0"))


def active_seconds_before(job: dict[str, Any]) -> int:
    """Seconds the attempts before this Job ran (its annotation, written when it was made)."""
    return int((job["metadata"].get("annotations") or {}).get(ACTIVE_ANNOTATION, "0"))


def labels(kind: str, name: str, digest: str) -> dict[str, str]:
    return {**MANAGED_BY, "llmfactory.dev/kind": kind.lower(), "llmfactory.dev/name": name[:63],
            "llmfactory.dev/task": digest[:16]}


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": body["metadata"]["name"],
            "uid": body["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _secret_env(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Each API key of the spec, by secretKeyRef into the variable the runtime reads it from: the
    key never passes through the operator, the task document or the status."""
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": holder["apiKeySecret"]["name"],
                                                          "key": holder["apiKeySecret"]["key"]}}}
            for holder, name, _ in api_keys(spec) if holder.get("apiKeySecret")]


def _extra_env(operators: list[dict[str, Any]], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """runtime.extraEnv, then the resource's own env, which wins where both name a variable (a container
    with a name twice is warned about by the API server, and its last one silently wins)."""
    own = {var["name"] for var in resources}
    return [var for var in operators if var["name"] not in own] + resources


def _env(settings: OperatorSettings) -> list[dict[str, Any]]:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "LLMFACTORY_CACHE", "value": "/cache"},
           {"name": "HF_HOME", "value": "/cache/huggingface"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if settings.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint})
    if settings.s3_region:
        env.append({"name": "AWS_REGION", "value": settings.s3_region})
    if settings.s3_secret:  # a reference: the key never passes through the operator
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret, "key": key}}})
    if settings.hf_token_secret:  # gated models (Llama 3): the token stays in the user's Secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": settings.hf_token_secret,
                                                                         "key": "HF_TOKEN"}}})
    return env


def _config_map_volumes(task: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) for the ConfigMaps a DatasetBuild reads: <CONFIG_MAPS_DIR>/<name>/<key>."""
    keys: dict[str, set[str]] = {}
    for file in (task["inputs"].get("configMaps") or {}).values():
        keys.setdefault(file["name"], set()).add(file["key"])
    volumes, mounts = [], []
    for i, (name, wanted) in enumerate(sorted(keys.items())):
        volumes.append({"name": f"source-{i}", "configMap": {
            "name": name, "items": [{"key": k, "path": k} for k in sorted(wanted)]}})
        mounts.append({"name": f"source-{i}", "mountPath": f"{CONFIG_MAPS_DIR}/{name}", "readOnly": True})
    return volumes, mounts


def _volumes(spec_volumes: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the resource's spec.volumes: its claims and NFS exports, read-only unless it says."""
    volumes, mounts = [], []
    for v in spec_volumes:
        read_only = v.get("readOnly", True)
        source = ({"persistentVolumeClaim": {"claimName": v["persistentVolumeClaim"]["claimName"], "readOnly": read_only}}
                  if "persistentVolumeClaim" in v else {"nfs": {**v["nfs"], "readOnly": read_only}})
        volumes.append({"name": v["name"], **source})
        mount = {"name": v["name"], "mountPath": v["mountPath"], "readOnly": read_only}
        mounts.append({**mount, "subPath": v["subPath"]} if v.get("subPath") else mount)
    return volumes, mounts


def _command(kind: str, gpus: int, nodes: int, job: str, service: str, shards: int, grace_seconds: int) -> list[str]:
    phase = KINDS[kind].phase
    runtime = ["-m", "llmfactory_runtime", phase, "--task", TASK_PATH]
    if shards > 1:  # one pod per shard of an Indexed Job
        runtime += ["--shard", "$(JOB_COMPLETION_INDEX)"]
    if kind != "FineTune" or (gpus <= 1 and nodes == 1):
        return ["python", *runtime]
    # torchrun that exits with the runtime's code (podFailurePolicy reads it). On SIGTERM it gives
    # the workers the pod's grace period, less ten seconds to report, to checkpoint (its default: 30 s).
    launcher = ["python", "-m", "llmfactory_runtime.torchrun", f"--nproc-per-node={max(gpus, 1)}",
                f"--shutdown-timeout={max(grace_seconds - 10, 1)}"]
    if nodes > 1:
        # Pod 0 of the Indexed Job is the rendezvous point, reachable by name through the Service.
        launcher += [f"--nnodes={nodes}", "--node-rank=$(JOB_COMPLETION_INDEX)",
                     f"--master-addr={job}-0.{service}", f"--master-port={RENDEZVOUS_PORT}"]
    return launcher + runtime


def _default_gpus(kind: str, spec: dict[str, Any], settings: OperatorSettings) -> int:
    # A DatasetBuild whose models are all APIs holds no GPU; compressed-tensors types are GPU
    # formats (llmcompressor calibrates on one), GGUF conversion is CPU work.
    typed = KINDS[kind].spec.model_validate(spec)
    if isinstance(typed, DatasetBuildSpec) and not typed.runs_a_local_model():
        return 0
    if isinstance(typed, QuantizationSpec) and typed.format == "compressed-tensors":
        return max(settings.default_gpus.get(kind, 0), 1)
    return settings.default_gpus.get(kind, 0)


def _nodes(body: dict[str, Any]) -> int:
    return (body.get("spec", {}).get("resources") or {}).get("nodes", 1) if body["kind"] == "FineTune" else 1


def restarts_as_a_whole(body: dict[str, Any]) -> bool:
    """A multi-node FineTune: each attempt is a Job of its own (see build)."""
    return _nodes(body) > 1


def build(body: dict[str, Any], task: dict[str, Any], settings: OperatorSettings, attempt: int = 1,
          failures: int = 0, active_before: int = 0) -> list[dict[str, Any]]:
    """[ConfigMap, Job] or [ConfigMap, Service, Job] for one run of the resource; a multi-node
    FineTune's Job is that of one attempt, after `failures` counted failures and `active_before`
    seconds of running (the caller starts no attempt once they reach the deadline)."""
    kind, meta, spec = body["kind"], body["metadata"], body.get("spec", {})
    namespace, digest = meta["namespace"], task["digest"]
    name = child_name(meta["name"], digest)
    tags = labels(kind, meta["name"], digest)
    owner = [owner_reference(body)]
    resources = spec.get("resources") or {}
    gpus = resources.get("gpusPerNode", _default_gpus(kind, spec, settings))
    nodes = _nodes(body)
    shards = spec.get("shards", 1) if kind == "DatasetBuild" else 1
    queue = spec.get("queueName") or settings.default_queue_name
    job_name = attempt_name(name, attempt) if nodes > 1 else name

    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": tags, "ownerReferences": owner},
        "data": {"task.json": json.dumps(task, indent=2, sort_keys=True)},
    }
    source_volumes, source_mounts = _config_map_volumes(task)
    own_volumes, own_mounts = _volumes(spec.get("volumes") or [])
    limits: dict[str, str] = {}
    if gpus:
        limits[settings.gpu_resource] = str(gpus)
    for field, key in (("cpu", "cpu"), ("memory", "memory"), ("ephemeralStorage", "ephemeral-storage")):
        if resources.get(field):
            limits[key] = resources[field]
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _command(kind, gpus, nodes, job_name, name, shards, settings.termination_grace_seconds),
        "env": _env(settings) + _extra_env(settings.extra_env, spec.get("env") or []) + _secret_env(spec),
        "resources": {"limits": limits, "requests": dict(limits)} if limits else {},
        "volumeMounts": [{"name": "task", "mountPath": TASK_DIR, "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"},
                         {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "cache", "mountPath": "/cache"}, *source_mounts, *own_mounts],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    if nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job retries; podFailurePolicy needs Never
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "task", "configMap": {"name": name}},
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
                    {"name": "tmp", "emptyDir": {}},
                    {"name": "cache", "emptyDir": {}}, *source_volumes, *own_volumes],
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:  # a private registry's mirror of the runtime image
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in settings.image_pull_secrets]
    if kind == "FineTune":  # SIGTERM makes training checkpoint before it exits: give it the time
        pod_spec["terminationGracePeriodSeconds"] = settings.termination_grace_seconds
    # The GPU pool by default; the resource's own scheduling, field by field, wins.
    scheduling = spec.get("scheduling") or {}
    defaults = {"nodeSelector": settings.node_selector, "tolerations": settings.tolerations,
                "affinity": settings.affinity} if gpus else {}
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        value = scheduling.get(field, defaults.get(field))
        if value:
            pod_spec[field] = value
    if nodes > 1:
        pod_spec["subdomain"] = name
    job_meta = {"name": job_name, "namespace": namespace, "labels": dict(tags), "ownerReferences": owner}
    if queue:
        job_meta["labels"][QUEUE_LABEL] = queue
    rules = [
        # The runtime's own verdict that the task is invalid: retrying cannot help.
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": [EXIT_INVALID_TASK]}},
        # SIGTERM with the work saved (a checkpoint, the answers): the pod was stopped (preemption,
        # eviction, deletion). The next pod resumes; not a failure.
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": [EXIT_INTERRUPTED]}},
        # Preemption, eviction, node drain: not the workload's fault, not counted.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    backoff_limit, deadline = settings.limits(spec)
    if nodes > 1:
        # JobSet's rule: when one node's pod ends, every pod of the run restarts, as a new Job. A
        # replacement pod in the same Job would get the old pod's hostname and could join the old
        # pod 0 at the rendezvous while it still lives, and both would wait for ever. So the Job
        # fails on any pod's end, and the operator starts the next attempt once no pod is left,
        # counting only real failures against the backoff limit (see reconcile).
        backoff_limit = 0
        rules[1]["action"] = rules[2]["action"] = "FailJob"
        job_meta["labels"][ATTEMPT_LABEL] = str(attempt)
        job_meta["annotations"] = {FAILURES_ANNOTATION: str(failures), ACTIVE_ANNOTATION: str(active_before)}
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": {"rules": rules},
        "template": {"metadata": {"labels": dict(tags)}, "spec": pod_spec},
    }
    if queue or spec.get("suspend"):
        job_spec["suspend"] = True  # Kueue admits it by unsuspending; spec.suspend: see reconcile
    if deadline:
        # A Job's deadline spans its pods' retries; a multi-node run's attempts are Jobs of their
        # own, so each gets what the earlier ones left.
        job_spec["activeDeadlineSeconds"] = deadline - (active_before if nodes > 1 else 0)
    if settings.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    if nodes > 1 or shards > 1:
        job_spec.update(completionMode="Indexed", completions=max(nodes, shards), parallelism=max(nodes, shards))
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}
    if nodes == 1:
        return [config_map, job]
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": tags, "ownerReferences": owner},
        "spec": {"clusterIP": "None", "selector": {"llmfactory.dev/task": tags["llmfactory.dev/task"],
                                                   "llmfactory.dev/name": tags["llmfactory.dev/name"]},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}], "publishNotReadyAddresses": True},
    }
    return [config_map, service, job]


def jobs_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def api_path(obj: dict[str, Any]) -> str:
    """The collection path a child is created under."""
    ns = obj["metadata"]["namespace"]
    return {"ConfigMap": f"/api/v1/namespaces/{ns}/configmaps", "Service": f"/api/v1/namespaces/{ns}/services",
            "Job": jobs_path(ns)}[obj["kind"]]
