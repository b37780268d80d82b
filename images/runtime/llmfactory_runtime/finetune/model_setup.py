"""The model a FineTune trains: loaded in the training dtype, 4-bit for QLoRA, with adapters."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from ..chat import marker_ids
from ..models import load_config, load_model, load_tokenizer, locate, start_rows, untrained_rows
from ..task import InvalidTask
from .distributed import World, node_first
from .estimate import GIB, Estimate, ModelShape, Plan, as_dequantized, dequantized_does_not_fit, estimate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it, else fp16 on GPUs, fp32 on CPU; or what the spec says."""
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        # Without emulation: torch counts bf16 as supported on a V100 or T4, where it is emulated and slow.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def dequantize_once(setting: str, as_lora: Estimate, gpu_gib: tuple[float, float] | None) -> bool:
    """Whether QLoRA trains against its 4-bit weights dequantized once (spec.qlora.dequantizeOnce).
    as_lora: the memory estimate with the weights in the training dtype; gpu_gib: (total, free) on
    the GPU, None on CPU. auto asks for free memory, not total, so a GPU shared with another
    process keeps the 4-bit weights."""
    if setting == "never" or (setting == "auto" and gpu_gib is None):
        return False
    if gpu_gib is None:
        return True
    total, free = gpu_gib
    if setting == "auto":
        return as_lora.total_gib <= free
    problem = dequantized_does_not_fit(as_lora, total)
    if problem:
        raise InvalidTask(f"spec.qlora.dequantizeOnce: {problem}")
    return True


