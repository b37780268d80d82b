"""GPU memory, FLOPs and time a FineTune needs, before anything is loaded.

Pure Python (no torch): the planner refuses a spec that cannot fit, with these numbers, and
the runtime repeats the check with the model's real config and the GPU it got. The figures
are estimates (within ~5-15% of what PyTorch's allocator peaks at for Llama-shaped models):
the point is to refuse the clearly impossible before a Job waits hours for eight H100s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

GIB = 1024 ** 3
# Dense bf16 peak of the H100 SXM, and the share of it a well-fed training step reaches.
# The benchmarks in benchmarks/RESULTS.md measure the real share (MFU) on the GPU machine.
PEAK_FLOPS = 989e12
ASSUMED_MFU = {"full": 0.40, "lora": 0.35, "qlora": 0.25}
CUDA_OVERHEAD_BYTES = 1.0 * GIB  # context, cuBLAS workspaces
FRAGMENTATION = 1.05  # allocator slack on top of live tensors

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only transformer's config."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False
    scores: bool = False  # a reward model: its output layer gives one score, not the vocabulary's logits

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.module_dims().values())

    @property
    def outputs(self) -> int:
        """Width of the output layer: the vocabulary's logits, or a reward model's one score."""
        return 1 if self.scores else self.vocab

    @property
    def embedding_params(self) -> int:
        """Input embeddings and output layer (a reward model's score layer is never tied)."""
        return self.vocab * self.hidden + (0 if self.tied_embeddings and not self.scores else self.outputs * self.hidden)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + self.embedding_params + norms


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """A ModelShape from a Hugging Face config.json (Llama, Mistral, Qwen2, SmolLM and kin)."""
    text = config.get("text_config") or config
    try:
        heads = int(text["num_attention_heads"])
        return ModelShape(hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
                          intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]),
                          heads=heads, kv_heads=int(text.get("num_key_value_heads") or heads),
                          tied_embeddings=bool(text.get("tie_word_embeddings", False)),
                          scores=any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or ()))
    except KeyError as exc:
        raise ValueError(f"model config has no {exc.args[0]}: not a decoder-only transformer this estimate knows") from None


# Shapes of models people fine-tune most, so `llmfactory plan` can check a hub id offline.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "meta-llama/meta-llama-3-8b": ModelShape(4096, 32, 14336, 128256, 32, 8),
    "meta-llama/meta-llama-3-8b-instruct": ModelShape(4096, 32, 14336, 128256, 32, 8),
    "meta-llama/llama-3.1-8b": ModelShape(4096, 32, 14336, 128256, 32, 8),
    "meta-llama/llama-3.1-8b-instruct": ModelShape(4096, 32, 14336, 128256, 32, 8),
    "meta-llama/meta-llama-3-70b": ModelShape(8192, 80, 28672, 128256, 64, 8),
    "meta-llama/llama-3.1-70b-instruct": ModelShape(8192, 80, 28672, 128256, 64, 8),
    "meta-llama/llama-3.2-1b": ModelShape(2048, 16, 8192, 128256, 32, 8, True),
    "meta-llama/llama-3.2-3b": ModelShape(3072, 28, 8192, 128256, 24, 8, True),
    "mistralai/mistral-7b-v0.1": ModelShape(4096, 32, 14336, 32000, 32, 8),
    "mistralai/mistral-7b-instruct-v0.3": ModelShape(4096, 32, 14336, 32768, 32, 8),
    "qwen/qwen2-7b": ModelShape(3584, 28, 18944, 152064, 28, 4),
    "qwen/qwen2.5-7b-instruct": ModelShape(3584, 28, 18944, 152064, 28, 4),
    "huggingfacetb/smollm2-135m-instruct": ModelShape(576, 30, 1536, 49152, 9, 3, True),
    "huggingfacetb/smollm2-1.7b-instruct": ModelShape(2048, 24, 8192, 49152, 32, 32, True),
}


