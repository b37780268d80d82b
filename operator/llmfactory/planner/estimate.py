"""The planner's memory check for a FineTune: the model's shape from what can be read offline
(a known hub id, a local config.json or GGUF header), the runtime's estimate, a refusal with numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from llmfactory_runtime.finetune.estimate import (KNOWN_SHAPES, Estimate, ModelShape, as_dequantized,
                                                   dequantized_does_not_fit, does_not_fit, estimate, plan_of,
                                                   shape_from_config)
from llmfactory_runtime.grader import grader_models

from ..api.common import ModelSource, operational_fields
from .errors import PlanError
from .gguf_header import read_header
from .manifests import Resource
from .promise import PromiseLookup, Unknown


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "package":
        spec = importlib.util.find_spec(parsed.netloc)
        if spec and spec.origin:
            return Path(spec.origin).parent / parsed.path.lstrip("/")
    return None  # s3:// is read by the runtime, which repeats the check with the real config


def _gguf_shape(path: Path) -> ModelShape | None:
    header = read_header(path)
    if header is None:
        return None
    arch = header.values.get("general.architecture")
    keys = {"hidden_size": f"{arch}.embedding_length", "num_hidden_layers": f"{arch}.block_count",
            "intermediate_size": f"{arch}.feed_forward_length", "num_attention_heads": f"{arch}.attention.head_count",
            "num_key_value_heads": f"{arch}.attention.head_count_kv"}
    config = {name: header.values[key] for name, key in keys.items() if key in header.values}
    if "tokenizer.ggml.tokens" in header.lengths:
        config["vocab_size"] = header.lengths["tokenizer.ggml.tokens"]
    config["tie_word_embeddings"] = "output.weight" not in header.tensors
    return shape_from_config(config)


def _model_files(source) -> Path | None:
    """The local GGUF file or folder of a source, where the planner can read it."""
    path = _local_path(source.uri or "")
    if path is not None and source.gguf_file:
        path = path / source.gguf_file
    return path


def model_shape(source) -> ModelShape | None:
    """The base model's shape, or None when it cannot be known without downloading it."""
    if source.huggingface:
        return KNOWN_SHAPES.get(source.huggingface.lower())
    path = _model_files(source)
    if path is None:
        return None
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_shape(path)
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()))
    return None


# Architectures whose decoder layers name their linear layers as Llama's do (the estimate's module_dims):
# config.json's model_type, a GGUF file's general.architecture. The hub ids the estimate knows are all such.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
LLAMA_LAYERS = (*ModelShape(1, 1, 1, 1, 1, 1).module_dims(), "lm_head")


def _llama_layout(source) -> str | None:
    """The architecture of a base model of Llama's layout, as read offline; None when it is another or
    unknown (the runtime checks its targets on the model's own skeleton)."""
    if source.huggingface:
        return "llama" if source.huggingface.lower() in KNOWN_SHAPES else None
    path = _model_files(source)
    if path is None:
        return None
    if path.suffix == ".gguf" and path.is_file():
        header = read_header(path)  # a file that is not GGUF: check_fits refused it
        kind = header.values.get("general.architecture") if header else None
    elif (path / "config.json").is_file():
        kind = json.loads((path / "config.json").read_text()).get("model_type")
    else:
        return None
    return kind if kind in LLAMA_LAYOUT else None


def check_targets(res: Resource, base=None) -> None:
    """lora.targetModules against the linear layers of a base model of Llama's layout, when the planner
    can read which it is: a typo is refused when the FineTune is applied, not in its Job once what it
    waits for has run. A target matches a layer by its name or its dotted end, as peft's do; embed_tokens
    is a layer peft adapts too, and a reward model's score layer (objective reward). `base`: the model
    whose layers the base has (shape_source), unset: the spec's baseModel."""
    lora = res.spec.lora
    targets = lora.target_modules if lora and res.spec.method != "full" else ["all-linear"]
    if targets == ["all-linear"]:
        return
    layers = (*LLAMA_LAYERS, "embed_tokens", *(["score"] if res.spec.objective == "reward" else []))
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in layers]
    kind = _llama_layout(base or res.spec.base_model) if unknown else None
    if kind:
        raise PlanError(res.ref, "spec.lora.targetModules", f"no module of the base model (a {kind} model) is named "
                        f"{', '.join(unknown)}; its linear layers are {', '.join(sorted(LLAMA_LAYERS))} (or give "
                        "all-linear)")


