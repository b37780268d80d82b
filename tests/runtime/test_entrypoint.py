"""The runtime entrypoint's contract: what one process of a run may commit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmfactory_runtime import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_TASK, Interrupted, libraries
from llmfactory_runtime.__main__ import _execute
from llmfactory_runtime.store import PROGRESS, finished_result, open_store

from tests.runtime.finetune_helpers import finetune_task


def test_a_worker_rank_commits_nothing_and_leaves_progress_to_rank_0(tmp_path):
    """torchrun rank > 0 returns no result: it must not mark the run finished while rank 0 still saves."""
    run = open_store(f"file://{tmp_path}/run")
    run.write_json(PROGRESS, {"state": "Running", "stage": "saving"})  # rank 0, uploading

    assert _execute(lambda task, run, progress: None, {}, run) == 0
    assert not run.is_committed() and not run.exists("result.json")
    assert run.read_json(PROGRESS) == {"state": "Running", "stage": "saving"}

    assert _execute(lambda task, run, progress: {"finalLoss": 0.5}, {}, run) == 0  # rank 0, done
    assert finished_result(run) == {"finalLoss": 0.5}
    assert run.read_json(PROGRESS)["state"] == "Succeeded"


def test_a_worker_rank_that_stops_or_fails_leaves_rank_0s_progress_as_it_is(tmp_path, monkeypatch):
    """On SIGTERM every rank stops at the same checkpoint; rank 0 reports the step, and a worker's own
    (empty) progress written after it would hide the step from the resource's status."""
    run = open_store(f"file://{tmp_path}/run")
    mine = {"state": "Interrupted", "stage": "training", "done": 5, "message": "SIGTERM at step 5"}
    run.write_json(PROGRESS, mine)
    monkeypatch.setenv("RANK", "1")

    def stopped(task, run, progress):
        raise Interrupted("SIGTERM at step 5: checkpoint saved")

    def broken(task, run, progress):
        raise RuntimeError("the collective broke")
    assert _execute(stopped, {}, run) == EXIT_INTERRUPTED and run.read_json(PROGRESS) == mine
    assert _execute(broken, {}, run) == EXIT_FAILED and run.read_json(PROGRESS) == mine
    monkeypatch.setenv("RANK", "0")
    assert _execute(broken, {}, run) == EXIT_FAILED and run.read_json(PROGRESS)["state"] == "Failed"