@dataclass(frozen=True)
class Plan:
    """What the estimate is of: one FineTune spec on a given number of GPUs."""

    method: str  # lora | qlora | full
    micro_batch: int
    seq_len: int
    gpus: int  # processes in total (GPUs per node x nodes)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    lora_dora: bool = False
    gradient_checkpointing: bool = False
    weight_bytes: int = 2  # bf16 / fp16; 4 for fp32
    moment_bytes: int = 8  # Adam's two moments a trainable parameter: fp32, or 8-bit (hyperparameters.optimizer)
    strategy: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 0
    offload: bool = False
    fused_loss: bool = False  # Liger's fused linear + cross-entropy computes the SFT loss (fusedKernels)
    reward_model: bool = False  # objective reward: the output layer replaced by one score (ModelShape.scores)
    # Embedding rows an adapter trains beside itself: chat markers the base's vocabulary lacked
    # (model_setup._token_rows); only the runtime, which has the tokenizer, knows them.
    new_token_rows: int = 0
    train_embeddings: bool = False  # lora.trainEmbeddings: the input embeddings and output layer trained whole
    vllm_sampler: bool = False  # GRPO's answers sampled by a vLLM server beside the process (grpo.engine vllm)


@dataclass(frozen=True)
class Estimate:
    params: int
    trainable_params: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float  # per GPU
    flops_per_token: float
    seconds_per_million_tokens: float  # on H100s at the assumed MFU
    graders_gib: float = 0.0  # GRPO's grader models (judgeModel, rewardModel), beside the model on every GPU
    sampler_gib: float = 0.0  # GRPO's vLLM sampler (grpo.engine vllm), its own process on every GPU

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        graders = f", grader models {self.graders_gib:.1f}" if self.graders_gib else ""
        graders += f", vLLM sampler {self.sampler_gib:.1f}" if self.sampler_gib else ""
        return (f"~{self.total_gib:.1f} GiB per GPU (weights {self.weights_gib:.1f}, gradients {self.gradients_gib:.1f}, "
                f"optimizer {self.optimizer_gib:.1f}, activations {self.activations_gib:.1f}{graders}); "
                f"{self.params / 1e9:.2f}B params, {self.trainable_params / 1e6:.2f}M trainable; "
                f"{self.flops_per_token / 1e9:.1f} GFLOP/token, ~{self.seconds_per_million_tokens:.0f} s per 1M tokens")


def adapted_dims(shape: ModelShape, plan: Plan) -> list[tuple[int, int]]:
    """(in, out) features of the linear layers one decoder block adapts."""
    dims = shape.module_dims()
    targets = LINEAR_MODULES if "all-linear" in plan.lora_targets else [t for t in plan.lora_targets if t in dims]
    return [dims[t] for t in targets]


def trainable_params(shape: ModelShape, plan: Plan) -> int:
    if plan.method == "full":
        return shape.params
    adapted = adapted_dims(shape, plan)
    magnitudes = sum(out for _, out in adapted) if plan.lora_dora else 0  # DoRA's per-output magnitude
    wrapped = 1 if shape.tied_embeddings or shape.scores else 2  # the input embeddings, and an untied output layer
    rows = shape.vocab if plan.train_embeddings else plan.new_token_rows  # whole matrices, or the new rows alone
    return shape.layers * (sum(plan.lora_r * (i + o) for i, o in adapted) + magnitudes) + wrapped * rows * shape.hidden