def gpu_memory_gib(device: torch.device) -> tuple[float, float] | None:
    """(total, free) GiB of a CUDA device; None on CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total / GIB, free / GIB


def qlora_dequantized(spec: dict[str, Any], shape: ModelShape, plan: Plan, gpu_gib: tuple[float, float] | None,
                      graders: tuple[tuple[ModelShape, str], ...] = ()) -> Estimate | None:
    """For a QLoRA run that dequantizes its weights once, the (LoRA-sized) estimate it trains under;
    None when it keeps them 4-bit or is no QLoRA run."""
    if spec["method"] != "qlora":
        return None
    as_lora = estimate(shape, as_dequantized(plan), graders)
    return as_lora if dequantize_once(spec["qlora"].get("dequantizeOnce", "never"), as_lora, gpu_gib) else None


def head_of(spec: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
    """load_model's arguments for the model's head: none for a language model; for a reward model
    (objective reward), transformers' sequence-classification model with one label, whose new score
    layer replaces the output layer. It reads each row's score at its last token that is not
    padding, as every user of the saved model will (hence pad_token_id in its config)."""
    if spec.get("objective") != "reward":
        return {}
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    return {"auto_class": AutoModelForSequenceClassification, "num_labels": 1, "pad_token_id": pad_token_id}


def load_for_training(spec: dict[str, Any], base: dict[str, Any], world: World, dtype: torch.dtype,
                      dequantize: bool = False, head: dict[str, Any] | None = None, tokenizer=None,
                      added_tokens: Sequence[int] = ()):
    """The model to train: base weights (4-bit for qlora, dequantized once if `dequantize`) with
    `head` (head_of), rows for every token of `tokenizer` (the run's, with `added_tokens` beyond the
    base's as models.tokenizer_for gives them; the base's own unless given), gradient checkpointing,
    adapters."""
    method, hp = spec["method"], spec["hyperparameters"]
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", **(head or {})}
    if method == "qlora":
        try:
            from transformers import BitsAndBytesConfig  # noqa: PLC0415
            import bitsandbytes  # noqa: F401, PLC0415
        except ImportError:
            raise InvalidTask("spec.method qlora needs bitsandbytes, which this runtime image lacks") from None
        q = spec["qlora"]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["quantType"], bnb_4bit_use_double_quant=q["doubleQuantization"],
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": world.device}
    checkpoint_rows = load_config(base).get_text_config().vocab_size
    tokenizer = tokenizer or load_tokenizer(base)
    # A GGUF base is dequantized and kept as safetensors in the node's cache by one process, read there by the
    # others: not dequantized in each (an 8B's 16 GB of bf16 in memory and on disk per process).
    with node_first(world, locate(base)[1] is not None):
        model = load_model(base, dtype=dtype, to=world.device, tokenizer=tokenizer, **kwargs)
    # Rows of chat markers the base never trained: the ones added for it (grown by load_model, or in a
    # padded vocabulary's spare rows) and the template's own where they are still zeros (Llama-3.1-8B
    # base's <|eot_id|>; not the padding token's, zero by design: nn.Embedding's padding_idx keeps it
    # so). Each starts as the mean of the trained rows, and an adapter trains them too, or the model
    # could never learn to end its turn.
    markers = [i for i in marker_ids(tokenizer) if i != tokenizer.pad_token_id]
    new_rows = sorted({*added_tokens, *range(checkpoint_rows, model.get_input_embeddings().num_embeddings),
                       *untrained_rows(model, markers)})
    start_rows(model, new_rows)
    if method == "qlora":
        _keep_the_trainable_4bit_layout(model)
    if dequantize:
        # Each 4-bit Linear becomes a plain one holding bitsandbytes' own dequantization of its
        # weights: the very values its forward and backward would compute every time.
        model = model.dequantize(dtype=dtype)
    model.config.use_cache = False  # no KV cache in training; packed batches need it off
    if hp.get("fusedKernels"):
        _fuse(model, world, language_model=not head)
    if hp.get("neftuneNoiseAlpha"):  # HF Trainer's own hook; it adds noise only while the model trains
        from transformers.integrations.neftune import neftune_post_forward_hook  # noqa: PLC0415
        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = hp["neftuneNoiseAlpha"]
        embeddings.register_forward_hook(neftune_post_forward_hook)

    # QLoRA is prepared exactly as LoRA: peft's prepare_model_for_kbit_training is not used because
    # it casts every unquantized weight to fp32, and with it the embeddings' output (so the whole
    # residual stream) and the head: on Llama-3-8B that is 2 GiB more weights and the 128k-vocab
    # head's matmuls in fp32, a fraction of bf16's speed. Axolotl casts them back for the same reason.
    # (Its other step, input gradients for reentrant checkpointing, is moot with use_reentrant=False.)
    if hp["gradientCheckpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415
        lora = spec["lora"]
        targets = lora["targetModules"]  # each a module of the model's: check_targets, before loading
        # SEQ_CLS: peft trains the reward model's new score layer whole beside the adapters (modules_to_save).
        # trainEmbeddings: the embeddings and output layer whole, the new rows with them.
        whole = _embedding_layers(model, tied_too=True) if lora.get("trainEmbeddings") else None
        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                            task_type="SEQ_CLS" if head else "CAUSAL_LM",
                            target_modules="all-linear" if targets == ["all-linear"] else targets,
                            use_rslora=lora.get("rsLora", False), use_dora=lora.get("dora", False),
                            trainable_token_indices=None if whole else _token_rows(model, new_rows),
                            modules_to_save=whole, ensure_weight_tying=bool(whole))
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. a target module the architecture does not have
            raise InvalidTask(f"spec.lora.targetModules: {exc}") from None
        _train_in(model, dtype)
    if hp.get("compile"):
        _compile_layers(model)
    model.train()
    return model


def check_targets(spec: dict[str, Any], config) -> None:
    """lora.targetModules against the model's skeleton, built from its config (load_config) on the meta
    device (no weights; a second for an 8B): a name it lacks is refused before the weights are read,
    which takes minutes for an 8B (and a download from the hub)."""
    targets = (spec.get("lora") or {}).get("targetModules") or ["all-linear"]
    if spec["method"] == "full" or targets == ["all-linear"]:
        return
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    head, config = head_of(spec, None), copy.deepcopy(config)  # the caller's is left as it was
    config.num_labels = head.get("num_labels", config.num_labels)
    with torch.device("meta"):
        skeleton = head.get("auto_class", AutoModelForCausalLM).from_config(config)
    refuse_unmatched_targets(skeleton, targets)


def refuse_unmatched_targets(model, targets: list[str]) -> None:
    """A target module no module of the model is named by (peft matches a name or its dotted end):
    peft adapts the others and says nothing, so a typo (gate_prj) would train less than asked."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415 - GPT-2's linear layers

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, Conv1D))})
        raise InvalidTask(f"spec.lora.targetModules: no module of the model is named {', '.join(unmatched)}; its "
                          f"linear layers are {', '.join(linear)} (or give all-linear)")


