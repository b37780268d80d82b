"""FineTune: LoRA or full fine-tuning with loss on assistant tokens only.

A plain loop, top to bottom: data -> model -> optimizer -> epochs of steps -> evaluate -> save.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from ..batching import collate, encode_rows, mean_loss
from ..data import read_split
from ..digests import sha256_files
from ..models import load_model, load_tokenizer
from ..progress import Progress
from ..store import Store
from ..task import InvalidTask


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then linear decay to zero."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec, inputs = task["spec"], task["inputs"]
    hp = spec["hyperparameters"]
    torch.manual_seed(hp["seed"])

    # Data
    progress.stage("loading data and model")
    dataset = inputs["dataset"]
    train_rows, val_rows = read_split(dataset["uri"], "train"), read_split(dataset["uri"], "validation")
    if not train_rows:
        raise InvalidTask(f"dataset {dataset['uri']} has no train rows")
    model = load_model(inputs["baseModel"])
    tokenizer = load_tokenizer(inputs["baseModel"])
    train = encode_rows(tokenizer, train_rows, hp["maxSeqLength"])
    val = encode_rows(tokenizer, val_rows, hp["maxSeqLength"])
    if not train:
        raise InvalidTask("no train conversation has an assistant token within maxSeqLength")

    # Model
    if spec["method"] == "lora":
        lora = spec["lora"]
        targets = lora["targetModules"]
        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                            target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. a target module the architecture does not have
            raise InvalidTask(f"spec.lora.targetModules: {exc}") from None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    # Optimizer and schedule
    micro, accum = hp["batchSize"], hp["gradientAccumulation"]
    steps_per_epoch = math.ceil(len(train) / (micro * accum))
    total_steps = steps_per_epoch * hp["epochs"]
    optimizer = torch.optim.AdamW(params, lr=hp["learningRate"], weight_decay=hp["weightDecay"])
    warmup = int(total_steps * hp["warmupRatio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))

    # Train
    progress.stage("training", total=total_steps, unit="steps")
    losses: list[tuple[int, int, float, float]] = []  # step, epoch, loss, lr
    step, tokens, started = 0, 0, time.time()
    for epoch in range(hp["epochs"]):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp["seed"] + epoch)).tolist()
        for first in range(0, len(order), micro * accum):
            chunk = order[first:first + micro * accum]
            step_loss = 0.0
            micro_batches = [chunk[i:i + micro] for i in range(0, len(chunk), micro)]
            for indices in micro_batches:
                batch = collate([train[i] for i in indices], tokenizer.pad_token_id, model.device)
                loss = model(**batch).loss / len(micro_batches)
                loss.backward()
                step_loss += float(loss)
                tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, hp["maxGradNorm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = scheduler.get_last_lr()[0]
            losses.append((step, epoch, step_loss, lr))
            rate = tokens / max(time.time() - started, 1e-9)
            progress.update(step, figure=f"loss {step_loss:.3f}", loss=round(step_loss, 4),
                            learningRate=lr, epoch=epoch, tokensPerSecond=round(rate, 1))
    wall = time.time() - started

    progress.stage("evaluating")
    eval_loss = mean_loss(model, val, micro, tokenizer.pad_token_id)

    # Save
    progress.stage("saving")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if spec["method"] == "lora":
            model.save_pretrained(out / "adapter")
            tokenizer.save_pretrained(out / "adapter")
            run.upload_dir(out / "adapter", "adapter")
            result["adapterUri"] = run.child("adapter").uri
        # Benchmark and Quantization need a whole model: the adapter merged into its base.
        full = model.merge_and_unload() if spec["method"] == "lora" else model
        full.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        (out / "model" / "README.md").write_text(_model_card(task, eval_loss, losses))
        result["digest"] = "sha256:" + sha256_files(sorted((out / "model").glob("*.safetensors")))
        run.upload_dir(out / "model", "model")
    run.write_bytes("metrics/loss.csv", ("step,epoch,loss,learning_rate\n" + "".join(
        f"{s},{e},{loss:.6f},{lr:.8g}\n" for s, e, loss, lr in losses)).encode())

    # Means over up to ten steps: one step's loss depends too much on which rows it drew.
    first = [loss for _, _, loss, _ in losses[:10]]
    last = [loss for _, e, loss, _ in losses if e == hp["epochs"] - 1][-10:]
    return {
        **result,
        "modelUri": run.child("model").uri,
        "baseModel": inputs["baseModel"],
        "datasetUri": dataset["uri"],
        "datasetFormat": dataset["format"],
        "datasetDigest": dataset["digest"],
        "firstLoss": round(sum(first) / len(first), 4),
        "finalLoss": round(sum(last) / len(last), 4),
        "evalLoss": round(eval_loss, 4) if eval_loss is not None else None,
        "steps": step,
        "trainTokens": tokens,
        "tokensPerSecond": round(tokens / max(wall, 1e-9), 1),
        "wallSeconds": round(wall, 2),
    }


def _model_card(task: dict, eval_loss: float | None, losses: list) -> str:
    spec = task["spec"]
    return "\n".join([
        f"# {task['resource']['name']}", "",
        f"Fine-tuned by llmfactory ({spec['method']}) from `{task['inputs']['baseModel']}`.", "",
        f"- dataset: `{task['inputs']['dataset']['uri']}` ({task['inputs']['dataset']['digest']})",
        f"- hyperparameters: `{spec['hyperparameters']}`",
        f"- steps: {len(losses)}; first loss {losses[0][2]:.4f}; last loss {losses[-1][2]:.4f}",
        f"- validation loss: {eval_loss if eval_loss is None else round(eval_loss, 4)}",
        f"- task digest: `{task['digest']}`", "",
    ])
