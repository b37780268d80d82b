"""The Helm chart with real Helm v3 and v4: lint, render with default and non-default values,
every object valid for every Kubernetes version from 1.29, and what it renders is what the
operator reads (settings, command line) and needs (RBAC, in tests/operator/test_deployment_modes.py)."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from llmfactory.cli import build_parser
from llmfactory.controller.settings import OperatorSettings
from tests.helm import CHART, HELM_VERSIONS, NAMESPACE, render, run
from tests.unit.test_crds import K8S_VERSIONS

MINIMAL = {"store": {"uri": "s3://team-bucket/llmfactory"}}
EVERYTHING = {
    "replicaCount": 2,
    "image": {"repository": "registry.example.com/llmfactory/operator", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "watchNamespaces": ["team-a", "team-b"],
    "store": {"uri": "s3://team-bucket/llmfactory",
              "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1", "credentialsSecret": "s3-keys"}},
    "runtime": {"image": "registry.example.com/llmfactory/runtime:0.1.0", "serviceAccount": "trainer",
                "hfTokenSecret": "hf-token", "imagePullSecrets": ["regcred"],
                "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"},
                             {"name": "NCCL_SOCKET_IFNAME", "valueFrom": {"configMapKeyRef": {"name": "nccl", "key": "if"}}}],
                "defaultGpus": {"DatasetBuild": 0, "FineTune": 8, "Benchmark": 1, "Quantization": 0},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["h100"]}]}]}}},
                "shmSize": "64Gi", "backoffLimit": 6, "activeDeadlineSeconds": 0, "ttlSecondsAfterFinished": 3600,
                "terminationGraceSeconds": 600},
    "kueue": {"defaultQueueName": "gpu-queue"},
    "pollSeconds": 30,
    "logLevel": "debug",
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/llmfactory"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "podAnnotations": {"example.com/team": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "priorityClassName": "system-cluster-critical",
}
VALUE_SETS = {"defaults": MINIMAL, "everything": EVERYTHING,
              "peered-cluster-wide": {**MINIMAL, "replicaCount": 3}}
BUILTIN_GROUPS = ("v1", "apps/v1", "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1")


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def container_of(objects):
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


@pytest.mark.parametrize("version", HELM_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS, ids=str)
def test_chart_lints_strictly(version, values, tmp_path):
    result = run(version, "lint", "--strict", str(CHART), values=VALUE_SETS[values], tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", HELM_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS, ids=str)
def test_rendered_objects_are_valid_for_every_kubernetes_version(version, values, tmp_path):
    objects = render(version, VALUE_SETS[values], tmp_path)
    builtin = [o for o in objects if o["apiVersion"] in BUILTIN_GROUPS]
    assert {o["kind"] for o in builtin} >= {"Deployment", "ServiceAccount", "Service"}
    for k8s in K8S_VERSIONS:
        for obj in builtin:
            kubernetes_validate.validate(obj, k8s, strict=True)
    others = [o["kind"] for o in objects if o["apiVersion"] not in BUILTIN_GROUPS]
    assert others == (["ServiceMonitor"] if values == "everything" else [])


def test_helm_3_and_4_render_the_same(tmp_path):
    for values in VALUE_SETS.values():
        assert render("3.18", values, tmp_path) == render("4.1", values, tmp_path)


@pytest.mark.parametrize("bad, message", [
    ({}, "store.uri is required"),
    ({"store": {"uri": "/data/artifacts"}}, "store.uri"),
    ({**MINIMAL, "replicaCount": 0}, "replicaCount"),
    ({**MINIMAL, "watchNamespaces": ["Team_A"]}, "watchNamespaces"),
    ({**MINIMAL, "logLevel": "loud"}, "logLevel"),
    ({**MINIMAL, "runtime": {"image": "x", "shmSize": "lots"}}, "shmSize"),
    ({**MINIMAL, "storeUri": "s3://team-bucket/x"}, "storeUri"),
    ({**MINIMAL, "runtime": {"image": "x", "extraEnv": [{"name": "HF_TOKEN", "value": "hf_x"}]}}, "runtime.extraEnv"),
    ({**MINIMAL, "runtime": {"image": "x", "extraEnv": [{"name": "LLMFACTORY_CACHE", "value": "/x"}]}}, "runtime.extraEnv"),
    ({**MINIMAL, "runtime": {"image": "x", "extraEnv": [{"value": "no name"}]}}, "runtime.extraEnv"),
])
def test_bad_values_are_refused_naming_the_key(bad, message, tmp_path):
    for version in HELM_VERSIONS:
        result = run(version, "template", "x", str(CHART), values=bad, tmp=tmp_path)
        # Helm 3 names the key store.uri, Helm 4 /store/uri.
        assert result.returncode != 0 and message in result.stderr.replace("/", "."), result.stderr


def test_operator_settings_read_back_what_the_values_say(tmp_path):
    _, container = container_of(render("3.18", EVERYTHING, tmp_path))
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {f"LLMFACTORY_{name.upper()}" for name in OperatorSettings.model_fields}
    assert {n for n in env if n.startswith("LLMFACTORY_")} <= known, "the chart sets a setting that does not exist"
    settings = OperatorSettings.from_env({k: v for k, v in env.items() if v is not None})
    runtime = EVERYTHING["runtime"]
    assert settings.store_uri == EVERYTHING["store"]["uri"]
    assert settings.image == runtime["image"] and settings.service_account == "trainer"
    assert settings.hf_token_secret == "hf-token"
    assert settings.image_pull_secrets == ["regcred"] and settings.extra_env == runtime["extraEnv"]
    assert settings.default_gpus == runtime["defaultGpus"]
    assert (settings.node_selector, settings.tolerations, settings.affinity) == (
        runtime["nodeSelector"], runtime["tolerations"], runtime["affinity"])
    assert (settings.shm_size, settings.backoff_limit, settings.termination_grace_seconds) == ("64Gi", 6, 600)
    assert settings.active_deadline_seconds is None and settings.ttl_seconds_after_finished == 3600
    assert (settings.default_queue_name, settings.poll_seconds) == ("gpu-queue", 30)
    assert (settings.s3_endpoint, settings.s3_region, settings.s3_secret) == (
        "http://minio.storage:9000", "eu-west-1", "s3-keys")
    # The operator's own S3 access: keys by reference only.
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secret_refs == {k: {"name": "s3-keys", "key": k} for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def test_the_schema_refuses_the_extra_env_the_operator_refuses():
    """The variables the operator sets itself, which runtime.extraEnv may not replace: one list, the
    operator's, which the schema repeats for helm install to refuse them first."""
    from llmfactory.api.common import OPERATOR_ENV

    schema = json.loads((CHART / "values.schema.json").read_text())
    name = schema["properties"]["runtime"]["properties"]["extraEnv"]["items"]["properties"]["name"]
    assert name["not"]["anyOf"] == [{"pattern": "^LLMFACTORY_"}, {"enum": list(OPERATOR_ENV)}]
    for bad in ({"name": "HF_TOKEN", "value": "x"}, {"name": "LLMFACTORY_CACHE", "value": "/x"}, {"value": "x"}):
        with pytest.raises(ValueError, match="runtime.extraEnv"):
            OperatorSettings(store_uri="s3://b/p", extra_env=[bad])


