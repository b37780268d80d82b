"""llmfactory data plane: the workloads that run inside Jobs. Never imports kubernetes.

Importing this package (or its store and progress modules) does not import torch, so the
control plane can share the artifact store without pulling in the training stack.
"""

# Exit codes, part of the contract with the operator's Job podFailurePolicy.
EXIT_OK = 0
EXIT_FAILED = 1  # retryable: a crash, an OOM, a network error
EXIT_INVALID_TASK = 2  # the task itself is wrong: retrying cannot help
EXIT_INTERRUPTED = 3  # stopped by SIGTERM (preemption) with its work saved: a retry resumes, not the work's fault


class Interrupted(Exception):
    """Work stopped by SIGTERM after saving what the next attempt resumes from."""


# Environment variables that carry API keys into the pod (the Job sets them by secretKeyRef).
TEACHER_KEY_ENV = "LLMFACTORY_TEACHER_API_KEY"
JUDGE_KEY_ENV = "LLMFACTORY_JUDGE_API_KEY"
REJECTED_KEY_ENV = "LLMFACTORY_REJECTED_API_KEY"  # a DatasetBuild's preferences.rejected.openai
DIFFICULTY_KEY_ENV = "LLMFACTORY_DIFFICULTY_API_KEY"  # a DatasetBuild's difficulty.openai
GRADER_KEY_ENV = "LLMFACTORY_GRADER_API_KEY"  # a GRPO FineTune's or a Benchmark's reward grader.judge
EMBEDDINGS_KEY_ENV = "LLMFACTORY_EMBEDDINGS_API_KEY"  # their grader.embeddings (metric cosine)

# Credentials a pod's or a laptop's environment may carry: the operator's secretKeyRefs (the keys
# above, the store's, Hugging Face's, the trackers') and what the AWS SDKs find on their own (IRSA,
# EKS Pod Identity, a profile). Code that is not ours to vouch for, such as a python grader running
# what a model wrote, gets an environment without them.
CREDENTIAL_ENV = (
    TEACHER_KEY_ENV, JUDGE_KEY_ENV, REJECTED_KEY_ENV, DIFFICULTY_KEY_ENV, GRADER_KEY_ENV, EMBEDDINGS_KEY_ENV,
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD",
)

# Where a DatasetBuild's spec names OpenAI-compatible endpoints, and the variable each one's key
# reaches the pod in (the operator's job_builder sets them; sharded builds divide their limits).
DATASET_BUILD_ENDPOINTS = (
    (("teacher", "openai"), TEACHER_KEY_ENV),
    (("filters", "judge", "openai"), JUDGE_KEY_ENV),
    (("preferences", "rejected", "openai"), REJECTED_KEY_ENV),
    (("difficulty", "openai"), DIFFICULTY_KEY_ENV),
)


def markdown_cell(text: str, limit: int | None = None) -> str:
    """Text for a Markdown table cell (reports, trackers' tables): cut at limit, quoted on one line, no
    column breaks."""
    import json  # noqa: PLC0415 - this module stays import-light

    return json.dumps(text[:limit], ensure_ascii=False).replace("|", "\\|")


def at_path(spec: dict, path: tuple[str, ...]):
    """spec[path[0]][path[1]]..., or None where a part is unset."""
    node = spec
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


# A GRPO FineTune's, a Benchmark's reward's, a DatasetBuild's difficulty's grader: its judge and
# embeddings endpoints (itself, or each of a sum's parts).
GRADERS = (("grpo", "grader"), ("reward", "grader"), ("difficulty", "grader"))
# Where a FineTune's trackers take their keys from (the libraries read these variables themselves).
TRACKER_KEYS = ((("tracking", "wandb"), "WANDB_API_KEY"), (("tracking", "mlflow"), "MLFLOW_TRACKING_TOKEN"))


def api_keys(spec: dict) -> list[tuple[dict, str, str]]:
    """(what may name an apiKeySecret, the variable its key reaches the pod in, its field) of every
    OpenAI-compatible endpoint and tracker a spec names: what the operator passes keys for (by
    secretKeyRef, never through itself), and what the runtime checks before any work."""
    found = [(at_path(spec, path), name, "spec." + ".".join(path))
             for path, name in ((("judge", "openai"), JUDGE_KEY_ENV), *DATASET_BUILD_ENDPOINTS, *TRACKER_KEYS)]
    for path in GRADERS:
        grader, field = at_path(spec, path), "spec." + ".".join(path)
        parts = [(grader, field)] if grader and not grader.get("parts") else \
            [(part, f"{field}.parts[{i}]") for i, part in enumerate((grader or {}).get("parts") or [])]
        for part, where in parts:
            found += [(part.get("judge"), GRADER_KEY_ENV, f"{where}.judge"),
                      (part.get("embeddings"), EMBEDDINGS_KEY_ENV, f"{where}.embeddings")]
    return [(endpoint, name, field) for endpoint, name, field in found if endpoint]


# Where a Job mounts the ConfigMaps a DatasetBuild reads prompts from (<dir>/<name>/<key>); the
# local runner points this variable at the folder it writes them to.
CONFIG_MAPS_ENV, CONFIG_MAPS_DIR = "LLMFACTORY_CONFIG_MAPS", "/etc/llmfactory/config-maps"