def parameter_groups(model, named: list, stepped: list, spec: dict) -> list[dict]:
    """The optimizer's parameter groups: `stepped` (what it updates: the trainable parameters `named`
    or their master copies, in that order) at hyperparameters.learningRate, but LoRA+'s B matrices
    and DoRA's magnitudes (peft's create_loraplus_optimizer: lora_B and 1-d weights) at
    lora.loraPlusRatio times it, and the matrices lora.trainEmbeddings trains whole at
    lora.embeddingLearningRate, where these are set. Weight decay spares 1-d weights (norms,
    biases, DoRA's magnitudes), as HF Trainer's and nanoGPT's: decayed, a norm's gain would shrink
    towards 0, not towards the 1 it starts at. The group at the learning rate, decayed, comes first."""
    lora, hp = spec.get("lora") or {}, spec["hyperparameters"]
    embedding_rate, ratio = lora.get("embeddingLearningRate"), lora.get("loraPlusRatio")
    layers = [model.get_input_embeddings(), model.get_output_embeddings()] if embedding_rate else []
    whole = {id(p) for layer in layers if hasattr(layer, "modules_to_save") for p in layer.modules_to_save.parameters()}
    rates = [hp["learningRate"], hp["learningRate"] * (ratio or 1), embedding_rate]

    def rate_of(name: str, p) -> int:
        if id(p) in whole:
            return 2
        return 1 if ratio and ("lora_B" in name or p.ndim == 1) else 0

    groups: dict[tuple[int, bool], dict] = {}
    for (name, p), s in zip(named, stepped):
        rate, spared = rate_of(name, p), bool(hp.get("weightDecay")) and p.ndim < 2
        group = groups.setdefault((rate, spared), {"params": [], "lr": rates[rate]})
        if spared:
            group["weight_decay"] = 0.0
        group["params"].append(s)
    return [groups[key] for key in sorted(groups)]


def trained_token_rows(model) -> list[int]:
    """The token rows an adapter trains beside its adapters (load_for_training)."""
    config = getattr(model, "peft_config", {}).get("default")
    indices = getattr(config, "trainable_token_indices", None) or {}
    return sorted({row for rows in indices.values() for row in rows})


def _token_rows(model, rows: list[int]) -> dict[str, list[int]] | None:
    """peft's trainable_token_indices for the new rows: those rows alone of the input embeddings
    and, unless tied to them, of the output layer (its <|im_end|> row is what makes the model end a
    turn); the adapter keeps just these rows, not the whole 128k-row matrices."""
    return {name: rows for name in _embedding_layers(model)} if rows else None


def _embedding_layers(model, tied_too: bool = False) -> list[str]:
    """The names peft knows the input embeddings and, unless tied to them (or tied_too: peft's
    ensure_weight_tying then keeps the two trained copies one), the output layer by (embed_tokens
    and lm_head in Llama's, whatever the architecture calls them)."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    untied = output is not None and (tied_too or output.weight is not embeddings.weight)
    layers = [embeddings] + ([output] if untied else [])
    return [names[id(layer)] for layer in layers]


def _train_in(model, dtype: torch.dtype) -> None:
    """Adapters (and the rows and layers trained beside them) in the training dtype, as the base
    runs. peft keeps them in fp32, so every adapted layer would cast its input up, multiply in fp32
    and cast the product back: on an H200, LoRA on Llama-3-8B spent about a third of its GPU time
    in those casts and fp32 matmuls, and autograd kept the fp32 inputs besides
    (benchmarks/RESULTS.md). Their precision is kept where it matters, as for a 16-bit full
    fine-tune: the optimizer steps fp32 master copies (master_weights.py)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)


def _keep_the_trainable_4bit_layout(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first time the layer
    runs in eval mode without gradients (as every evaluation runs it) and from then on calls that
    kernel, which has no backward: after the first evaluation no gradient would pass through the
    base layers, silently, and a layer whose input size is not a multiple of 64 fails to repack.
    Training keeps the layout autograd knows; on GPUs the flag is never read."""
    import bitsandbytes as bnb  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _compile_layers(model) -> None:
    """torch.compile each decoder layer in place (regional compilation). Every layer runs the same
    code, so one graph serves them all and the compile costs one layer's time; parameter names,
    hence checkpoints and the saved adapter, do not change."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: PLC0415

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise InvalidTask("spec.hyperparameters.compile: transformers does not mark this architecture's decoder "
                          "layers (GradientCheckpointingLayer); set it false")
    for layer in layers:
        layer.compile(dynamic=True)  # packed rows vary in length: one graph for all of them


def _fuse(model, world: World, language_model: bool = True) -> None:
    """Swap in Liger's Triton kernels, module by module (adapters wrap the same Linear layers). A
    reward model keeps its own forward: Liger's fused linear + cross-entropy replaces the model's
    forward with a causal LM's, which reads an output layer a sequence classifier does not have."""
    if world.device.type != "cuda":
        raise InvalidTask("spec.hyperparameters.fusedKernels needs a CUDA GPU (Triton kernels); set it false on CPU")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # noqa: PLC0415
    except ImportError:
        raise InvalidTask("spec.hyperparameters.fusedKernels needs the liger-kernel package, which this runtime "
                          "image lacks") from None
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=language_model)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights training changes (adapters, or everything for a full fine-tune), by name."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