def estimate(shape: ModelShape, plan: Plan, graders: tuple[tuple[ModelShape, str], ...] = ()) -> Estimate:
    """`graders`: (shape, operation) of the models a GRPO grader loads in each process (grader_models)."""
    if plan.reward_model:
        shape = replace(shape, scores=True)
    tokens = plan.micro_batch * plan.seq_len
    world = max(plan.gpus, 1)
    trainable = trainable_params(shape, plan)
    other = shape.params - shape.linear_params

    # Weights: nf4 packs two weights a byte plus ~3% for block scales (double-quantized).
    if plan.method == "qlora":  # the layers left unquantized (embeddings, norms, head) stay in the training dtype
        weights = shape.linear_params * 0.516 + other * plan.weight_bytes
    else:
        weights = shape.params * plan.weight_bytes
    if plan.zero_stage == 3:
        weights /= world

    # Trainable state, adapters or the whole model: weights in the training dtype, Adam's moments in
    # fp32 (or 8 bits) and, for 16-bit weights, an fp32 master copy (master_weights.py; DeepSpeed likewise,
    # sharded over the ranks from ZeRO 1 on), whose fp32 gradient plain PyTorch holds at the step.
    master = plan.weight_bytes == 2
    grads = trainable * (4 if master and plan.strategy != "deepspeed" else plan.weight_bytes)
    optim = trainable * ((4 if master else 0) + plan.moment_bytes)
    if plan.method != "full":
        weights += trainable * plan.weight_bytes
    if plan.zero_stage >= 2:
        grads /= world
    if plan.zero_stage >= 1:
        optim /= world
    if plan.offload:
        optim = 0.0

    # Activations kept for backward, bytes per token per layer, as autograd keeps them in a Llama
    # block (counted with saved-tensor hooks: tests/runtime/test_finetune.py): each RMSNorm's fp32
    # input (8h for two); SDPA's q, k, v and output, k and v repeated to every head where a mask is
    # given, as packing's is (8h), and its own copy of that seq x seq mask in bf16 (2 x seq); the
    # input of the q/k/v and of the gate/up projections, once each, which their adapters' A
    # matrices keep (4h), and each A's output (2r); the MLP's gate, SiLU, up and product (8 x
    # intermediate). A full fine-tune also keeps each norm's bf16 output for its weight's gradient
    # (4h). LoRA dropout gives each adapted layer its own dropped-out input and a mask of a byte an
    # element (a GPU's; a CPU's take 2) in place of the shared inputs. Checkpointing keeps each
    # layer's input and recomputes one layer at a time. The loss peaks as backward starts: the fp32
    # logits' log-softmax, its gradient and its input's (12 bytes a logit). Liger's fused linear +
    # cross-entropy (fusedKernels, SFT) never holds them whole: it keeps the gradient of its input
    # (2h bytes a token) and, for a moment, one chunk's logits, sized to about as much again (up to
    # twice that, rounded up to a power of two); its fused norms, SwiGLU and RoPE keep less than
    # counted here (not credited). QLoRA keeps what LoRA keeps: its unquantized layers run in the
    # training dtype and a frozen 4-bit layer saves nothing of its own. On one H200 (2026-12-04,
    # benchmarks/RESULTS.md: Llama-3-8B, 2 x 2048 tokens, no dropout) LoRA and QLoRA both peaked
    # 30.3 GiB above their weights and trainable state; this count says 30.4.
    h, inter = shape.hidden, shape.intermediate
    per_layer = 20 * h + 8 * inter + 2 * plan.seq_len
    if plan.method == "full":
        per_layer += 4 * h
    else:
        per_layer += 2 * plan.lora_r * len(adapted_dims(shape, plan))
        if plan.lora_dropout > 0:
            per_layer += 14 * h + inter
    dora_per_token, dora_fixed = _dora_activations(shape, plan)
    per_layer += dora_per_token
    if plan.gradient_checkpointing:
        layer_bytes, fixed = shape.layers * 2 * h + per_layer, dora_fixed
    else:
        layer_bytes, fixed = shape.layers * per_layer, shape.layers * dora_fixed
    loss_bytes = 6 * h if plan.fused_loss else 12 * shape.outputs
    activations = tokens * (layer_bytes + loss_bytes) + fixed + dora_transient(shape, plan)
    if plan.new_token_rows and plan.method != "full" and not plan.train_embeddings:
        # peft's trainable tokens write their rows into a copy of the whole matrix each forward: the
        # output layer's copy is kept for backward, which makes its whole gradient as well, at the
        # peak where the logits' are (the input embeddings' copy and gradient come and go when
        # little else is held). Counted from the code, not measured.
        activations += 2 * (shape.vocab if not shape.scores else 1) * h * plan.weight_bytes

    graded = sum(grader_bytes(grader, plan.seq_len, operation) for grader, operation in graders)
    sampler = vllm_sampler_bytes(shape, plan) if plan.vllm_sampler else 0.0  # vLLM allocates it all up front
    total = (weights + grads + optim + activations + graded) * FRAGMENTATION + CUDA_OVERHEAD_BYTES + sampler

    # FLOPs per token: forward = 2 x (matmul params) + causal attention; backward twice that for a
    # full fine-tune, once for adapters (input gradients only); checkpointing repeats the forward.
    matmul = shape.linear_params + shape.outputs * shape.hidden
    forward = 2 * matmul + 2 * shape.layers * plan.seq_len * shape.hidden
    backward = 2 * forward if plan.method == "full" else forward
    if plan.train_embeddings and plan.method != "full":  # the output layer's weight gradient
        backward += 2 * shape.outputs * shape.hidden
    if plan.lora_dora and plan.lora_dropout > 0:  # each adapted layer runs again on the dropped-out input
        adapted = 2 * shape.layers * sum(i * o for i, o in adapted_dims(shape, plan))
        forward, backward = forward + adapted, backward + adapted
    flops = forward + backward + (forward if plan.gradient_checkpointing else 0)
    seconds = 1e6 * flops / (world * PEAK_FLOPS * ASSUMED_MFU[plan.method])
    return Estimate(params=shape.params, trainable_params=trainable, weights_gib=weights / GIB, gradients_gib=grads / GIB,
                    optimizer_gib=optim / GIB, activations_gib=activations / GIB, total_gib=total / GIB,
                    flops_per_token=float(flops), seconds_per_million_tokens=seconds, graders_gib=graded / GIB,
                    sampler_gib=sampler / GIB)