def test_sigterm_anywhere_in_the_work_is_an_interruption_not_a_failure(tmp_path):
    """Kubernetes stops a pod with SIGTERM (preemption, eviction, a deleted pod): the runtime exits
    with 3, which the Job's podFailurePolicy does not count, and says so in progress.json."""
    run = open_store(f"file://{tmp_path}/run")
    answered = []

    def answering(task, run, progress):
        for i in range(1000):
            answered.append(i)  # what a phase saves as it goes (answers in the cache)
            if i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        return {"rows": len(answered)}

    before = signal.getsignal(signal.SIGTERM)
    assert _execute(answering, {}, run) == EXIT_INTERRUPTED
    assert len(answered) < 10 and not run.is_committed()
    progress = run.read_json(PROGRESS)
    assert progress["state"] == "Interrupted" and progress["message"].startswith("SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before  # outside the work, SIGTERM is as it was


def test_running_out_of_gpu_memory_is_refused_with_what_to_change_not_retried(tmp_path):
    """The same batches run out again on a retry (of a whole 8B model's load): exit 2, which the Job's
    podFailurePolicy fails at once, with torch's figures and the fields that lower the need."""
    import torch

    run = open_store(f"file://{tmp_path}/run")

    def training(task, run, progress):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.19 GiB "
            "is free. Including non-PyTorch memory, this process has 77.90 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")

    assert _execute(training, {"phase": "finetune"}, run) == EXIT_INVALID_TASK
    message = run.read_json(PROGRESS)["message"]
    assert message.startswith("OutOfGPUMemory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                              "capacity of 79.10 GiB of which 1.19 GiB is free. Lower hyperparameters.batchSize")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in message and not run.is_committed()


@pytest.mark.parametrize("spec,field,variable", [
    ({"judge": {"openai": {"model": "gpt-4o", "apiKeySecret": {"name": "judge", "key": "k"}}}},
     "spec.judge.openai", "LLMFACTORY_JUDGE_API_KEY"),
    ({"grpo": {"grader": {"operation": "sum", "parts": [
        {"name": "ok", "operation": "equals"},
        {"name": "kind", "operation": "judge", "judge": {"model": "j", "apiKeySecret": {"name": "g", "key": "k"}}}]}}},
     "spec.grpo.grader.parts[1].judge", "LLMFACTORY_GRADER_API_KEY"),
    ({"sources": [], "filters": {"judge": {"openai": {"model": "j", "apiKeySecret": {"name": "j", "key": "k"}}}}},
     "spec.filters.judge.openai", "LLMFACTORY_JUDGE_API_KEY"),
    ({"tracking": {"wandb": {"project": "p", "mode": "online", "apiKeySecret": {"name": "w", "key": "k"}}}},
     "spec.tracking.wandb", "WANDB_API_KEY"),
])
def test_a_missing_api_key_fails_the_run_before_any_work(tmp_path, monkeypatch, spec, field, variable):
    """A judge's (or a tracker's) key the pod lacks (locally: not exported) is found before the model
    loads and answers, not when the answers are to be judged."""
    monkeypatch.delenv(variable, raising=False)
    run, worked = open_store(f"file://{tmp_path}/run"), []
    assert _execute(lambda task, run, progress: worked.append(1), {"phase": "benchmark", "spec": spec}, run) == \
        EXIT_INVALID_TASK
    assert not worked
    assert run.read_json(PROGRESS)["message"].startswith(f"InvalidTask: {field}.apiKeySecret names Secret ")
    assert variable in run.read_json(PROGRESS)["message"]


@pytest.mark.parametrize("spec, unused", [
    ({"method": "lora"}, ["deepspeed", "bitsandbytes"]),
    ({"method": "qlora"}, ["deepspeed"]),
    ({"method": "full", "hyperparameters": {"optimizer": "adamw8bit"}}, ["deepspeed"]),
    ({"method": "full", "distribution": {"strategy": "deepspeed"}}, ["bitsandbytes"]),
])
def test_a_process_leaves_out_the_optional_libraries_its_task_does_not_name(tmp_path, monkeypatch, spec, unused):
    """DeepSpeed and bitsandbytes cost ~1 s and ~1.7 s to import, and accelerate and peft import them
    whenever they are installed; a task that names one and found it left out would fail. A process of
    several keeps bitsandbytes (a rank cannot restart alone when a checkpoint needs it); the restart
    keeps everything."""
    task = finetune_task(tmp_path / "model", f"file://{tmp_path}/data", f"file://{tmp_path}/store", **spec)
    assert libraries.unused(task) == unused
    assert libraries.unused({**task, "phase": "benchmark"}) == ["deepspeed", "bitsandbytes"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "bitsandbytes" not in libraries.unused(task)
    monkeypatch.setenv(libraries.KEEP_ENV, "1")
    assert libraries.unused(task) == []


def test_a_benchmark_of_a_model_saved_4_bit_restarts_with_bitsandbytes_and_measures_it(tiny_model, tmp_path):
    """A Benchmark leaves bitsandbytes out, not knowing its models before it loads them; one saved
    4-bit by bitsandbytes (an Unsloth "-bnb-4bit" checkpoint) restarts the process with it, and the
    run measures it as any other."""
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmfactory.planner import parse, plan
    from llmfactory_runtime.data import dumps_jsonl

    quantized = tmp_path / "bnb-4bit"
    AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                         device_map={"": "cpu"}).save_pretrained(quantized)
    for tokenizer_file in tiny_model.glob("*token*"):
        shutil.copy(tokenizer_file, quantized)
    data = tmp_path / "rows"
    data.mkdir()
    (data / "test.jsonl").write_bytes(dumps_jsonl([{"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello there."}]}]))
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "ppl"},
           "spec": {"model": {"source": {"uri": f"file://{quantized}"}}, "baseline": False,
                    "perplexity": {"dataset": {"uri": f"file://{data}"}, "split": "test"}}}
    task = plan(parse(doc), lambda *key: None, f"file://{tmp_path}/store")
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    env = {k: v for k, v in os.environ.items() if k != libraries.KEEP_ENV}
    done = subprocess.run([sys.executable, "-m", "llmfactory_runtime", "benchmark", "--task", str(path)],
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{quantized} is quantized with bitsandbytes: it needs bitsandbytes" in done.stderr
    assert done.stderr.count("restarting with every installed library") == 1
    result = finished_result(open_store(task["artifactUri"]))
    assert result["metrics"]["perplexity.value"] > 1
