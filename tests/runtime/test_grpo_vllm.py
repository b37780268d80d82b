"""GRPO's answers sampled by vLLM (grpo.engine vllm): its CPU build serves the base model with the
adapter as each step left it, answers as the training model would, and a resumed run samples what
the uninterrupted run sampled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory_runtime.data import dumps_jsonl
from llmfactory_runtime.batching import collate_sequences, token_logps
from llmfactory_runtime.finetune.grpo import sample, sequences
from llmfactory_runtime.finetune.vllm_sampler import VllmSampler
from llmfactory_runtime.generate import prompt_ids, stop_token_ids
from llmfactory_runtime.store import open_store

from finetune_helpers import PAIRS, finetune_task, run_finetune, write_task
from vllm_helpers import serve_flags
from tests.tiny_model import end_turn_early, make_tiny_llama

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU build serves where no GPU is visible")

QUESTIONS = [q for q, _ in PAIRS[:4]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama vLLM's CPU attention takes (head size 64), whose greedy answer to the first
    question ends its turn after a few tokens."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("policy") / "base", hidden_size=128, heads=2)
    end_turn_early(folder, QUESTIONS[0])
    return folder


def _greedy_as_the_training_model(sampler: VllmSampler, model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """vLLM's greedy answers, checked to be the training model's own (transformers'), and its
    log-probabilities of their tokens the model's (the correction's weight 1)."""
    got, logps = sampler.sample(prompts, 1, 0.0, 8, 64)
    assert got == sample(model, tokenizer, prompts, 1, 0.0, 8, 64, "cpu")
    batch = collate_sequences(sequences(prompts, got, 1), [[k] for k in range(len(prompts))], tokenizer.pad_token_id, True)
    with torch.no_grad():
        own = token_logps(model, batch)
    for k, (prompt, answer) in enumerate(zip(prompts, got)):
        torch.testing.assert_close(torch.tensor(logps[k]), own[k, len(prompt) - 1:len(prompt) - 1 + len(answer)],
                                   atol=1e-4, rtol=0)
    return got


@pytest.mark.extended(reason=(
    "a vLLM start of its own (a minute on 2 cores); test_a_grpo_run_sampling_with_vllm_trains_and_a_resumed_run_"
    "samples_what_it_sampled checks the adapter's sync through a run: vLLM's numbers stay the training model's as "
    "the adapter moves, and the same generator state samples the same answers"))
def test_vllm_samples_with_the_adapter_as_each_step_left_it_and_as_the_training_model_would(base, cpu_vllm):
    """Greedy answers from vLLM after each sync equal the training model's own (transformers), with
    the end-of-turn token where one ended; new adapter weights (an optimizer step) change them. With
    a temperature, torch's generator decides the seeds, so the same generator state samples the
    same answers (a resumed run's), and a prompt's answers differ from one another."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    end = stop_token_ids(tokenizer)
    seen = []
    with VllmSampler({"uri": f"file://{base}"}, tokenizer, lora_rank=4, max_len=64, seed=0, dtype="float32") as sampler:
        for step in (1, 2):
            sampler.sync(model, step)
            seen.append(_greedy_as_the_training_model(sampler, model, tokenizer, prompts))
            with torch.no_grad():  # what the optimizer does between steps
                for name, weight in model.named_parameters():
                    if "lora_B" in name:
                        weight.normal_(0, 0.5)
        # Answers that ended their turn (with it) and one cut at maxNewTokens, alike on both engines.
        assert {(len(a) < 8, a[-1] in end) for a in seen[0]} == {(True, True), (False, False)}
        assert seen[1] != seen[0]
        assert sorted(p.name for p in Path(sampler.server.workdir).iterdir()) == ["policy-2", "tokenizer"]

        torch.manual_seed(3)
        drawn, _ = sampler.sample(prompts, 4, 1.0, 8, 64)
        torch.manual_seed(3)
        assert sampler.sample(prompts, 4, 1.0, 8, 64)[0] == drawn
        assert len(drawn) == 16 and all(len({tuple(a) for a in drawn[i:i + 4]}) > 1 for i in range(0, 16, 4))
        # Prompt and answer fit max_len: an answer with no room left is cut, as transformers cuts it.
        short, short_logps = sampler.sample(prompts[1:2], 2, 1.0, 8, len(prompts[1]) + 3)
        assert [len(a) for a in short] == [len(x) for x in short_logps] == [3, 3]


@pytest.mark.extended(reason=(
    "a vLLM start of its own (a minute on 2 cores); test_a_full_grpo_fine_tune_samples_with_vllm_from_the_weights_each_"
    "step_left checks the same reload through a run: vLLM's numbers stay the training model's as its weights move"))
def test_vllm_samples_with_a_full_fine_tunes_weights_as_each_step_left_them(base, cpu_vllm):
    """method full: the whole model is saved and reloaded into vLLM in place before each step; its
    greedy answers and their log-probabilities are then the training model's own, new weights (an
    optimizer step) change them, and only the last step's weights stay on disk."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    seen = []
    with VllmSampler({"uri": f"file://{base}"}, tokenizer, lora_rank=None, max_len=64, seed=0, dtype="float32") as sampler:
        for step in (1, 2):
            sampler.sync(model, step)
            seen.append(_greedy_as_the_training_model(sampler, model, tokenizer, prompts))
            with torch.no_grad():  # what the optimizer does between steps, to every weight
                for name, weight in model.named_parameters():
                    if "mlp" in name:
                        weight.add_(torch.randn_like(weight) * 0.5)
        assert seen[1] != seen[0]
        assert sorted(p.name for p in Path(sampler.server.workdir).iterdir()) == ["policy-2", "tokenizer"]


def _rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": PAIRS[i % len(PAIRS)][0]}], "answer": "a"} for i in range(n)]


def _task(model: Path, tmp_path: Path, train: int = 8, validation: int = 2, grpo: dict | None = None,
          method: str = "lora", **spec) -> dict:
    """A GRPO FineTune (LoRA, or method full) sampling with vLLM (grpo: more of its settings), its prompts
    written under tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(dumps_jsonl(_rows(train)))
    (data / "validation.jsonl").write_bytes(dumps_jsonl(_rows(validation)))
    adapter = {"lora": {"r": 8, "dropout": 0.0}, "mergeAdapter": False} if method != "full" else {}
    # One GPU asked for, as the planner wants for vLLM; the runtime runs on what it finds (here the CPU build).
    return finetune_task(model, f"file://{data}", f"file://{tmp_path}/store", objective="grpo", method=method,
                         **adapter, resources={"gpusPerNode": 1},
                         grpo={"generations": 4, "maxNewTokens": 8, "engine": "vllm", "grader": {
                             "referenceField": "answer", "operation": "contains"}, **(grpo or {})}, **spec)


def test_a_grpo_run_sampling_with_vllm_trains_and_a_resumed_run_samples_what_it_sampled(base, tmp_path, cpu_vllm):
    """A LoRA GRPO FineTune with grpo.engine vllm runs through the runtime's entrypoint with a
    `vllm serve` beside it (a step's two micro-batches sampled at once); resumed from a checkpoint, it
    samples the same answers (the same rewards at every step) and ends with the same adapter. Its
    importance sampling correction weighs whole answers and masks those vLLM found too unlikely
    (sequence_mask), and off-policy masking measures answers against vLLM's numbers: none, the engines
    agreeing."""
    task = _task(base, tmp_path, grpo={"vllmImportanceSamplingMode": "sequence_mask", "offPolicyMaskThreshold": 0.01},
                 checkpointing={"everySteps": 2, "keepLast": 10},
                 hyperparameters={"epochs": 2, "batchSize": 1, "gradientAccumulation": 2, "learningRate": 0.05})
    path = write_task(task, tmp_path)
    proc = run_finetune(path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting vLLM" in proc.stderr and "[vllm]" in proc.stderr
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    assert result["steps"] == 8
    lines = run.read_bytes("metrics/loss.csv").decode().splitlines()
    rewards = [float(line.split(",")[5]) for line in lines[2:]]
    assert len(rewards) == 8 and len(set(rewards)) > 1  # answers that differ in reward: something to learn from
    # vLLM's log-probabilities of its answers, against the training model's (the correction's weights): fp32 on
    # both sides here, so they agree but for rounding.
    figures = run.read_json("progress.json")["figures"]
    assert 0 <= figures["samplerLogpDiff"] < 1e-3 and figures["samplerMasked"] == 0
    assert figures["offPolicyMasked"] == 0  # off-policy masking, vLLM's numbers the sampling policy's: none is off
    adapter = load_file(Path(result["adapterUri"][7:]) / "adapter_model.safetensors")

    run.delete("COMMITTED")
    for key in run.list("checkpoints"):
        if not key.startswith("step-4/"):
            run.delete(f"checkpoints/{key}")
    proc = run_finetune(path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run.read_json("result.json")["resumedFromStep"] == 4
    assert run.read_bytes("metrics/loss.csv").decode().splitlines() == lines
    resumed = load_file(Path(result["adapterUri"][7:]) / "adapter_model.safetensors")
    for name, weight in adapter.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=1e-6)


def test_a_full_grpo_fine_tune_samples_with_vllm_from_the_weights_each_step_left(base, tmp_path, cpu_vllm):
    """method full with grpo.engine vllm: the whole weights move every step (a high learning rate), and
    vLLM's log-probabilities of the tokens it samples stay the training model's own, so each step's
    weights were the ones vLLM sampled with."""
    task = _task(base, tmp_path, method="full", hyperparameters={"epochs": 1, "batchSize": 2, "learningRate": 0.02})
    proc = run_finetune(write_task(task, tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting vLLM" in proc.stderr
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    assert result["steps"] == 4 and result["modelUri"] and not result.get("adapterUri")
    trained = load_file(Path(result["modelUri"][7:]) / "model.safetensors")
    before = load_file(base / "model.safetensors")
    assert max(float((trained[k] - before[k]).abs().max()) for k in before if k in trained) > 1e-2
    assert 0 <= run.read_json("progress.json")["figures"]["samplerLogpDiff"] < 1e-3


def test_a_base_model_whose_chat_markers_the_adapter_would_train_is_refused_before_vllm_starts(tmp_path, cpu_vllm):
    """A base model without a chat template gets ChatML's markers as new tokens, whose rows the
    adapter trains and vLLM's LoRA would not apply: the task is invalid, said before vLLM starts."""
    folder = make_tiny_llama(tmp_path / "base", tokenizer="sentencepiece", hidden_size=128, heads=2,
                             chat_template=False)
    task = _task(folder, tmp_path, train=4, validation=0)
    proc = run_finetune(write_task(task, tmp_path))
    assert proc.returncode == 2 and "[vllm]" not in proc.stderr  # an invalid task: no retries
    message = open_store(task["artifactUri"]).read_json("progress.json")["message"]
    assert "spec.grpo.engine is vllm, but the chat template's markers (<|im_" in message
    assert "are new to the base model's vocabulary (a base model)" in message and "or engine transformers" in message


def test_on_a_gpu_node_each_process_samples_on_its_own_gpu_with_the_planners_share_of_it(tiny_model, tmp_path,
                                                                                           monkeypatch):
    """What `vllm serve` is given for GRPO: the base alone, adapters loadable while it runs (one at a
    time, up to the rank rounded to one vLLM takes) or, for a full fine-tune, weights reloadable (its
    development endpoints), the process's own GPU of those visible, the estimate's share of it, and
    sequences no longer than maxSeqLength."""
    import llmfactory_runtime.vllm_server as vllm_server
    from llmfactory_runtime.finetune import vllm_sampler
    from llmfactory_runtime.finetune.estimate import Estimate

    seen = tmp_path / "seen"
    executable = tmp_path / "vllm"
    executable.write_text(f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES ${{VLLM_ALLOW_RUNTIME_LORA_UPDATING:--}} '
                          f'${{VLLM_SERVER_DEV_MODE:--}} $@" > {seen}\nexit 1\n')
    executable.chmod(0o755)
    monkeypatch.setenv("LLMFACTORY_VLLM", str(executable))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(vllm_server, "_cuda_devices", lambda: 2)  # as on a node with two GPUs
    est = Estimate(0, 0, 0.0, 0.0, 0.0, 0.0, 60.0, 0.0, 0.0, sampler_gib=19.0)
    for method in ("lora", "full"):
        spec = {"method": method, "lora": {"r": 12} if method == "lora" else None,
                "hyperparameters": {"maxSeqLength": 512, "seed": 7}}
        sampler = vllm_sampler.start({"uri": f"file://{tiny_model}", "digest": "d"},
                                     AutoTokenizer.from_pretrained(tiny_model), [], spec, est, (141.0, 140.0), 1,
                                     torch.bfloat16)
        with pytest.raises(RuntimeError, match="vLLM exited with code 1 while starting"):
            with sampler:
                pass
        device, lora_updates, dev_mode, *command = seen.read_text().split()
        assert (device, command[1]) == ("3", str(tiny_model))
        flags = serve_flags([str(executable), *command])
        assert flags["--gpu-memory-utilization"] == "0.14" and flags["--max-model-len"] == "512"
        assert flags["--tensor-parallel-size"] == "1" and flags["--dtype"] == "bfloat16"
        if method == "lora":
            assert (lora_updates, dev_mode) == ("True", "-")
            assert flags["--enable-lora"] is True and "--lora-modules" not in flags
            assert flags["--max-loras"] == "1" and flags["--max-lora-rank"] == "16"
        else:
            assert (lora_updates, dev_mode) == ("-", "1") and "--enable-lora" not in flags


@pytest.mark.extended(reason=(
    "test_a_grpo_run_sampling_with_vllm_trains_and_a_resumed_run_samples_what_it_sampled runs one process; this "
    "one two under DDP, each with a vLLM CPU server of its own on 2 cores"))
@pytest.mark.slow
def test_under_ddp_each_process_samples_its_own_prompts_with_a_vllm_of_its_own(base, tmp_path, cpu_vllm):
    task = _task(base, tmp_path, hyperparameters={"epochs": 1, "batchSize": 1, "learningRate": 0.05})
    proc = run_finetune(write_task(task, tmp_path), processes=2, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ports = {line.rsplit(" ", 1)[1] for line in proc.stderr.splitlines() if "vLLM ready in" in line}
    assert len(ports) == 2  # a server per process
    lines = open_store(task["artifactUri"]).read_bytes("metrics/loss.csv").decode().splitlines()
    assert len(lines) == 2 + 4  # header, the base's validation reward, 4 steps of 2 prompts (one a process)
