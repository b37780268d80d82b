"""Operator settings: what a platform team sets once (Helm values), read from LLMFACTORY_* env vars."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, Field, field_validator

from ..api.common import OPERATOR_ENV


class OperatorSettings(BaseModel):
    store_uri: str = Field(description="Artifact store root, e.g. s3://bucket/llmfactory.")
    image: str = Field("ghcr.io/llmfactory/runtime:0.1.0", description="Runtime image of every Job.")
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling the runtime image (a private registry's mirror), in "
                                          "each namespace that runs resources.")
    extra_env: list[dict[str, Any]] = Field(
        default_factory=list, description="Environment variables of every Job's container (corev1.EnvVar: value or "
                                          "valueFrom), e.g. HTTP_PROXY, NCCL_SOCKET_IFNAME.")
    service_account: str | None = Field(None, description="ServiceAccount of the Jobs' pods (e.g. for IRSA).")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph).")
    s3_region: str | None = None
    s3_secret: str | None = Field(
        None, description="Secret (in each resource's namespace) with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
                          "passed to pods by secretKeyRef, never copied.")
    hf_token_secret: str | None = Field(
        None, description="Secret (in each resource's namespace) with key HF_TOKEN, for gated or private Hugging "
                          "Face models and datasets (Llama 3); passed to pods by secretKeyRef.")
    gpu_resource: str = "nvidia.com/gpu"
    default_gpus: dict[str, int] = Field(
        default_factory=lambda: {"DatasetBuild": 1, "FineTune": 1, "Benchmark": 1, "Quantization": 0})
    node_selector: dict[str, str] = Field(default_factory=dict, description="Where GPU Jobs run (the H100 pool).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    shm_size: str = "16Gi"
    backoff_limit: int = 3
    active_deadline_seconds: int | None = 7 * 24 * 3600
    ttl_seconds_after_finished: int | None = 7 * 24 * 3600
    default_queue_name: str | None = Field(None, description="Kueue LocalQueue for resources that name none.")
    termination_grace_seconds: int = Field(
        300, description="Time a FineTune pod gets between SIGTERM (preemption, eviction) and SIGKILL to "
                         "checkpoint to the store.")
    poll_seconds: float = Field(10.0, description="How often running and waiting resources (and finished ones "
                                                  "that read ConfigMaps) are checked.")

    @field_validator("extra_env")
    @classmethod
    def _not_the_operators(cls, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for var in env:
            name = var.get("name") if isinstance(var, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"runtime.extraEnv: each entry is an EnvVar {{name, value or valueFrom}}, got {var!r}")
            if name in OPERATOR_ENV or name.startswith("LLMFACTORY_"):
                raise ValueError(f"runtime.extraEnv: {name} is set by the operator (the store's, the hub's and the "
                                 "API keys' variables, and LLMFACTORY_*): set it through the chart's own values")
        return env

    def limits(self, spec: dict[str, Any]) -> tuple[int, int | None]:
        """(backoffLimit, activeDeadlineSeconds) of a resource's runs: its spec's, else these."""
        backoff, deadline = spec.get("backoffLimit"), spec.get("activeDeadlineSeconds")
        return (self.backoff_limit if backoff is None else backoff,
                self.active_deadline_seconds if deadline is None else deadline)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "OperatorSettings":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(f"LLMFACTORY_{name.upper()}")
            if raw is None:
                continue
            annotation = str(field.annotation)
            values[name] = json.loads(raw) if any(t in annotation for t in ("dict", "list", "int", "float")) else raw
        return cls(**values)
