"""FineTune's training loop: packing, masking, one vs two processes, kill and resume, QLoRA, outputs."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory.api.headline import headline
from llmfactory_runtime import batching
from llmfactory_runtime.batching import collate_sequences as collate, encode_rows, label_count, loss_sums
from llmfactory_runtime.chat import IGNORE
from llmfactory_runtime.finetune import checkpoint
from llmfactory_runtime.finetune.distributed import World
from llmfactory_runtime.finetune.model_setup import check_targets, load_for_training, parameter_groups, trainable_state
from llmfactory_runtime.models import load_config
from llmfactory_runtime.task import InvalidTask
from llmfactory_runtime.finetune.packing import pack
from llmfactory_runtime.data import dumps_jsonl, read_split
from llmfactory_runtime.finetune.evaluation import best_step, evaluations_without_improvement
from llmfactory_runtime.finetune.train import lr_lambda
from llmfactory_runtime.store import finished_result, open_store

from finetune_helpers import (OWN_SPEC, PAIRS, SMOLLM2, conversations, cut_and_left_out, finetune_task, loss_curve,
                              run_finetune, runtime_command, succeeded, unfinished, write_dataset, write_task)

NO_DROPOUT = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}


def _result(task: dict) -> dict:
    return open_store(task["artifactUri"]).read_json("result.json")



# --- packing and masking, checked by hand ---------------------------------------------------------

def test_packing_is_first_fit_in_shuffle_order_and_never_exceeds_the_length():
    assert pack([5, 3, 4, 2], [0, 1, 2, 3], 8) == [[0, 1], [2, 3]]
    assert pack([5, 4, 3, 2], [0, 1, 2, 3], 8) == [[0, 2], [1, 3]]  # 3 goes back to the first row with room
    assert pack([5, 4, 3, 2], [0, 1, 2, 3], 8, window=1) == [[0], [1, 2], [3]]  # a closed row takes no more
    assert pack([9, 1], [0, 1], 8) == [[0], [1]]  # a conversation longer than a row gets one of its own (cut)
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(2000)]
    rows = pack(lengths, list(range(2000)), 512)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert sum(lengths) / (512 * len(rows)) > 0.93


@pytest.mark.parametrize("kind,expected", [
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_learning_rate_warms_up_then_decays_as_the_scheduler_says(kind, expected):
    factor = lr_lambda(kind, warmup=2, total=6)
    assert [factor(step) for step in range(7)] == pytest.approx(expected, abs=1e-4)


def test_a_minimum_learning_rate_ratio_is_where_linear_and_cosine_decay_end():
    assert [lr_lambda("linear", 2, 6, floor=0.1)(step) for step in range(7)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1])
    assert lr_lambda("cosine", 2, 6, floor=0.1)(6) == pytest.approx(0.1)
    assert lr_lambda("cosine", 2, 6, floor=0.1)(4) == pytest.approx(0.55)


@pytest.mark.slow
def test_max_steps_trains_that_many_steps_over_as_many_epochs_as_they_take_on_its_own_schedule(tiny_model, dataset,
                                                                                              tmp_path, one_process):
    """hyperparameters.maxSteps (HF Trainer's max_steps) overrides epochs: the data is read again,
    reshuffled, until the steps are done; warmupSteps and the decay to minLearningRateRatio span them.
    warmupSteps not below the run's steps is refused, naming the field and the count."""
    epochs = [r.split(",")[1] for r in open_store(one_process["artifactUri"]).read_bytes("metrics/loss.csv").decode()
              .splitlines()[1:]]
    per_epoch = epochs.count("0")  # one_process's two epochs: the same data, seed and batches as here
    hp = {"epochs": 1, "maxSteps": per_epoch + 3, "warmupSteps": 2, "lrScheduler": "cosine",
          "minLearningRateRatio": 0.1, "gradientAccumulation": 2}
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/steps", lora=NO_DROPOUT, hyperparameters=hp)
    succeeded(run_finetune(write_task(task, tmp_path)))
    assert _result(task)["steps"] == per_epoch + 3
    rows = [r.split(",") for r in open_store(task["artifactUri"]).read_bytes("metrics/loss.csv").decode().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == [0] * per_epoch + [1] * 3
    peak = task["spec"]["hyperparameters"]["learningRate"]
    schedule = lr_lambda("cosine", 2, per_epoch + 3, floor=0.1)
    assert [float(r[3]) for r in rows] == pytest.approx([peak * schedule(step) for step in range(1, per_epoch + 4)])
    assert float(rows[-1][3]) == pytest.approx(0.1 * peak)

    late = finetune_task(tiny_model, dataset, f"file://{tmp_path}/late",
                         hyperparameters={"epochs": 1, "warmupSteps": per_epoch, "gradientAccumulation": 2})
    proc = run_finetune(write_task(late, tmp_path))
    assert proc.returncode == 2  # invalid: no retries
    assert (f"spec.hyperparameters.warmupSteps: {per_epoch} is not fewer than the run's {per_epoch} optimizer steps"
            in open_store(late["artifactUri"]).read_json("progress.json")["message"])


def test_packed_batch_restarts_positions_and_labels_only_assistant_tokens():
    examples = [{"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13]},
                {"input_ids": [21, 22], "labels": [IGNORE, 22]},
                {"input_ids": [31, 32, 33, 34], "labels": [IGNORE, IGNORE, 33, 34]}]
    batch = collate(examples, [[0, 1], [2]], pad_id=0, packed=True)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22], [IGNORE, IGNORE, 33, 34, IGNORE]]
    assert "attention_mask" not in batch
    assert label_count(batch) == 5
    plain = collate(examples, [[1], [2]], pad_id=0, packed=False)
    assert plain["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("packed", [True, False])
def test_on_a_gpu_rows_are_padded_to_a_multiple_of_64_which_changes_no_loss(tiny_model, monkeypatch, packed):
    """On a GPU (batching.WIDTH_MULTIPLE) a batch is as wide as the next multiple of 64, so that the
    attention kernel meets few shapes; the padding is its own segment (packed) or masked (plain)
    and carries no labels, so the loss is the one of the narrow batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = encode_rows(tok, conversations(3), 96)
    rows = [[0, 1], [2]] if packed else [[0], [1], [2]]
    narrow = collate(examples, rows, tok.pad_token_id, packed)
    monkeypatch.setattr(batching, "WIDTH_MULTIPLE", 64)
    wide = collate(examples, rows, tok.pad_token_id, packed)
    width = narrow["input_ids"].shape[1]
    assert width % 64 and wide["input_ids"].shape[1] == -(-width // 64) * 64
    for key in narrow:
        assert torch.equal(wide[key][:, :width], narrow[key])
    assert (wide["input_ids"][:, width:] == tok.pad_token_id).all() and (wide["labels"][:, width:] == IGNORE).all()
    if packed:  # the padding is one segment of its own, counted from 0 where the row's conversations end
        for i, row in enumerate(rows):
            end = sum(len(examples[j]["input_ids"]) for j in row)
            assert wide["position_ids"][i, end:].tolist() == list(range(wide["input_ids"].shape[1] - end))
    with torch.no_grad():
        assert model(**wide).loss.item() == pytest.approx(model(**narrow).loss.item(), abs=1e-6)


def test_a_packed_conversation_gets_exactly_the_logits_it_gets_alone(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = encode_rows(tok, conversations(3), 96)
    batch = collate(examples, [[0, 1, 2]], tok.pad_token_id, packed=True)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            n = len(e["input_ids"])
            assert torch.allclose(packed[at:at + n], alone, atol=1e-5)
            at += n


def test_assistant_only_labels_cover_the_answers_and_their_end_of_turn(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    [example] = encode_rows(tok, conversations(1), 256)  # two turns: both answers are learned, no question is
    learned = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])
    assert learned == "The capital of France is Paris.<|im_end|>\nВоздух рассеивает синий свет сильнее всего.<|im_end|>\n"


# --- whole runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.mark.slow
def test_lora_run_learns_and_leaves_adapter_model_card_loss_curve_and_tracker_runs(tiny_model, dataset, tmp_path,
                                                                                   monkeypatch):
    mlruns, scratch = tmp_path / "mlruns", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/store", hyperparameters={
        "evalEverySteps": 4, "lrScheduler": "cosine"}, tracking={
        "tensorboard": True, "wandb": {"project": "llmfactory-test", "mode": "offline"},
        "mlflow": {"trackingUri": f"file://{mlruns}", "experiment": "tests"}})
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert result["finalLoss"] < result["firstLoss"] - 0.3
    assert result["evalLoss"] is not None and result["steps"] == len((Path(result["lossCurveUri"][7:]) / "loss.csv").read_text().splitlines()) - 1
    assert 0.5 < result["realTokenShare"] <= 1 and result["tokensPerSecond"] > 0 and result["processes"] == 1
    # maxSeqLength 96 cuts the longest conversations: counted, and said in the headline
    cut, left = cut_and_left_out(AutoTokenizer.from_pretrained(tiny_model), read_split(dataset, "train"), 96)
    assert result["truncatedRows"] == cut > 0 and "rowsLeftOut" not in result and left == 0
    assert headline("FineTune", result).endswith(f", {cut} rows cut at maxSeqLength")
    assert (Path(result["lossCurveUri"][7:]) / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter, merged = Path(result["adapterUri"][7:]), Path(result["modelUri"][7:])
    assert task["inputs"]["dataset"]["digest"] in (merged / "README.md").read_text()
    assert (merged / "tokenizer_config.json").exists() and (merged / "generation_config.json").exists()
    tracking = Path(task["artifactUri"][7:]) / "tracking"
    assert list((tracking / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tracking / "wandb").glob("offline-run-*/run-*.wandb"))
    [loss_metric] = list(mlruns.glob("*/*/metrics/train/loss"))
    assert len(loss_metric.read_text().splitlines()) == result["steps"]
    # The validation loss every 4 steps and at the end: in the loss curve and the trackers.
    rows = [line.split(",") for line in (Path(result["lossCurveUri"][7:]) / "loss.csv").read_text().splitlines()]
    assert rows[0] == ["step", "epoch", "loss", "learning_rate", "eval_loss"]
    steps = result["steps"]  # the learning rate after each step: cosine from 0.01 (no warmup) to zero
    assert [float(r[3]) for r in rows[1:]] == pytest.approx([0.005 * (1 + math.cos(math.pi * s / steps))
                                                            for s in range(1, steps + 1)], abs=1e-9)
    evaluated = [int(r[0]) for r in rows[1:] if r[4]]
    assert evaluated == [*range(4, result["steps"], 4), result["steps"]]
    assert float(rows[-1][4]) == pytest.approx(result["evalLoss"], abs=1e-4)
    assert _tensorboard_steps(tracking / "tensorboard", "eval/loss") == evaluated
    [eval_metric] = list(mlruns.glob("*/*/metrics/eval/loss"))
    assert [int(line.split()[2]) for line in eval_metric.read_text().splitlines()] == evaluated
    assert not list(scratch.glob("llmfactory-*"))  # tracker files, checkpoints, saves: uploaded, then removed
    # The adapter on its base gives the merged model's logits.
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    whole = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, whole(ids).logits, atol=1e-4)


FULL = {"learningRate": 0.003, "gradientCheckpointing": True, "gradientAccumulation": 2}


@pytest.fixture(scope="module")
def one_process_full(tiny_model, dataset, tmp_path_factory) -> dict:
    """A full fine-tune in one process (run once): checked on its own, and reproduced by ZeRO-3."""
    folder = tmp_path_factory.mktemp("one-process-full")
    task = finetune_task(tiny_model, dataset, f"file://{folder}/store", method="full", hyperparameters=FULL)
    succeeded(run_finetune(write_task(task, folder)))
    return task


@pytest.mark.slow
def test_full_fine_tune_trains_every_weight_and_saves_a_whole_model(tiny_model, one_process_full):
    task = one_process_full
    assert "lora" not in task["spec"]
    result = _result(task)
    assert result["finalLoss"] < result["firstLoss"] - 0.5 and "adapterUri" not in result
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:]).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # embeddings, norms, head: everything moved


@pytest.mark.slow
def test_8_bit_adam_trains_a_full_fine_tune_as_adamw_does_with_a_quarter_of_its_state_and_resumes_exactly(
        tiny_model, dataset, tmp_path, one_process_full):
    """hyperparameters.optimizer adamw8bit (bitsandbytes' AdamW8bit): the same run as one_process_full
    but for the optimizer learns as far, its checkpointed state is 2 bytes a parameter, not AdamW's 8,
    and a run killed after a checkpoint resumes from its 8-bit moments to the same weights."""
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/store", method="full",
                         hyperparameters={**FULL, "optimizer": "adamw8bit"}, checkpointing={"everySteps": 5})
    succeeded(run_finetune(write_task(task, tmp_path)))
    result, adamw = _result(task), _result(one_process_full)
    assert result["finalLoss"] < result["firstLoss"] - 0.5
    assert result["finalLoss"] == pytest.approx(adamw["finalLoss"], abs=0.1)
    run = open_store(task["artifactUri"])
    run.delete_prefix(f"checkpoints/step-{result['steps']}")  # killed before the end: from the last periodic one
    saved = checkpoint.latest(run, ONE)
    state = run.read_bytes(f"checkpoints/step-{saved}/optimizer.pt")
    assert len(state) < 3 * result["estimate"]["trainableParams"]  # AdamW's: over 8 bytes a parameter

    weights = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:]).state_dict()
    run.delete("COMMITTED")
    run.delete("result.json")
    succeeded(run_finetune(write_task(task, tmp_path)))
    assert _result(task)["resumedFromStep"] == saved and _result(task)["steps"] == result["steps"] > saved
    resumed = AutoModelForCausalLM.from_pretrained(_result(task)["modelUri"][7:]).state_dict()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


@pytest.mark.extended(reason=(
    "test_full_fine_tune_trains_every_weight_and_saves_a_whole_model trains a full fine-tune in fp32 and "
    "tests/unit/test_estimate.py counts the 16-bit one's fp32 master weights; only this test trains in "
    "bf16 and fp16"))
@pytest.mark.slow
def test_16_bit_full_fine_tunes_step_fp32_master_weights_and_move_as_fp32_does(tiny_model, tmp_path):
    # At a full fine-tune's usual learning rate most of Adam's updates are below half a bf16 step:
    # plain bf16 AdamW moved 0.4 times as far as fp32 here. In fp16 Adam's eps rounds to 0, and
    # every weight without a gradient became 0/0 = NaN at the first step.
    data = write_dataset(tmp_path / "data", train=16, validation=2)
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tasks = {precision: finetune_task(tiny_model, data, f"file://{tmp_path}/{precision}", method="full",
                                      hyperparameters={"learningRate": 2e-5, "epochs": 1, "precision": precision},
                                      checkpointing={"everySteps": 4}) for precision in ("fp32", "bf16", "fp16")}
    with ThreadPoolExecutor(3) as pool:  # independent runs side by side
        for done in [pool.submit(run_finetune, write_task(task, tmp_path)) for task in tasks.values()]:
            succeeded(done.result())
    runs = {precision: (task, AutoModelForCausalLM.from_pretrained(_result(task)["modelUri"][7:],
                                                                   dtype=torch.float32).state_dict())
            for precision, task in tasks.items()}

    def moved(precision: str, weights: dict) -> torch.Tensor:
        """How each weight moved, on the grid of `precision`'s dtype (a 16-bit run's saved weights are on it)."""
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return torch.cat([(weights[k].to(dtype).float() - before[k].to(dtype).float()).flatten() for k in before])

    fp32_task, fp32_weights = runs["fp32"]
    for precision in ("bf16", "fp16"):
        task, weights = runs[precision]
        assert all(torch.isfinite(w).all() for w in weights.values())
        got, expected = moved(precision, weights), moved(precision, fp32_weights)  # fp32's run, rounded alike
        assert got.norm() > 0.7 * expected.norm()
        assert (got != 0).sum() > 0.8 * (expected != 0).sum()
    assert loss_curve(runs["fp16"][0]) == pytest.approx(loss_curve(fp32_task), abs=1e-3)
    assert _result(runs["fp16"][0])["skippedSteps"] == 0 and "skippedSteps" not in _result(runs["bf16"][0])

    # Killed after the checkpoint at step 4 (its result gone), it resumes from the fp32 master weights
    # and loss scale there and ends exactly where it ended.
    task, weights = runs["fp16"]
    steps = _result(task)["steps"]
    run = open_store(task["artifactUri"])
    run.delete_prefix(f"checkpoints/step-{steps}")  # killed before the end: from the last periodic one
    run.delete("COMMITTED")
    run.delete("result.json")
    succeeded(run_finetune(write_task(task, tmp_path)))
    assert _result(task)["resumedFromStep"] == 4 and _result(task)["steps"] == steps > 4
    resumed = AutoModelForCausalLM.from_pretrained(_result(task)["modelUri"][7:], dtype=torch.float32).state_dict()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


@pytest.mark.extended(reason=(
    "test_adapters_run_in_the_training_dtype_and_keep_less_for_backward_than_a_full_fine_tune checks "
    "the adapters' dtype in the default run; only this test trains them in bf16 and fp16"))
@pytest.mark.slow
def test_16_bit_lora_steps_fp32_master_weights_and_moves_as_fp32_does(tiny_model, tmp_path):
    # Adapters run in the training dtype (as the base does) and the optimizer steps fp32 copies: lora_A
    # starts at kaiming-sized values, and Adam's 1e-4 steps are below half a bf16 step of them.
    data = write_dataset(tmp_path / "data", train=16, validation=2)
    tasks = {precision: finetune_task(tiny_model, data, f"file://{tmp_path}/{precision}", lora=NO_DROPOUT,
                                      mergeAdapter=False, checkpointing={"everySteps": 4},
                                      hyperparameters={"learningRate": 1e-4, "epochs": 1, "precision": precision})
             for precision in ("fp32", "bf16", "fp16")}
    with ThreadPoolExecutor(3) as pool:
        for done in [pool.submit(run_finetune, write_task(task, tmp_path)) for task in tasks.values()]:
            succeeded(done.result())

    def adapter(task: dict) -> dict[str, torch.Tensor]:
        return load_file(Path(_result(task)["adapterUri"][7:], "adapter_model.safetensors"))

    torch.manual_seed(tasks["fp32"]["spec"]["hyperparameters"]["seed"])  # as the runtime seeds its adapters
    start = load_for_training(tasks["fp32"]["spec"], tasks["fp32"]["inputs"]["baseModel"], ONE, torch.float32)
    start = {k.replace(".default", ""): v for k, v in trainable_state(start).items()}
    runs = {precision: adapter(task) for precision, task in tasks.items()}
    lora_a = [k for k in runs["fp32"] if "lora_A" in k]
    assert lora_a and {v.dtype for v in runs["bf16"].values()} == {torch.bfloat16}

    def moved(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """How each lora_A weight moved from its start, on the grid of `dtype`."""
        return torch.cat([(weights[k].to(dtype).float() - start[k].to(dtype).float()).flatten() for k in lora_a])

    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        got, expected = moved(runs[precision], dtype), moved(runs["fp32"], dtype)  # fp32's run, rounded alike
        assert got.norm() > 0.7 * expected.norm() > 0
        assert (got != 0).sum() > 0.8 * (expected != 0).sum()
    assert loss_curve(tasks["fp16"]) == pytest.approx(loss_curve(tasks["fp32"]), abs=1e-2)

    # Killed after the checkpoint at step 4 (its result gone), it resumes from the fp32 master weights
    # there and ends exactly where it ended.
    task, weights = tasks["bf16"], runs["bf16"]
    run = open_store(task["artifactUri"])
    run.delete_prefix(f"checkpoints/step-{_result(task)['steps']}")  # killed before the end: from the last periodic one
    run.delete("COMMITTED")
    run.delete("result.json")
    succeeded(run_finetune(write_task(task, tmp_path)))
    assert _result(task)["resumedFromStep"] == 4
    assert all(torch.equal(adapter(task)[k], weights[k]) for k in weights)


@pytest.fixture(scope="module")
def one_process(tiny_model, dataset, tmp_path_factory) -> dict:
    """One process, accumulation 2: the run that 2-process DDP and ZeRO-2 runs must reproduce (run once)."""
    folder = tmp_path_factory.mktemp("one-process")
    one = finetune_task(tiny_model, dataset, f"file://{folder}/one", lora=NO_DROPOUT,
                        hyperparameters={"gradientAccumulation": 2})
    succeeded(run_finetune(write_task(one, folder)))
    return one


@pytest.mark.parametrize("method,lora", [("full", None), ("lora", {"dora": True, "loraPlusRatio": 16})])
def test_weight_decay_spares_norms_and_magnitudes_and_lora_plus_steps_b_and_magnitudes_faster(tiny_model, method, lora):
    """hyperparameters.weightDecay decays matrices only (HF Trainer's and nanoGPT's rule): a decayed
    norm's gain, or DoRA's magnitude, would shrink towards 0 instead of staying near its start."""
    task = finetune_task(tiny_model, "file:///unused", "file:///unused", method=method,
                         **({"lora": {"r": 4, **lora}} if lora else {}),
                         hyperparameters={"weightDecay": 0.1, "learningRate": 0.001})
    model = load_for_training(task["spec"], task["inputs"]["baseModel"], ONE, torch.float32)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = parameter_groups(model, named, [p for _, p in named], task["spec"])
    names = {id(p): n for n, p in named}
    by_group = [({names[id(p)] for p in g["params"]}, g["lr"], g.get("weight_decay")) for g in groups]
    if method == "full":
        norms = {n for n, p in named if "norm" in n}
        assert len(norms) == 5 and by_group == [({n for n, _ in named} - norms, 0.001, None), (norms, 0.001, 0.0)]
        return
    a, b = ({n for n, _ in named if matrix in n} for matrix in ("lora_A", "lora_B"))
    magnitudes = {n for n, _ in named if "magnitude" in n}
    assert a and b and magnitudes and a | b | magnitudes == {n for n, _ in named}
    assert by_group == [(a, 0.001, None), (b, 0.016, None), (magnitudes, 0.016, 0.0)]


@pytest.mark.extended(reason=(
    "test_weight_decay_spares_norms_and_magnitudes_and_lora_plus_steps_b_and_magnitudes_faster checks LoRA+'s "
    "parameter groups and rates; this one trains with them"))
@pytest.mark.slow
def test_lora_plus_steps_the_b_matrices_at_its_ratio_of_the_learning_rate(tiny_model, dataset, tmp_path, one_process):
    """lora.loraPlusRatio (LoRA+): the same run as one_process but for the ratio; its B matrices (zero at
    the start) move several times as far, its A matrices about as far, and the checkpointed optimizer
    steps the B matrices at 16 times the A matrices' rate."""
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/plus", lora={**NO_DROPOUT, "loraPlusRatio": 16},
                         hyperparameters={"gradientAccumulation": 2}, checkpointing={"everySteps": 4})
    succeeded(run_finetune(write_task(task, tmp_path)))
    plus, plain = _adapter(task), _adapter(one_process)

    def norm(weights: dict[str, torch.Tensor], matrix: str) -> float:
        return float(torch.cat([w.flatten() for k, w in weights.items() if matrix in k]).norm())

    assert norm(plus, "lora_B") > 3 * norm(plain, "lora_B") > 0
    assert 0.5 < norm(plus, "lora_A") / norm(plain, "lora_A") < 2
    assert _result(task)["finalLoss"] < _result(task)["firstLoss"]
    run = open_store(task["artifactUri"])
    run.delete_prefix(f"checkpoints/step-{_result(task)['steps']}")  # the last step's holds no optimizer state
    with tempfile.TemporaryDirectory() as tmp:
        run.download_file(f"checkpoints/step-{checkpoint.latest(run, ONE)}/optimizer.pt", Path(tmp) / "o.pt")
        groups = torch.load(Path(tmp) / "o.pt", weights_only=False)["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.01, 0.16]
    assert len(groups[1]["params"]) == sum("lora_B" in k for k in plus)


@pytest.mark.slow
def test_two_processes_follow_the_loss_curve_of_one(tiny_model, dataset, tmp_path, one_process):
    """Same global batch (1 x accumulation 2 vs 2 processes x 1): the same steps on the same data."""
    one = one_process
    two = finetune_task(tiny_model, dataset, f"file://{tmp_path}/two", lora=NO_DROPOUT, resources={"gpusPerNode": 2},
                        hyperparameters={"evalEverySteps": 3})  # evaluating on the way changes no step
    committed = _run_watching_the_commit(two, write_task(two, tmp_path), tmp_path, processes=2)
    assert committed and all(result is not None for result in committed)  # never finished before rank 0 saved
    curve = [loss_curve(t) for t in (one, two)]
    assert len(curve[0]) == len(curve[1]) > 10
    assert max(abs(a - b) for a, b in zip(*curve)) < 1e-4
    assert _result(two)["processes"] == 2
    assert _result(two)["trainTokens"] == _result(one)["trainTokens"]
    assert _result(two)["truncatedRows"] == _result(one)["truncatedRows"] > 0  # the split's, not a process's
    assert _result(two)["evalLoss"] == pytest.approx(_result(one)["evalLoss"], abs=1e-4)  # each evaluated half


def _run_watching_the_commit(task: dict, task_path: Path, tmp_path: Path, processes: int) -> list[dict | None]:
    """Run to the end; return result.json as seen each time the run was found committed."""
    run, seen = open_store(task["artifactUri"]), []
    with open(tmp_path / "stderr.log", "w+") as stderr:
        proc = subprocess.Popen(runtime_command(task_path, processes), stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        while proc.poll() is None:
            if run.is_committed():
                seen.append(run.read_json_or_none("result.json"))
            time.sleep(0.01)
        stderr.seek(0)
        assert proc.returncode == 0, stderr.read()[-4000:]
    return [*seen, finished_result(run)]


def _adapter(task: dict) -> dict[str, torch.Tensor]:
    """The trained adapter's weights, from whichever store the task wrote to."""
    with tempfile.TemporaryDirectory() as tmp:
        open_store(task["artifactUri"]).download_file("adapter/adapter_model.safetensors", Path(tmp) / "a.safetensors")
        return load_file(Path(tmp) / "a.safetensors")


def _start(task_path: Path) -> subprocess.Popen:
    return subprocess.Popen(runtime_command(task_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_until_training(task: dict, proc: subprocess.Popen, since: float, checkpointed: bool = False,
                         timeout: float = 120) -> None:
    """Until this process (started at `since`) trains, and (if asked) a checkpoint is committed."""
    run = open_store(task["artifactUri"])
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        progress = run.read_json_or_none("progress.json") or {}
        if progress.get("stage") == "training" and progress.get("startedAt", 0) >= since - 1:
            if not checkpointed or checkpoint.latest(run, ONE) is not None:
                return
        time.sleep(0.02)
    raise AssertionError(f"the run never trained (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")


ONE = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))
LONGER = {"epochs": 3}


KILLED_SPEC = {"lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["all-linear"]},  # dropout, NEFTune: RNG
               "checkpointing": {"everySteps": 3, "keepLast": 2}, "hyperparameters": {**LONGER, "neftuneNoiseAlpha": 5}}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, dataset, tmp_path_factory) -> dict:
    """The run the killed and resumed ones must end as (run once for every trial)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    reference = finetune_task(tiny_model, dataset, f"file://{folder}/reference", **KILLED_SPEC)
    succeeded(run_finetune(write_task(reference, folder)))
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("trial", [0, *(pytest.param(t, marks=pytest.mark.extended(
    reason="trial 0 of the default run kills a run twice, once after it resumed")) for t in (1, 2))])
def test_killed_at_random_moments_and_resumed_from_s3_ends_with_the_uninterrupted_weights(tiny_model, dataset, tmp_path,
                                                                                           s3_bucket, uninterrupted, trial):
    """SIGKILLed at random moments (trial 0 also kills the resumed run), then resumed to the end."""
    rng = random.Random(1234 + trial)
    task = finetune_task(tiny_model, dataset, f"s3://{s3_bucket}/trial-{trial}", **KILLED_SPEC)
    assert task["digest"] == uninterrupted["digest"]
    path = write_task(task, tmp_path)
    for kill in range(2 if trial == 0 else 1):
        began = time.time()
        proc = _start(path)
        _wait_until_training(task, proc, began, checkpointed=kill == 0)
        time.sleep(rng.uniform(0, 0.8))  # anywhere: mid-step, mid-upload, between marker and prune
        proc.kill()  # SIGKILL: no chance to save; resume from the last committed checkpoint
        proc.wait()
        assert open_store(task["artifactUri"]).read_json_or_none("result.json") is None
    succeeded(run_finetune(path))

    result, expected, got = _result(task), _adapter(uninterrupted), _adapter(task)
    assert result["resumedFromStep"] is not None and result["resumedFromStep"] % 3 == 0
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert loss_curve(task) == pytest.approx(loss_curve(uninterrupted), abs=1e-6)
    steps = sorted(int(k.split("/")[0][5:]) for k in open_store(task["artifactUri"]).list("checkpoints")
                   if k.endswith("COMMITTED"))
    assert len(steps) <= 2  # keepLast


@pytest.mark.parametrize("finished", ["uninterrupted", "one_process_full"])
def test_a_run_stopped_after_its_last_step_resumes_there_without_training_again(finished, tmp_path, request):
    """A pod killed while it evaluates, merges and uploads (all done, no result committed yet): the
    next attempt starts at the checkpoint of the last step, not at the last periodic one (every 3 for
    the adapter; the full fine-tune's every 100 is more than its steps), and saves the same weights.
    That last checkpoint holds no optimizer state: nothing steps after it."""
    done = request.getfixturevalue(finished)
    shutil.copytree(done["artifactUri"][7:], tmp_path / "store" / "run")
    task = {**done, "artifactUri": f"file://{tmp_path}/store/run"}
    run = open_store(task["artifactUri"])
    steps = run.read_json("result.json")["steps"]
    assert steps % task["spec"]["checkpointing"]["everySteps"] and run.is_committed(f"checkpoints/step-{steps}")
    assert not any(k.endswith("optimizer.pt") for k in run.list(f"checkpoints/step-{steps}"))
    saved = "adapter" if task["spec"]["method"] != "full" else "model"
    unfinished(run, saved)
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert result["resumedFromStep"] == result["steps"] == steps
    weights = {"adapter": "adapter/adapter_model.safetensors", "model": "model/model.safetensors"}[saved]
    expected, got = (load_file(Path(t["artifactUri"][7:]) / weights) for t in (done, task))
    assert expected.keys() == got.keys() and all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert result["evalLoss"] == pytest.approx(_result(done)["evalLoss"], abs=1e-5)
    assert loss_curve(task) == pytest.approx(loss_curve(done), abs=1e-6)


def test_target_modules_are_checked_on_the_models_skeleton_before_any_weight_is_read(tiny_model, tmp_path):
    """A folder with the config alone (no weights): enough to refuse a misspelt module (an 8B's
    weights take minutes to read, or to download), and to accept a reward model's score layer."""

    (tmp_path / "config-only").mkdir()
    shutil.copy(tiny_model / "config.json", tmp_path / "config-only")
    base = load_config({"uri": f"file://{tmp_path}/config-only"})
    with pytest.raises(InvalidTask, match="^spec.lora.targetModules: no module of the model is named gate_prj; its "
                                          "linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                          r"up_proj, v_proj \(or give all-linear\)$"):
        check_targets({"method": "lora", "lora": {"targetModules": ["q_proj", "gate_prj"]}}, base)
    check_targets({"method": "lora", "lora": {"targetModules": ["q_proj", "gate_proj"]}}, base)
    check_targets({"method": "qlora", "objective": "reward", "lora": {"targetModules": ["q_proj", "score"]}}, base)
    with pytest.raises(InvalidTask, match="named score"):  # a language model has no score layer
        check_targets({"method": "lora", "lora": {"targetModules": ["score"]}}, base)


@pytest.mark.parametrize("losses,min_delta,since", [
    ([3.0, 2.5, 2.6, 2.55, 2.7], 0.0, 3),
    ([3.0, 2.5, 2.6, 2.4], 0.0, 0),
    ([3.0, 2.5, 2.45, 2.42], 0.1, 2),  # better, but not by more than minDelta
    ([], 0.0, 0),
])
def test_patience_counts_the_evaluations_since_the_last_improvement(losses, min_delta, since):
    assert evaluations_without_improvement(losses, min_delta) == since


def test_the_best_step_is_the_lowest_validation_loss_the_earliest_of_equals():
    assert best_step([(2, 3.0), (4, 2.5), (6, 2.5), (8, 2.7)]) == 4
    assert best_step([]) is None


@pytest.mark.parametrize("distribution", [None, pytest.param(
    {"strategy": "deepspeed", "zeroStage": 2}, id="zero2", marks=pytest.mark.deepspeed("ShareMemCommBuilder"))])
def test_early_stopping_ends_training_and_saves_the_best_evaluations_weights(tiny_model, tmp_path, distribution):
    """Four conversations learnt hard and judged on four others: the validation loss soon stops
    improving. The run stops `patience` evaluations after its best, and what it saves is the best
    step's weights, whose checkpoint outlived keepLast 1. Under DeepSpeed ZeRO 2 too, in one process
    started without torchrun (as a one-GPU pod starts it), the best weights read without the optimizer
    shards beside them."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    (data / "train.jsonl").write_bytes(dumps_jsonl(rows[:4] * 4))
    (data / "validation.jsonl").write_bytes(dumps_jsonl(rows[4:]))
    task = finetune_task(tiny_model, f"file://{data}", f"file://{tmp_path}/store", lora=NO_DROPOUT,
                         checkpointing={"everySteps": 1, "keepLast": 1}, hyperparameters={
                             "epochs": 8, "learningRate": 0.03, "evalEverySteps": 1, "earlyStopping": {"patience": 3}},
                         **({"distribution": distribution} if distribution else {}))
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    curve = [line.split(",") for line in open_store(task["artifactUri"]).read_bytes("metrics/loss.csv").decode()
             .splitlines()[1:]]
    evals = {int(r[0]): float(r[4]) for r in curve}
    assert result["stoppedEarly"] is True and result["steps"] == len(curve) and int(curve[-1][1]) < 7  # of 8 epochs
    assert result["bestStep"] == min(evals, key=evals.get) == result["steps"] - 3
    assert result["evalLoss"] == pytest.approx(evals[result["bestStep"]], abs=1e-4)
    assert evals[result["steps"]] > result["evalLoss"] + 1e-3  # the last step's weights were worse
    committed = {int(k.split("/")[0][5:]) for k in open_store(task["artifactUri"]).list("checkpoints")
                 if k.endswith("COMMITTED")}
    assert committed == {result["bestStep"], result["steps"]}
    # What was saved is the best step's model: its validation loss is the best one.
    merged = Path(result["modelUri"][7:])
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    total, count = loss_sums(model, encode_rows(tokenizer, rows[4:], 96), 2, tokenizer.pad_token_id)
    assert total / count == pytest.approx(result["evalLoss"], abs=1e-4)
    assert f"those of step {result['bestStep']}, the lowest validation loss" in (merged / "README.md").read_text()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_once_and_the_next_attempt_resumes_there(tiny_model, dataset, tmp_path):
    mlruns = tmp_path / "mlruns"
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/store", checkpointing={"everySteps": 1000},
                         hyperparameters={**LONGER, "evalEverySteps": 1}, tracking={
                             "tensorboard": True, "wandb": {"project": "t", "mode": "offline"},
                             "mlflow": {"trackingUri": f"file://{mlruns}", "experiment": "tests"}})
    path = write_task(task, tmp_path)
    began = time.time()
    proc = _start(path)
    _wait_until_training(task, proc, began)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 3  # interrupted after a checkpoint: podFailurePolicy does not count it
    run = open_store(task["artifactUri"])
    [saved] = [k for k in run.list("checkpoints") if k.endswith("COMMITTED")]
    step = int(saved.split("/")[0][5:])
    progress = run.read_json("progress.json")
    assert progress["state"] == "Interrupted" and "SIGTERM at step" in progress["message"]
    succeeded(run_finetune(path))
    assert _result(task)["resumedFromStep"] == step
    # The tracker files are whole: the first attempt's came back with the checkpoint.
    tracking = Path(task["artifactUri"][7:]) / "tracking"
    assert _tensorboard_steps(tracking / "tensorboard", "train/loss") == list(range(1, _result(task)["steps"] + 1))
    steps = _result(task)["steps"]
    # The first attempt's evaluations came back with the checkpoint, and the one the SIGTERM cut short
    # (the step it came at) was made up for by the next attempt.
    evaluated = list(range(1, steps + 1))
    assert [int(r.split(",")[0]) for r in open_store(task["artifactUri"]).read_bytes("metrics/loss.csv").decode()
            .splitlines()[1:] if r.split(",")[4]] == evaluated
    assert _tensorboard_steps(tracking / "tensorboard", "eval/loss") == evaluated
    assert len(list((tracking / "wandb").glob("offline-run-*/run-*.wandb"))) == 2  # one run id: `wandb sync` joins them
    [mlflow_run] = [m.parent.parent.parent for m in mlruns.glob("*/*/metrics/train/loss")]  # one run, both attempts
    assert mlflow_run.name == (tracking / "mlflow-run-id").read_text()
    assert [int(line.split()[2]) for line in (mlflow_run / "metrics/train/loss").read_text().splitlines()] == \
        list(range(1, _result(task)["steps"] + 1))


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    return sorted(event.step for events in sorted(folder.glob("events.out.tfevents.*"))
                  for event in EventFileLoader(str(events)).Load()
                  if any(value.tag == tag for value in event.summary.value))


@pytest.mark.extended(reason=(
    "test_deepspeed_zero3_full_fine_tune_shards_weights_and_saves_the_gathered_model runs DeepSpeed on "
    "two processes and test_sigterm_saves_a_checkpoint_at_once_and_the_next_attempt_resumes_there resumes"
    " after SIGTERM; only this test offloads the optimizer (CPUAdam)"))
@pytest.mark.slow
@pytest.mark.deepspeed("ShareMemCommBuilder", "CPUAdamBuilder")  # gloo's allreduce on shared memory; offload
def test_deepspeed_zero2_with_cpu_offload_on_two_processes_matches_one_process_and_resumes_after_sigterm(
        tiny_model, dataset, tmp_path, one_process):
    """The optimizer runs in CPU memory (DeepSpeed's CPUAdam; JIT-compiled on first use) and its
    offloaded state is what the checkpoint saves and the resumed run restores."""
    one = one_process
    ds = finetune_task(tiny_model, dataset, f"file://{tmp_path}/ds", lora=NO_DROPOUT, resources={"gpusPerNode": 2},
                       distribution={"strategy": "deepspeed", "zeroStage": 2, "offload": "cpu"})
    path = write_task(ds, tmp_path)
    began = time.time()
    proc = subprocess.Popen(runtime_command(path, processes=2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _wait_until_training(ds, proc, began, timeout=400)  # on a fresh machine DeepSpeed compiles its CPU ops first
    proc.send_signal(signal.SIGTERM)  # to torchrun (a pod's PID 1), which passes it on to its workers
    assert proc.wait(timeout=120) == 3  # the runtime's code, not torchrun's 1
    assert checkpoint.latest(open_store(ds["artifactUri"]), ONE) is not None
    succeeded(run_finetune(path, processes=2))
    assert _result(ds)["resumedFromStep"] is not None
    config = open_store(ds["artifactUri"]).read_json("deepspeed.json")
    assert config["zero_optimization"]["stage"] == 2 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert loss_curve(ds) == pytest.approx(loss_curve(one), abs=1e-4)


def test_a_checkpoint_without_its_commit_marker_is_ignored_and_cleaned_up(tmp_path):
    run = open_store(f"file://{tmp_path}")
    world = ONE
    for step in (2, 4):
        checkpoint.save(run, world, step, lambda local, s=step: (local / "state.json").write_text(json.dumps(s)), keep_last=5)
    run.write_bytes("checkpoints/step-6/state.json", b"half written")  # a save killed before its marker
    assert checkpoint.latest(run, world) == 4
    checkpoint.save(run, world, 8, lambda local: (local / "state.json").write_text("8"), keep_last=2)
    assert checkpoint.latest(run, world) == 8
    left = {k.split("/")[0] for k in run.list("checkpoints")}
    assert left == {"step-4", "step-8"}  # step-2 pruned (keepLast 2), step-6 was never committed
    local = checkpoint.download(run, 8, tmp_path / "dl", world)
    assert (local / "state.json").read_text() == "8"


def test_each_rank_downloads_the_shared_files_and_only_its_own_shards(tmp_path):
    run = open_store(f"file://{tmp_path}/store")
    files = ["state.json", "rng-0.pt", "rng-1.pt", "rng-10.pt", "deepspeed/latest",
             "deepspeed/state/mp_rank_00_model_states.pt",
             *(f"deepspeed/state/{prefix}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
               for r in (0, 1, 10) for prefix, kind in (("", "model"), ("bf16_", "optim")))]
    for name in files:
        run.write_bytes(f"checkpoints/step-4/{name}", name.encode())
    run.commit("checkpoints/step-4")
    rank_1 = World(rank=1, size=11, local_rank=1, device=torch.device("cpu"))
    local = checkpoint.download(run, 4, tmp_path / "rank-1", rank_1)
    got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert got == sorted(["state.json", "rng-1.pt", "deepspeed/latest", "deepspeed/state/mp_rank_00_model_states.pt",
                          "deepspeed/state/zero_pp_rank_1_mp_rank_00_model_states.pt",
                          "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])


@pytest.mark.extended(reason=(
    "the only test of hyperparameters.compile: inductor builds C++ kernels, over a minute on 2 cores"))
@pytest.mark.slow
def test_compiled_layers_train_exactly_as_uncompiled_ones_and_keep_their_weight_names(tiny_model, tmp_path):
    # One layer: the first layer's input needs no gradient and the others' do, a graph each; one is
    # enough to check, at half the compile time.
    one_layer = tmp_path / "one-layer"
    AutoModelForCausalLM.from_pretrained(tiny_model, num_hidden_layers=1).save_pretrained(one_layer)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(one_layer)
    ids = torch.randint(5, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(12)) + list(range(20))] * 2)  # two packed conversations a row

    def train(compile_: bool):
        torch.manual_seed(0)
        spec = {"method": "lora", "lora": NO_DROPOUT, "hyperparameters": {"gradientCheckpointing": False,
                                                                         "compile": compile_}}
        model = load_for_training(spec, {"uri": f"file://{one_layer}"}, ONE, torch.float32)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return model, losses

    (plain, expected), (compiled, got) = train(False), train(True)
    assert any(getattr(m, "_compiled_call_impl", None) for m in compiled.modules())
    assert got == pytest.approx(expected, abs=1e-5) and got[-1] < got[0]
    assert trainable_state(compiled).keys() == trainable_state(plain).keys()  # checkpoints and adapters as ever


@pytest.mark.slow
def test_qlora_trains_a_4bit_base_on_cpu_and_its_adapter_reloads(tiny_model, dataset, tmp_path):
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/store", method="qlora", lora=NO_DROPOUT,
                         hyperparameters={"learningRate": 0.005})
    assert task["spec"]["qlora"] == {"quantType": "nf4", "doubleQuantization": True, "dequantizeOnce": "never"}
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert result["finalLoss"] < result["firstLoss"] - 0.3
    assert result["dequantizedOnce"] is False  # the default keeps the weights 4-bit
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, result["adapterUri"][7:])
    assert any("lora_A" in name for name, _ in model.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:])
    assert merged.config.num_hidden_layers == 2 and getattr(merged.config, "quantization_config", None) is None

    # Dequantized once, the same 4-bit-rounded weights: the same run, step for step.
    once = finetune_task(tiny_model, dataset, f"file://{tmp_path}/once", method="qlora", lora=NO_DROPOUT,
                         qlora={"dequantizeOnce": "always"}, hyperparameters={"learningRate": 0.005})
    succeeded(run_finetune(write_task(once, tmp_path)))
    assert _result(once)["dequantizedOnce"] is True
    assert loss_curve(once) == pytest.approx(loss_curve(task), abs=1e-5)
    expected, got = _adapter(task), _adapter(once)
    assert expected.keys() == got.keys() and all(torch.allclose(got[k], expected[k], atol=1e-5) for k in expected)


def test_dora_with_rank_stabilized_scaling_trains_magnitudes_and_merges_into_the_model_it_computes(
        tiny_model, dataset, tmp_path):
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/store",
                         lora={**NO_DROPOUT, "dora": True, "rsLora": True})
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert result["finalLoss"] < result["firstLoss"] - 0.3
    from peft import PeftModel
    adapter = Path(result["adapterUri"][7:])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    # The magnitudes trained: no longer the norms of the base weights' rows they start from.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    q_proj = with_adapter.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # alpha / sqrt(r)
    magnitude = q_proj.lora_magnitude_vector["default"].weight
    assert not torch.allclose(magnitude, torch.linalg.norm(q_proj.base_layer.weight, dim=1), atol=1e-3)
    # The merged model computes what base + adapter does.
    whole = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, whole(ids).logits, atol=1e-4)


def test_qlora_dequantizes_once_where_the_memory_is_there_and_refuses_always_where_it_cannot_fit():
    from llmfactory_runtime.finetune.estimate import KNOWN_SHAPES, Plan, estimate
    from llmfactory_runtime.finetune.model_setup import dequantize_once
    from llmfactory_runtime.task import InvalidTask

    as_lora = estimate(KNOWN_SHAPES["meta-llama/meta-llama-3-8b"], Plan(method="lora", micro_batch=2, seq_len=2048, gpus=1))
    assert 50 < as_lora.total_gib < 65
    assert dequantize_once("auto", as_lora, (79.2, 78.0)) is True  # an H100 of its own
    assert dequantize_once("auto", as_lora, (79.2, 40.0)) is False  # shared: another process holds half
    assert dequantize_once("auto", as_lora, (39.4, 39.0)) is False  # a MIG slice
    assert dequantize_once("auto", as_lora, None) is False  # CPU
    assert dequantize_once("never", as_lora, (79.2, 78.0)) is False
    assert dequantize_once("always", as_lora, (79.2, 40.0)) is True
    assert dequantize_once("always", as_lora, None) is True
    with pytest.raises(InvalidTask, match=r"spec.qlora.dequantizeOnce: always needs ~5\d.\d GiB .* 39.4 GiB .* auto or never"):
        dequantize_once("always", as_lora, (39.4, 39.0))


def test_neftune_adds_noise_within_its_bound_to_the_embeddings_while_training_only(tiny_model):
    def embeddings(alpha: float | None):
        hp = {"gradientCheckpointing": False, **({"neftuneNoiseAlpha": alpha} if alpha else {})}
        model = load_for_training({"method": "lora", "lora": NO_DROPOUT, "hyperparameters": hp},
                                  {"uri": f"file://{tiny_model}"}, ONE, torch.float32)
        return model, model.get_input_embeddings()

    ids = torch.tensor([[5, 17, 42, 99, 7, 8]])
    (_, clean), (model, noisy) = embeddings(None), embeddings(5.0)
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.embedding_dim)  # alpha / sqrt(L x d)
    with torch.no_grad():
        noise = (noisy(ids) - clean(ids)).abs()
        assert noise.max() <= bound * 1.0001 and noise.mean() > bound / 3  # uniform in [-bound, bound]
        model.eval()
        assert torch.equal(noisy(ids), clean(ids))


def _kept_for_backward(tiny_model, spec: dict, tokens_per_row: int = 64) -> int:
    """Bytes autograd holds for backward at the end of a bf16 forward (two rows of packed
    conversations), the weights themselves not counted."""
    ids = torch.randint(5, 100, (2, tokens_per_row), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(24)) + list(range(tokens_per_row - 24))] * 2)
    spec = {"hyperparameters": {"gradientCheckpointing": False}, "qlora": {"quantType": "nf4", "doubleQuantization": True},
            **spec}
    model = load_for_training(spec, {"uri": f"file://{tiny_model}"}, ONE, torch.bfloat16)
    weights = {p.data_ptr() for p in model.parameters()}
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in saved) if t is not None}
    loss.backward()
    return sum(alive.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_keeps_for_backward_exactly_what_lora_keeps(tiny_model, dropout):
    # What the memory estimate assumes: the 4-bit layers save nothing of their own, and nothing runs
    # in fp32 that LoRA runs in bf16 (with peft's fp32 upcast QLoRA kept 8-21% more here).
    lora = {**NO_DROPOUT, "dropout": dropout}
    assert _kept_for_backward(tiny_model, {"method": "qlora", "lora": lora}) == \
        _kept_for_backward(tiny_model, {"method": "lora", "lora": lora}) > 0


def test_adapters_run_in_the_training_dtype_and_keep_less_for_backward_than_a_full_fine_tune(tiny_model):
    # peft keeps adapters in fp32: each adapted layer then cast its bf16 input up and multiplied in
    # fp32, and autograd kept the fp32 copies, 1.3x what a full fine-tune keeps here (on an H200 about
    # a third of LoRA's GPU time went to those casts and fp32 matmuls). The optimizer steps fp32
    # master copies instead (test_16_bit_lora_steps_fp32_master_weights_and_moves_as_fp32_does).
    spec = {"method": "lora", "lora": NO_DROPOUT, "hyperparameters": {"gradientCheckpointing": False}}
    model = load_for_training(spec, {"uri": f"file://{tiny_model}"}, ONE, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert _kept_for_backward(tiny_model, {"method": "lora", "lora": NO_DROPOUT}) \
        < _kept_for_backward(tiny_model, {"method": "full"})


@pytest.mark.parametrize("method", ["lora", "full"])  # qlora keeps what lora keeps (test above)
def test_the_estimate_counts_what_a_decoder_layer_keeps_for_backward(tiny_model, tmp_path, method):
    """The memory estimate's activations per layer (estimate.py) against what autograd keeps: the same
    model with one layer more keeps one layer's worth more (the loss and the rotary tables are shared)."""
    from llmfactory_runtime.finetune.estimate import estimate, plan_of, shape_from_config

    deeper = tmp_path / "deeper"
    shutil.copytree(tiny_model, deeper)
    config = json.loads((tiny_model / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    spec = {"method": method, "lora": NO_DROPOUT} if method != "full" else {"method": "full"}
    measured = _kept_for_backward(deeper, spec) - _kept_for_backward(tiny_model, spec)
    hp = {"batchSize": 2, "maxSeqLength": 64, "precision": "bf16"}
    shallow, deep = (estimate(shape_from_config(c), plan_of({**spec, "hyperparameters": hp}))
                     for c in (config, {**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    # Within 2%: what is not counted is a vector or two (a norm's fp32 reciprocal, SDPA's logsumexp).
    assert (deep.activations_gib - shallow.activations_gib) * 2 ** 30 == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_estimate_counts_what_dora_keeps_for_backward_beyond_lora(tiny_model, method, dropout):
    from llmfactory_runtime.finetune.estimate import dora_transient, estimate, plan_of, shape_from_config

    lora = {**NO_DROPOUT, "dropout": dropout}
    measured = (_kept_for_backward(tiny_model, {"method": method, "lora": {**lora, "dora": True}})
                - _kept_for_backward(tiny_model, {"method": method, "lora": lora}))
    shape = shape_from_config(json.loads((tiny_model / "config.json").read_text()))
    spec = {"method": method, "hyperparameters": {"batchSize": 2, "maxSeqLength": 64, "precision": "bf16"}}
    lora_plan, dora_plan = plan_of({**spec, "lora": lora}), plan_of({**spec, "lora": {**lora, "dora": True}})
    estimated = (estimate(shape, dora_plan).activations_gib - estimate(shape, lora_plan).activations_gib) * 2 ** 30
    # Within 3%: what is not counted is a few vectors the size of a layer's output.
    assert estimated - dora_transient(shape, dora_plan) == pytest.approx(measured, rel=0.03)


def test_qlora_keeps_its_unquantized_layers_in_the_training_dtype_as_lora_does_and_trains_in_bf16(tiny_model):
    # peft's prepare_model_for_kbit_training would cast the embeddings, norms and head to fp32: twice
    # their memory (2 GiB on Llama-3-8B) and the head's big matmuls at fp32 speed on the GPU.
    def load(method: str):
        spec = {"method": method, "hyperparameters": {"gradientCheckpointing": True}, "lora": NO_DROPOUT,
                "qlora": {"quantType": "nf4", "doubleQuantization": True}}
        return load_for_training(spec, {"uri": f"file://{tiny_model}"}, ONE, torch.bfloat16)

    qlora, lora = load("qlora"), load("lora")
    frozen = {n: p.dtype for n, p in qlora.named_parameters() if not p.requires_grad and p.dtype != torch.uint8}
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert set(frozen.values()) == {torch.bfloat16}
    assert frozen == {n: p.dtype for n, p in lora.named_parameters() if n in frozen}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    optimizer = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(6):
        out = qlora(input_ids=ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3

    # Dequantized once: plain Linear layers, and the very logits of the 4-bit model.
    once = load_for_training({"method": "qlora", "hyperparameters": {"gradientCheckpointing": False}, "lora": NO_DROPOUT,
                              "qlora": {"quantType": "nf4", "doubleQuantization": True}},
                             {"uri": f"file://{tiny_model}"}, ONE, torch.bfloat16, dequantize=True)
    assert not any(p.dtype == torch.uint8 for p in once.parameters())
    four_bit = load("qlora")
    with torch.no_grad():
        assert torch.equal(once(input_ids=ids).logits, four_bit(input_ids=ids).logits)


def test_an_evaluation_on_the_way_changes_no_qlora_gradient(tiny_model):
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel, which has no backward, the
    first time the layer runs in eval mode without gradients, as an evaluation runs it. Only CPUs
    with AVX512-BF16 (this machine's, the CI's) can show it: there, before the fix, no gradient
    passed through the base layers after the first evaluation."""
    spec = {"method": "qlora", "hyperparameters": {"gradientCheckpointing": False}, "lora": NO_DROPOUT,
            "qlora": {"quantType": "nf4", "doubleQuantization": True}}
    model = load_for_training(spec, {"uri": f"file://{tiny_model}"}, ONE, torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = step()
    loss_sums(model, [{"input_ids": list(range(5, 13)), "labels": list(range(5, 13))}], 1, 0)
    assert model.training
    after = step()
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][n], g) for n, g in before[1].items())


@pytest.mark.extended(reason=(
    "test_qlora_trains_a_4bit_base_on_cpu_and_its_adapter_reloads trains QLoRA on the tiny model; this "
    "one on a pretrained GGUF base (SmolLM2, as make demo loads it)"))
@pytest.mark.slow
def test_qlora_on_smollm2_learns_and_its_adapter_reloads_on_the_pretrained_base(tmp_path):
    dataset = write_dataset(tmp_path / "data", train=12, validation=4)
    task = finetune_task(SMOLLM2, dataset, f"file://{tmp_path}/store", method="qlora", mergeAdapter=False,
                         lora={"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
                         hyperparameters={"epochs": 1, "batchSize": 4, "maxSeqLength": 96, "learningRate": 0.002})
    succeeded(run_finetune(write_task(task, tmp_path), timeout=600))
    result = _result(task)
    assert result["finalLoss"] < result["firstLoss"] and "modelUri" not in result
    from peft import PeftModel
    from llmfactory_runtime.models import load_model
    model = PeftModel.from_pretrained(load_model(SMOLLM2), result["adapterUri"][7:])
    assert sum(1 for name, _ in model.named_parameters() if "lora_A" in name) == 2 * 30  # q and v in 30 layers


@pytest.mark.slow
@pytest.mark.deepspeed("ShareMemCommBuilder")
def test_deepspeed_zero3_full_fine_tune_shards_weights_and_saves_the_gathered_model(tiny_model, dataset, tmp_path,
                                                                                   one_process_full):
    """Two processes under ZeRO-3 follow one process's loss curve to its model. The last step's
    checkpoint keeps the shards of the fp32 weights but not Adam's moments (nothing steps after it),
    and a pod stopped after that step resumes there to the same model."""
    one = one_process_full
    zero3 = finetune_task(tiny_model, dataset, f"file://{tmp_path}/zero3", method="full", resources={"gpusPerNode": 2},
                          hyperparameters={**FULL, "gradientAccumulation": 1}, checkpointing={"everySteps": 10},
                          distribution={"strategy": "deepspeed", "zeroStage": 3})
    path = write_task(zero3, tmp_path)
    succeeded(run_finetune(path, processes=2))
    assert loss_curve(zero3) == pytest.approx(loss_curve(one), abs=1e-4)
    expected = AutoModelForCausalLM.from_pretrained(_result(one)["modelUri"][7:]).state_dict()
    gathered = AutoModelForCausalLM.from_pretrained(_result(zero3)["modelUri"][7:]).state_dict()
    assert all(torch.allclose(gathered[k], expected[k], atol=1e-4) for k in expected)
    saved = Path(_result(zero3)["modelUri"][7:]) / "model.safetensors"
    first = load_file(saved)

    run, steps = open_store(zero3["artifactUri"]), _result(zero3)["steps"]
    shard_bytes = {int(p.parts[-4][5:]): p.stat().st_size  # step-N/deepspeed/state/<shard>
                   for p in Path(zero3["artifactUri"][7:], "checkpoints").rglob("zero_pp_rank_0_*optim_states.pt")}
    assert len(shard_bytes) == 2 and shard_bytes[steps] < 0.4 * shard_bytes[min(shard_bytes)]
    unfinished(run, "model")
    succeeded(run_finetune(path, processes=2))
    assert _result(zero3)["resumedFromStep"] == steps
    resumed = load_file(saved)
    assert resumed.keys() == first.keys() and all(torch.equal(resumed[k], first[k]) for k in first)


@pytest.mark.parametrize("processes,spec,message", [
    (1, {"hyperparameters": {"fusedKernels": True}}, "spec.hyperparameters.fusedKernels needs a CUDA GPU"),
    (2, {"hyperparameters": {"fusedKernels": True}}, "spec.hyperparameters.fusedKernels needs a CUDA GPU"),
    (1, {"hyperparameters": {"precision": "fp16"}, "distribution": {"strategy": "deepspeed"}},
     "spec.hyperparameters.precision: fp16 under distribution.strategy deepspeed needs a GPU"),
])
def test_what_needs_a_gpu_on_a_machine_without_cuda_is_an_invalid_task_naming_the_field(tiny_model, dataset, tmp_path,
                                                                                        processes, spec, message):
    # Pods that ask for GPUs (on pods given none the CRD refuses these specs) on a machine without CUDA.
    task = finetune_task(tiny_model, dataset, f"file://{tmp_path}/store", resources={"gpusPerNode": processes}, **spec)
    proc = run_finetune(write_task(task, tmp_path), processes=processes)
    assert proc.returncode == 2  # the Job fails at once (podFailurePolicy), no retries: under torchrun too
    assert message in open_store(task["artifactUri"]).read_json("progress.json")["message"]


@pytest.mark.parametrize("mistake", ["dataset folder", "target module", "no validation split"])
def test_a_mistake_only_the_run_can_see_fails_it_at_once_naming_the_field_and_what_would_do(tiny_model, tmp_path,
                                                                                            mistake):
    """A dataset URI of the folder above the dataset's is not "no train rows" to puzzle over; a
    misspelt target module is not left out in silence (peft adapts the others and says nothing),
    nor is evalEverySteps on a dataset without a validation split (no evaluation at all)."""
    data = write_dataset(tmp_path / "data" / "v1")
    if mistake == "dataset folder":
        spec, message = {}, (f"spec.dataset: file://{tmp_path / 'data'} has no train rows (none of train.jsonl, "
                             "validation.jsonl, test.jsonl there: name the dataset's folder)")
        data = f"file://{tmp_path / 'data'}"
    elif mistake == "no validation split":
        (tmp_path / "data" / "v1" / "validation.jsonl").unlink()
        spec = {"hyperparameters": {"evalEverySteps": 2}}
        message = (f"spec.hyperparameters.evalEverySteps: {data} has no validation conversations (no "
                   "validation.jsonl there, only train.jsonl), to evaluate on")
    else:
        spec = {"lora": {"targetModules": ["q_proj", "gate_prj"]}}
        message = ("spec.lora.targetModules: no module of the model is named gate_prj; its linear layers are "
                   "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or give all-linear)")
    targets = spec.pop("lora", None)  # the planner refuses this one for a base it reads offline (this Llama's)
    task = finetune_task(tiny_model, data, f"file://{tmp_path}/store", **spec)
    if targets:  # as planned for a base it cannot read (an s3:// model): the runtime checks the model's skeleton
        task["spec"]["lora"]["targetModules"] = targets["targetModules"]
    proc = run_finetune(write_task(task, tmp_path))
    assert proc.returncode == 2, proc.stderr  # invalid: the Job is not retried
    assert open_store(task["artifactUri"]).read_json("progress.json")["message"].endswith(message)


SHORT = [("What is the capital of France?", "Paris."), ("Why is the sky blue?", "Scattering."),
         ("Name a sea.", "The Baltic.")]


def _short_answers(data: Path) -> Path:
    """Three questions with answers of a few tokens, over and over: what a model learns to end fast."""
    data.mkdir()
    for split, n in (("train", 48), ("validation", 3)):
        (data / f"{split}.jsonl").write_bytes(dumps_jsonl(
            [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in (SHORT[i % 3] for i in range(n))]))
    return data


@pytest.mark.slow
def test_a_base_model_without_a_chat_template_learns_chatml_markers_as_tokens_and_to_end_its_turn(tmp_path):
    """Mistral-7B-v0.1 and Llama-3-8B base ship no chat template: ChatML's markers become tokens of
    theirs (rows grown, trained in the adapter), so the tuned model ends its turn where the data does,
    through every path that loads it: base + adapter, the QLoRA merge, GGUF."""
    from tests.tiny_model import make_tiny_llama
    from llmfactory_runtime.generate import generate
    from llmfactory_runtime.models import load_model, load_tokenizer
    from llmfactory_runtime.quantize.gguf_export import export
    import gguf

    base = make_tiny_llama(tmp_path / "base", tokenizer="sentencepiece", chat_template=False)
    rows = 656  # the tiny SentencePiece vocabulary: 400 + 256 byte tokens; no <|im_start|> or <|im_end|>
    assert AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().num_embeddings == rows
    data = _short_answers(tmp_path / "data")
    task = finetune_task(base, f"file://{data}", f"file://{tmp_path}/store", method="qlora", lora=NO_DROPOUT,
                         mergeAdapter=True, hyperparameters={"epochs": 3})
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)

    adapter = Path(result["adapterUri"][7:])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    marks = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert marks == [rows, rows + 1] and tokenizer.tokenize("<|im_end|>") == ["<|im_end|>"]
    # The adapter holds the two new rows of the embeddings and of the output layer, not whole matrices.
    weights = _adapter(task)
    assert {k: v.shape for k, v in weights.items() if "lora" not in k} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (2, 64),
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta": (2, 64)}

    # Loaded as a Benchmark loads it (base + adapter) and merged by the run (4-bit base reloaded
    # unquantized): the same trained rows, and short answers that end on <|im_end|>, where the
    # untuned base (its new rows the mean of the others) runs on to max_new_tokens.
    prompts = [[{"role": "user", "content": q}] for q, _ in SHORT]
    untuned = generate(load_model({"uri": f"file://{base}"}).eval(), load_tokenizer({"uri": f"file://{base}"}),
                       prompts, max_new_tokens=24)
    assert not any(a.finished for a in untuned)
    tuned = load_model({"uri": f"file://{base}", "adapterUri": result["adapterUri"]}).eval()
    merged = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:]).eval()
    answers = []
    for model in (tuned, merged):
        head = model.get_output_embeddings().weight
        assert head.shape[0] == rows + 2
        assert torch.allclose(head[rows + 1], weights["base_model.model.lm_head.token_adapter.trainable_tokens_delta"][1])
        answers.append(generate(model, load_tokenizer({"uri": result["adapterUri"]}), prompts, max_new_tokens=24))
        assert all(a.finished and 0 < a.tokens <= 6 for a in answers[-1]), answers[-1]
    assert [a.text for a in answers[0]] == [a.text for a in answers[1]]
    assert rows + 1 in merged.generation_config.eos_token_id  # transformers' generate and vLLM stop there too

    # GGUF: the markers are llama.cpp control tokens of the model's vocabulary.
    export(Path(result["modelUri"][7:]), tmp_path / "tuned.gguf", "f16", "tuned")
    reader = gguf.GGUFReader(tmp_path / "tuned.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == rows + 2
    assert bytes(tokens.parts[tokens.data[rows + 1]]).decode() == "<|im_end|>"
    assert reader.fields["tokenizer.ggml.token_type"].parts[reader.fields["tokenizer.ggml.token_type"].data[rows + 1]][0] \
        == gguf.TokenType.CONTROL


def _llama31_like_base(folder: Path, padding: int) -> tuple[Path, list[int]]:
    """A tiny base shaped as Llama-3.1-8B base ships: the Llama 3 template and its markers in the
    vocabulary, their rows never trained (zeros), and `padding` spare rows beyond the tokenizer, as a
    vocabulary padded to a multiple of 64 has (random: nothing says spare rows are zeros)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmfactory_runtime.chat import TEMPLATES, use_template
    from tests.tiny_model import make_tokenizer

    tok = make_tokenizer(folder, style="sentencepiece", chat_template=False)  # no ChatML markers either
    markers = use_template(tok, *TEMPLATES["llama3"])
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok) + padding, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight[markers] = 1e-24 * torch.randn(len(markers), 64)
    model.save_pretrained(folder)
    return folder, markers


def test_chat_markers_a_base_never_trained_start_at_the_mean_and_an_adapter_trains_them(tmp_path):
    """Llama-3.1-8B base ships the Llama 3 template with <|eot_id|> and the header markers untrained
    (zero rows): an adapter that left them so would never learn to end a turn. Their rows start at the
    trained rows' mean and are trained beside the adapters, as are ChatML's markers where a padded
    vocabulary gives them spare rows rather than new ones."""
    from llmfactory_runtime.chat import end_of_turn, template_of
    from llmfactory_runtime.finetune.model_setup import trained_token_rows
    from llmfactory_runtime.models import tokenizer_for

    base, markers = _llama31_like_base(tmp_path / "base", padding=5)
    source = {"uri": f"file://{base}"}
    original = AutoModelForCausalLM.from_pretrained(base)
    rows = original.get_input_embeddings().num_embeddings
    spec = {"method": "lora", "lora": NO_DROPOUT, "hyperparameters": {"gradientCheckpointing": False}}
    for template, trained in (("model", markers), ("chatml", [rows - 5, rows - 4])):
        tokenizer, added = tokenizer_for(source, template=template_of({"chatTemplate": template}))
        assert added == ([] if template == "model" else trained)  # ChatML's markers take two of the spare rows
        model = load_for_training(spec, source, ONE, torch.float32, tokenizer=tokenizer, added_tokens=added)
        assert trained_token_rows(model) == trained
        assert model.config.vocab_size == rows  # nothing grown: the spare rows were there
        untouched = [i for i in range(rows) if i not in trained]
        for layer, before in (("embed_tokens", original.get_input_embeddings()), ("lm_head", original.get_output_embeddings())):
            weight = model.get_submodule(f"base_model.model.{'model.' if layer == 'embed_tokens' else ''}{layer}")
            start = weight.token_adapter.trainable_tokens_delta["default"]
            assert torch.allclose(start, before.weight[untouched].mean(dim=0).expand(len(trained), -1), atol=1e-6)
        # Trained: an answer's end-of-turn token gets a gradient in the output layer's row.
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                                            return_tensors="pt", return_dict=True)["input_ids"]
        assert end_of_turn(tokenizer) in ids[0].tolist()
        model(input_ids=ids, labels=ids).loss.backward()
        grad = model.get_submodule("base_model.model.lm_head").token_adapter.trainable_tokens_delta["default"].grad
        assert grad[trained.index(end_of_turn(tokenizer))].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.extended(reason=(
    "test_chat_markers_a_base_never_trained_start_at_the_mean_and_an_adapter_trains_them checks in the default "
    "run that the untrained rows start at the mean and get gradients; this one trains to the end"))
def test_a_base_whose_end_of_turn_was_never_trained_learns_to_end_its_turn_on_it(tmp_path):
    """As Llama-3.1-8B base: the Llama 3 template with <|eot_id|> in the vocabulary but its rows zeros.
    A LoRA run trains those rows, and the tuned model ends its answers on <|eot_id|>."""
    from llmfactory_runtime.generate import generate
    from llmfactory_runtime.models import load_model, load_tokenizer

    base, markers = _llama31_like_base(tmp_path / "base", padding=5)
    data = _short_answers(tmp_path / "data")
    task = finetune_task(base, f"file://{data}", f"file://{tmp_path}/store", lora=NO_DROPOUT,
                         hyperparameters={"epochs": 3})
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert {k: v.shape for k, v in _adapter(task).items() if "lora" not in k} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (3, 64),
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta": (3, 64)}
    prompts = [[{"role": "user", "content": q}] for q, _ in SHORT]
    untuned = generate(load_model({"uri": f"file://{base}"}).eval(), load_tokenizer({"uri": f"file://{base}"}),
                       prompts, max_new_tokens=24)
    assert not any(a.finished for a in untuned)
    tuned = load_model({"uri": f"file://{base}", "adapterUri": result["adapterUri"]}).eval()
    answers = generate(tuned, load_tokenizer({"uri": result["adapterUri"]}), prompts, max_new_tokens=24)
    assert all(a.finished and 0 < a.tokens <= 8 for a in answers), answers


# Mistral-7B-Instruct-v0.1's template, in short: user and assistant turns only, alternating.
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.slow
def test_a_template_that_refuses_the_data_is_named_and_chat_template_llama3_renders_it_instead(tmp_path):
    from tests.tiny_model import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", tokenizer="sentencepiece")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = MISTRAL_V01_TEMPLATE
    tokenizer.save_pretrained(base)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 16), ("validation", 2)):
        (data / f"{split}.jsonl").write_bytes(dumps_jsonl(
            [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}]} for q, a in (PAIRS * 2)[:n]]))
    refused = finetune_task(base, f"file://{data}", f"file://{tmp_path}/refused")
    proc = run_finetune(write_task(refused, tmp_path))
    assert proc.returncode == 2  # an invalid task: no retries
    assert ("the model's chat template refuses a conversation of roles system, user, assistant: Conversation roles "
            "must alternate") in open_store(refused["artifactUri"]).read_json("progress.json")["message"]

    task = finetune_task(base, f"file://{data}", f"file://{tmp_path}/store", chatTemplate="llama3", lora=NO_DROPOUT)
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert result["finalLoss"] < result["firstLoss"]
    saved = AutoTokenizer.from_pretrained(result["adapterUri"][7:])  # what a Benchmark or Quantization renders with
    assert saved.apply_chat_template([{"role": "system", "content": "Be brief."}], tokenize=False) == \
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    assert saved.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]) == [656, 657, 658]
    assert {k for k in _adapter(task) if "lora" not in k} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta"}
    merged = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:])
    assert merged.get_input_embeddings().num_embeddings == 659
    assert merged.generation_config.eos_token_id == [2, 658]  # </s> and <|eot_id|>: generate stops at a turn's end

    # Or a template of one's own (Phi-3's markers), saved with the model as Llama 3's is; here on a
    # FineTune's model (fineTuneRef), which the result names, as the next one's planner reads it.
    first = {"objective": "sft", "modelUri": f"file://{base}", "digest": "d", "baseModel": {"uri": "s3://b/m"}}
    own = finetune_task({"fineTuneRef": {"name": "first"}}, f"file://{data}", f"file://{tmp_path}/own", upstream=first,
                        lora=NO_DROPOUT, mergeAdapter=False, **OWN_SPEC)
    succeeded(run_finetune(write_task(own, tmp_path)))  # as promised: baseFineTune among it
    assert _result(own)["baseFineTune"] == "first" and _result(own)["baseModel"] == {"uri": f"file://{base}"}
    saved = AutoTokenizer.from_pretrained(_result(own)["adapterUri"][7:])
    assert saved.apply_chat_template([{"role": "system", "content": "Be brief."}], tokenize=False) == \
        "<|system|>\nBe brief.<|end|>\n"
    assert saved.convert_tokens_to_ids(OWN_SPEC["chatTemplateTokens"]) == [656, 657, 658]