# What vLLM holds beyond its weights and KV cache: its CUDA context, the profiling forward's activations
# (up to max-num-batched-tokens), CUDA graphs and the sampler's logits. An allowance, not measured.
VLLM_OVERHEAD_BYTES = 2.0 * GIB


def vllm_sampler_bytes(shape: ModelShape, plan: Plan) -> float:
    """What GRPO's vLLM sampler (grpo.engine vllm) is given of the GPU: the base model in 16 bits (for
    qlora too: vLLM serves it unquantized; a full fine-tune's weights reloaded into it), one LoRA slot
    of the adapter's rank (none for a full fine-tune), a KV cache for a micro-batch's answers
    (batchSize x generations sequences of maxSeqLength) and VLLM_OVERHEAD_BYTES."""
    weights = shape.params * 2
    # Not trainable_params: vLLM's LoRA slot holds every linear layer it supports, whatever the adapter targets.
    adapter = 0 if plan.method == "full" else shape.layers * sum(plan.lora_r * (i + o)
                                                                 for i, o in shape.module_dims().values()) * 2
    cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * plan.micro_batch * plan.seq_len
    return weights + adapter + cache + VLLM_OVERHEAD_BYTES


def gpu_memory_utilization(est: Estimate, gpu_gib: float) -> float:
    """vLLM's --gpu-memory-utilization for the sampler's share (est.sampler_gib) of a GPU of gpu_gib:
    the fraction of the whole GPU it may take, weights included, rounded up to a hundredth."""
    return min(math.ceil(100 * est.sampler_gib / gpu_gib) / 100, 0.95)


JUDGE_PROMPT_TOKENS = 512  # the grading instructions and the reference, beside the question and answer
REWARD_MODEL_BATCH = 8  # answers a reward model grader scores in one pass (reward_model.scores)
EMBEDDING_BATCH = 32  # texts a local embedding model embeds in one pass (embedding_similarity.Encoder)


def grader_bytes(grader: ModelShape, seq_len: int, operation: str) -> float:
    """A grader's model in bf16 (models.compute_dtype on a GPU) and what one score holds: one layer's
    MLP at a time over the prompt and answer (up to maxSeqLength), and for a local judge (operation
    judge, or label) the KV cache of its prompt, with its instructions and the reference, repeated for each of
    the ten ratings it scores (benchmark/judge.py); the logits of the last position only. A reward
    model (rewardModel) reads REWARD_MODEL_BATCH conversations at once, without a cache, and has a
    score layer for a head; an embedding model (similarity) EMBEDDING_BATCH texts."""
    judge = operation in ("judge", "label")  # at most ten labels: no more than the ratings' copies
    if operation == "rewardModel":
        grader = replace(grader, scores=True)
    batch = EMBEDDING_BATCH if operation == "similarity" else REWARD_MODEL_BATCH
    tokens = seq_len + JUDGE_PROMPT_TOKENS if judge else seq_len * batch
    cache = 2 * grader.layers * grader.kv_heads * grader.head_dim * tokens * 2
    return grader.params * 2 + (11 * cache if judge else 0) + tokens * (3 * grader.intermediate + 4 * grader.hidden) * 2


def _dora_activations(shape: ModelShape, plan: Plan) -> tuple[float, float]:
    """What DoRA (peft's) keeps for backward beyond LoRA, per decoder layer: (bytes per token, bytes).
    Per adapted layer and token, the base layer's output (for the magnitude's gradient) and the
    adapter's, in the training dtype (adapters run in it: model_setup._train_in). Without dropout
    the base output is the layer's own; with it, peft runs the layer again on the dropped-out input,
    with the base weight itself, or for QLoRA with a dequantized copy of it, kept for backward.
    Checked against autograd's saved tensors (tests/runtime/test_finetune.py)."""
    if plan.method == "full" or not plan.lora_dora:
        return 0.0, 0.0
    adapted = adapted_dims(shape, plan)
    per_token = 2 * plan.weight_bytes * sum(o for _, o in adapted)
    copies = plan.weight_bytes * sum(i * o for i, o in adapted) if plan.lora_dropout > 0 and plan.method == "qlora" else 0
    return per_token, copies