def shape_source(res: Resource, trained: dict[str, Any] | None = None,
                 promise_of: PromiseLookup | None = None) -> Any:
    """The model whose shape a FineTune's base has: its baseModel, or for a FineTune's model (fineTuneRef)
    the base the first FineTune of the chain trained from (SFT, then DPO, then GRPO), as their specs
    promise it (`promise_of`), or else the base the one it names trained from, as its result or promise
    (`trained`) says, where that is a source the planner can read (a model trained from another
    FineTune's is named by a URI only its run knows); None when it cannot be read."""
    if res.spec.base_model.fine_tune_ref is None:
        return res.spec.base_model
    try:
        base = _first_base(res, promise_of) if promise_of else None
        base = base or (trained["baseModel"] if trained is not None else None)
        return ModelSource.model_validate(base) if isinstance(base, dict) else None
    except (Unknown, ValidationError):  # a promise that names no base; a pending URI
        return None


def _first_base(res: Resource, promise_of: PromiseLookup) -> dict[str, Any] | None:
    """The baseModel of the first FineTune of the chain res trains from, as their specs promise it; None
    where one of them is not known (or they name each other in a circle, which waits forever)."""
    seen, name = {res.name}, res.spec.base_model.fine_tune_ref.name
    while name not in seen:
        seen.add(name)
        promised = promise_of("FineTune", res.namespace, name)
        if "baseFineTune" not in promised:
            return promised["baseModel"]
        name = promised["baseFineTune"]
    return None


def check_fits(res: Resource, base=None) -> Estimate | None:
    """The estimate for a FineTune (None when the model's shape is not known offline); a
    refusal when it cannot fit the GPUs it asks for. `base`: as check_targets'."""
    try:
        shape = model_shape(base or res.spec.base_model)
    except ValueError as exc:
        raise PlanError(res.ref, "spec.baseModel", str(exc)) from None
    if shape is None:
        return None
    spec = {k: v for k, v in res.spec.wire().items() if k not in operational_fields(res.kind)}
    plan, graders = plan_of(spec), _grader_shapes(res, spec)
    est = estimate(shape, plan, graders)
    gpu_gib = res.spec.resources.gpu_memory_gib
    if res.spec.resources.gpus_per_node > 0:
        problem = does_not_fit(est, gpu_gib, plan)
        if problem:
            raise PlanError(res.ref, "spec.resources", problem)
        if res.spec.qlora and res.spec.qlora.dequantize_once == "always":
            problem = dequantized_does_not_fit(estimate(shape, as_dequantized(plan), graders), gpu_gib)
            if problem:
                raise PlanError(res.ref, "spec.qlora.dequantizeOnce", problem)
    return est


def _grader_shapes(res: Resource, spec: dict) -> tuple[tuple[ModelShape, str], ...]:
    """(shape, operation) of the models a GRPO grader loads that can be known offline (the runtime
    counts the others)."""
    found = []
    for source, operation in grader_models(spec["grpo"]["grader"] if spec.get("objective") == "grpo" else None):
        if "fineTuneRef" in source:  # a model not trained yet: the runtime counts it
            continue
        try:
            shape = model_shape(ModelSource.model_validate(source))
        except ValueError as exc:
            raise PlanError(res.ref, "spec.grpo.grader", f"{source}: {exc}") from None
        if shape:
            found.append((shape, operation))
    return tuple(found)