def test_a_base_models_chat_template_arguments_render_what_it_learns_and_is_judged_on(tiny_model, tmp_path):
    """baseModel.chatTemplateKwargs {enable_thinking: false} on Qwen3: the empty <think> block is the
    prompt's, as when Qwen3 answers without reasoning, so the validation loss is the answers' alone as
    those arguments render them; the model saved renders with its template's defaults, and the result
    names the model alone (as the planner promised)."""
    from llmfactory_runtime.chat import render, set_template_kwargs

    from finetune_helpers import qwen3_like

    base = tmp_path / "qwen3-like"
    qwen3_like(tiny_model, base)
    data = write_dataset(tmp_path / "data", train=12, validation=4)
    plain = {"enable_thinking": False}
    task = finetune_task({"uri": f"file://{base}", "chatTemplateKwargs": plain}, data, f"file://{tmp_path}/store",
                         lora=NO_DROPOUT, hyperparameters={"epochs": 1})
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = _result(task)
    assert result["baseModel"] == {"uri": f"file://{base}"}
    merged = Path(result["modelUri"][7:])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    question = [{"role": "user", "content": "2+2?"}]
    assert render(tokenizer, question, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    set_template_kwargs(tokenizer, plain)
    rows = read_split(data, "validation")
    total, count = loss_sums(model, encode_rows(tokenizer, rows, 96), 2, tokenizer.pad_token_id)
    assert total / count == pytest.approx(result["evalLoss"], abs=1e-4)


def _gather_in_process(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    world = World(rank=rank, size=3, local_rank=rank, device=torch.device("cpu"))
    mine = [torch.tensor([1.0, 2.0]), torch.tensor([]), torch.tensor([3.0, 4.0, 5.0])][rank]
    torch.save(world.gather(mine), f"{out}-{rank}.pt")
    dist.destroy_process_group()


def test_gathered_values_are_every_processs_in_rank_order_whatever_their_lengths(tmp_path):
    """World.gather (grpo.topEntropyQuantile ranks the entropies of every process's answer tokens):
    three gloo processes with two, none and three values each get all five, in rank order."""
    torch.multiprocessing.spawn(_gather_in_process, args=(str(tmp_path / "store"), str(tmp_path / "got")), nprocs=3)
    for rank in range(3):
        assert torch.load(tmp_path / f"got-{rank}.pt").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