def dora_transient(shape: ModelShape, plan: Plan) -> float:
    """The most DoRA holds for a moment in one layer's forward: peft builds the adapter's weight by
    passing an identity the size of the input through it, then the weight (for QLoRA dequantized)
    plus it for the norm; all in the training dtype."""
    if plan.method == "full" or not plan.lora_dora:
        return 0.0
    return max(plan.weight_bytes * (i * i + 3 * i * o) for i, o in adapted_dims(shape, plan))


def plan_of(spec: dict[str, Any]) -> Plan:
    """The Plan of a FineTune spec as it appears in a task document (camelCase, defaults filled)."""
    hp, res = spec["hyperparameters"], spec.get("resources") or {}
    dist = spec.get("distribution") or {}
    lora = spec.get("lora") or {}
    deepspeed = dist.get("strategy") == "deepspeed"
    objective = spec.get("objective", "sft")
    pair = 2 if objective == "dpo" else 1  # a DPO row holds a pair's two conversations
    # A GRPO micro-batch trains each of its prompts' sampled answers, one sequence each; a reward
    # model's, each of its pairs' two conversations, one row each.
    answers = (spec.get("grpo") or {}).get("generations", 8) if objective == "grpo" else 2 if objective == "reward" else 1
    return Plan(method=spec["method"], micro_batch=hp["batchSize"] * answers, seq_len=pair * hp["maxSeqLength"],
                gpus=max(res.get("gpusPerNode", 1), 1) * res.get("nodes", 1),
                lora_r=lora.get("r", 16), lora_targets=tuple(lora.get("targetModules") or ("all-linear",)),
                lora_dropout=lora.get("dropout", 0.05), lora_dora=lora.get("dora", False),
                train_embeddings=bool(lora.get("trainEmbeddings")),
                gradient_checkpointing=hp.get("gradientCheckpointing", False),
                weight_bytes=4 if hp.get("precision") == "fp32" else 2,
                moment_bytes=2 if hp.get("optimizer") == "adamw8bit" else 8,
                strategy=dist.get("strategy", "ddp"), zero_stage=(dist.get("zeroStage") or 0) if deepspeed else 0,
                offload=deepspeed and dist.get("offload") == "cpu",
                # DPO takes the log-probabilities from the logits itself: Liger's fused loss is SFT's only.
                fused_loss=bool(hp.get("fusedKernels")) and objective == "sft", reward_model=objective == "reward",
                vllm_sampler=objective == "grpo" and (spec.get("grpo") or {}).get("engine") == "vllm")


def does_not_fit(est: Estimate, gpu_gib: float, plan: Plan) -> str | None:
    """None when the estimate fits a GPU of gpu_gib, else a sentence with the numbers and what to change."""
    if est.total_gib <= gpu_gib:
        return None
    dropout = ""
    if plan.method != "full" and plan.lora_dropout > 0:
        copies = " and, QLoRA's DoRA, a dequantized copy of its weight" if plan.lora_dora and plan.method == "qlora" else ""
        dropout = f"set lora.dropout 0 (with dropout each adapted layer keeps its own dropped-out input{copies}), "
    graders = ("use a smaller grader model (or serve a judge with vLLM behind grader.judge instead of judgeModel), "
               if est.graders_gib else "")
    graders += "set grpo.engine transformers (no vLLM beside the training), " if est.sampler_gib else ""
    moments = ("set hyperparameters.optimizer adamw8bit (Adam's moments in 8 bits), "
               if plan.method == "full" and plan.moment_bytes > 2 and plan.strategy != "deepspeed" else "")
    return (f"needs {est.summary()}, more than the {gpu_gib:g} GiB a GPU has; {dropout}{graders}{moments}lower "
            f"hyperparameters.batchSize or maxSeqLength, set hyperparameters.gradientCheckpointing, use method qlora, "
            f"or shard with distribution.strategy deepspeed (zeroStage 3) over more GPUs")


def as_dequantized(plan: Plan) -> Plan:
    """A QLoRA plan with its 4-bit weights dequantized once (spec.qlora.dequantizeOnce): LoRA's memory."""
    return replace(plan, method="lora")


def dequantized_does_not_fit(as_lora: Estimate, gpu_gib: float) -> str | None:
    """None when QLoRA dequantized once fits a GPU of gpu_gib, else what spec.qlora.dequantizeOnce: always
    needs and what to set instead."""
    if as_lora.total_gib <= gpu_gib:
        return None
    return f"always needs {as_lora.summary()}, more than the {gpu_gib:g} GiB a GPU has; set it to auto or never"