def test_default_settings_match_the_operators_defaults(tmp_path):
    _, container = container_of(render("3.18", MINIMAL, tmp_path))
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    rendered = OperatorSettings.from_env(env).model_dump()
    defaults = OperatorSettings(store_uri=MINIMAL["store"]["uri"]).model_dump()
    defaults["image"] = rendered["image"]  # the chart pins the runtime image of its own release
    assert rendered == defaults


@pytest.mark.parametrize("values, namespaces, standalone", [
    (MINIMAL, None, True), (EVERYTHING, ["team-a", "team-b"], False)], ids=["defaults", "everything"])
def test_command_line_is_one_the_operator_accepts(values, namespaces, standalone, tmp_path):
    _, container = container_of(render("4.1", values, tmp_path))
    args = build_parser().parse_args(container["args"])
    assert args.func.__name__ == "cmd_operator"
    assert (args.namespace, args.standalone) == (namespaces, standalone)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz" and args.metrics_port == ports["metrics"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_pod_meets_the_restricted_pod_security_standard(tmp_path):
    deployment, container = container_of(render("3.18", MINIMAL, tmp_path))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert "hostPath" not in json.dumps(pod) and "hostNetwork" not in pod


def test_cluster_wide_mode_uses_a_cluster_role(tmp_path):
    objects = render("3.18", MINIMAL, tmp_path)
    (role,) = by_kind(objects, "ClusterRole")
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmf-llmfactory", "namespace": NAMESPACE}]
    assert not by_kind(objects, "Role") and not by_kind(objects, "CustomResourceDefinition")
    rules = json.dumps(role["rules"])
    assert "*" not in rules and "secrets" not in rules
    # The one thing it deletes: a failed run's Jobs, when a retry is asked for.
    assert [r["resources"] for r in role["rules"] if "delete" in r["verbs"]] == [["jobs"]]
    assert "kopf.dev" not in rules  # no peering with one replica


def test_namespaced_mode_grants_nothing_cluster_wide(tmp_path):
    objects = render("3.18", EVERYTHING, tmp_path)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")) == ["team-a", "team-b"]
    assert all(any("kopfpeerings" in r["resources"] for r in role["rules"]) for role in roles)
    (crd,) = by_kind(objects, "CustomResourceDefinition")
    assert (crd["metadata"]["name"], crd["spec"]["scope"]) == ("kopfpeerings.kopf.dev", "Namespaced")


def test_peered_cluster_wide_mode_installs_the_cluster_peering(tmp_path):
    objects = render("3.18", VALUE_SETS["peered-cluster-wide"], tmp_path)
    (crd,) = by_kind(objects, "CustomResourceDefinition")
    assert (crd["metadata"]["name"], crd["spec"]["scope"]) == ("clusterkopfpeerings.kopf.dev", "Cluster")
    (role,) = by_kind(objects, "ClusterRole")
    assert any("clusterkopfpeerings" in r["resources"] for r in role["rules"])
    _, container = container_of(objects)
    assert "--peering=llmfactory" in container["args"] and "--standalone" not in container["args"]


def test_chart_crds_are_the_generated_ones():
    for path in (CHART / "crds").glob("*.yaml"):
        assert path.read_text() == (CHART.parent.parent / "crds" / path.name).read_text()


def test_schema_knows_every_value_and_the_defaults_pass_it():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate({**values, **MINIMAL}, schema)
    jsonschema.validate(EVERYTHING, schema)

    def keys(node, schema_node, path=""):
        for key, value in node.items():
            assert key in schema_node["properties"], f"values.yaml key {path}{key} is not in values.schema.json"
            sub = schema_node["properties"][key]
            if isinstance(value, dict) and "properties" in sub:
                keys(value, sub, f"{path}{key}.")
    keys(values, schema)


def test_generated_docs_are_fresh():
    """The chart's values table, README's field tables and Argo CD's ConfigMap come from their sources."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(CHART.parent.parent / "scripts" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
