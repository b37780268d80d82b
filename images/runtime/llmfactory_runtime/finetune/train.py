"""FineTune: LoRA, QLoRA or full fine-tuning, loss on assistant tokens only (or DPO on preference
pairs, KTO on answers labelled desirable or not, GRPO on a grader's rewards of sampled answers, or a
reward model on preference pairs), on one process or many.

Read top to bottom: processes -> data -> model -> optimizer -> resume -> steps (checkpoint every N
and on SIGTERM) -> evaluate -> save. The same code runs alone, under torchrun (DDP) and under
DeepSpeed ZeRO; a run killed at any moment resumes from its newest committed checkpoint and ends
with the weights an uninterrupted run would have. What differs by objective lives beside it:
encoding (the data), evaluation, grpo_step (a GRPO step's sampling and figures), preference and
reward_model (the losses).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import Interrupted
from ..chat import check_own_template, template_of
from ..data import SPLITS, dumps_jsonl, no_rows, read_split
from ..grader import reference_fields
from ..models import load_config, tokenizer_for
from ..progress import Progress
from ..store import Store
from ..task import InvalidTask
from . import (checkpoint, distributed, encoding, evaluation, fit, grpo as group_relative, grpo_step, outputs, steps,
               vllm_sampler)
from .estimate import GIB
from .master_weights import MasterWeights
from .model_setup import (check_targets, head_of, load_for_training, load_trainable_state, parameter_groups,
                          trainable_state, trained_token_rows, training_dtype)
from .packing import one_per_row, pack
from ..preference import needs_reference, pair_logps
from .trackers import Trackers

TRACKING = "tracking"  # trackers' local files: in each checkpoint, and under the run at the end
COMPLETIONS = "completions"  # grpo.logCompletions' files, a step each


def lr_lambda(kind: str, warmup: int, total: int, floor: float = 0.0):
    """Linear warmup, then (spec.hyperparameters.lrScheduler) linear or cosine decay to `floor`
    (minLearningRateRatio; unset, zero), or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        left = {"linear": 1.0 - done, "cosine": 0.5 * (1.0 + math.cos(math.pi * done)), "constant": 1.0}[kind]
        return left if kind == "constant" else floor + (1.0 - floor) * left
    return factor


def adamw(hp: dict[str, Any]) -> type[torch.optim.Optimizer]:
    """The optimizer class hyperparameters.optimizer names: PyTorch's AdamW, or bitsandbytes' with its
    moments in 8 bits (adamw8bit), which takes the same parameter groups and settings."""
    if hp.get("optimizer") == "adamw8bit":
        import bitsandbytes as bnb  # noqa: PLC0415 - only for 8-bit moments

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def epoch_rows(lengths: list[int], epoch: int, hp: dict[str, Any], global_batch: int, max_len: int,
               ranks: list[float] | None = None) -> list[list[int]]:
    """The epoch's sequences (each a list of indices of conversations, or of DPO pairs, of these
    lengths), shuffled with the seed and padded by wrapping around to whole steps, so every process
    does the same number of micro-batches. With ranks (grpo.promptOrder easyFirst: the prompts' pass
    rates) the shuffled units are then ordered highest first: a curriculum from the prompts the student
    solves most often to the hardest, every epoch, ties in the shuffle's order."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(hp["seed"] + epoch)).tolist()
    if ranks is not None:
        order.sort(key=lambda i: -ranks[i])  # stable: equal ranks keep the seeded order
    rows = pack(lengths, order, max_len) if hp["packing"] else one_per_row(order)
    short = -len(rows) % global_batch
    return rows + [rows[i % len(rows)] for i in range(short)]


def sigterm_flag() -> threading.Event:
    """Set on SIGTERM, which Kubernetes sends before it kills a pod (preemption, eviction)."""
    flag = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: flag.set())
    return flag


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any] | None:
    world = distributed.init()
    try:
        with tempfile.TemporaryDirectory(prefix="llmfactory-tracking-") as tracking_dir, contextlib.ExitStack() as running:
            return train(task, run, progress, world, Path(tracking_dir), running)  # rank 0's alone writes (see _execute)
    finally:
        distributed.shutdown(world)


def train(task: dict[str, Any], run: Store, progress: Progress, world: distributed.World,
          tracking_dir: Path, running: contextlib.ExitStack) -> dict[str, Any] | None:
    """Train as one process of `world`; rank 0 saves and returns the result, the others None.
    Trackers' local files (TensorBoard, offline W&B) go to `tracking_dir`: in each checkpoint, uploaded at the end.
    What runs beside the training (a vLLM sampler) is stopped with `running`."""
    spec, inputs = task["spec"], task["inputs"]
    hp, dist_spec, ckpt = spec["hyperparameters"], spec["distribution"], spec["checkpointing"]
    objective = spec.get("objective", "sft")
    deepspeed_on = dist_spec["strategy"] == "deepspeed"
    zero3 = deepspeed_on and dist_spec["zeroStage"] == 3
    grpo = spec["grpo"] if objective == "grpo" else None  # its settings
    paired = objective in ("dpo", "kto", "reward")  # examples of two conversations (kto: its own, and a mismatched one)
    referenced = objective == "kto" or objective == "dpo" and needs_reference(spec["dpo"])  # simpo and orpo need none
    unit = encoding.UNITS[objective]
    dtype = training_dtype(hp["precision"], world.device)
    if deepspeed_on and dtype == torch.float16 and world.device.type == "cpu":
        raise InvalidTask("spec.hyperparameters.precision: fp16 under distribution.strategy deepspeed needs a GPU "
                          "(DeepSpeed has no fp16 on CPU); use bf16 or fp32, or strategy ddp")
    # fp16: the loss scaled so that small gradients survive fp16, as HF Trainer and DeepSpeed (which
    # scales its own) do; a step whose gradients overflow is skipped and the scale halved.
    scale_loss = dtype == torch.float16 and not deepspeed_on
    scaler = torch.amp.GradScaler(world.device.type, enabled=scale_loss)
    stop = sigterm_flag()

    # The template is saved with the adapter and the merged model: every later load renders as training did.
    rendered_with = {"chatTemplateKwargs": spec["baseModel"].get("chatTemplateKwargs")}  # not saved with it
    tokenizer, added_tokens = tokenizer_for({**inputs["baseModel"], **rendered_with}, template=template_of(spec))
    if spec.get("chatTemplate") == "jinja":
        check_own_template(tokenizer)
    config = load_config(inputs["baseModel"])  # weights later: first what the config alone can refuse
    budget = fit.check(spec, config, world, dtype, len(added_tokens))
    check_targets(spec, config)

    # Data
    progress.stage("reading and tokenizing the dataset")
    dataset = inputs["dataset"]
    # GRPO's splits, all three: what a Benchmark's reward grader may read its reference from, in
    # whichever split it reads.
    prompt_rows = {split: read_split(dataset["uri"], split) for split in SPLITS} if grpo else {}
    data, val = (encoding.read(spec, tokenizer, dataset["uri"], split, world, run.uri, running, prompt_rows.get(split))
                 for split in ("train", "validation"))
    if not data.rows:
        raise InvalidTask(f"spec.dataset: {no_rows(dataset['uri'], 'train')}")
    references = reference_fields([row for rows in prompt_rows.values() for row in rows]) if grpo else None
    examples = data.examples
    if not examples:
        raise InvalidTask(f"spec.hyperparameters.maxSeqLength: no train {unit} has "
                          + ("room for an answer" if grpo else "an assistant token (or text)") + " within it")
    early = hp.get("earlyStopping")
    select_best = bool(hp.get("selectBest") or early)  # early stopping outputs the best weights, as HF's does
    evaluating = ("earlyStopping" if early else "selectBest" if select_best else
                  "evalEverySteps" if hp.get("evalEverySteps") else None)
    if evaluating and not val.examples:  # else no evaluation at all, and the run would not say so
        why = (no_rows(dataset["uri"], "validation", f"{unit}s") if not val.rows else
               f"{dataset['uri']} has no validation {unit} within maxSeqLength")
        raise InvalidTask(f"spec.hyperparameters.{evaluating}: {why}, to "
                          + ("choose by" if select_best else "evaluate on"))
    micro, accum = hp["batchSize"], hp["gradientAccumulation"]
    global_batch = micro * accum * world.size  # sequences per optimizer step, all processes together
    # grpo.dynamicSampling: a step reads more prompts than it trains on, to replace groups that teach nothing
    oversampling = grpo["dynamicSampling"]["oversampling"] if grpo and grpo.get("dynamicSampling") else 1
    # GRPO's sequences are made in the step (a prompt's answers), so its rows are prompts, one each; a
    # reward model scores a row at its end, so its pairs are never packed.
    per_step = global_batch * oversampling  # rows a step reads
    max_steps = hp.get("maxSteps")
    packed = {**hp, "packing": hp["packing"] and objective not in ("grpo", "reward")}
    epochs: list[list[list[int]]] = []
    steps_per_epoch: list[int] = []

    def more_epochs() -> bool:  # hyperparameters.maxSteps: as many epochs as its steps take, whatever epochs says
        return sum(steps_per_epoch) < max_steps if max_steps else len(epochs) < hp["epochs"]

    while more_epochs():
        epochs.append(epoch_rows(data.lengths, len(epochs), packed, per_step, encoding.unit_length(spec), data.ranks))
        steps_per_epoch.append(len(epochs[-1]) // per_step)
        if not steps_per_epoch[-1]:  # fewer rows than a step reads: no epoch has a step
            break
    total_steps = min(sum(steps_per_epoch), max_steps) if max_steps else sum(steps_per_epoch)
    if hp.get("warmupSteps") is not None and hp["warmupSteps"] >= total_steps:
        raise InvalidTask(f"spec.hyperparameters.warmupSteps: {hp['warmupSteps']} is not fewer than the run's "
                          f"{total_steps} optimizer steps, so the learning rate would never reach its peak: lower "
                          "it, or use warmupRatio")

    sampler = None
    if grpo and grpo["engine"] == "vllm":  # before the model: vLLM takes its share of a GPU still empty
        progress.stage("grpo: starting vLLM to sample the answers")
        sampler = running.enter_context(vllm_sampler.start(inputs["baseModel"], tokenizer, added_tokens, spec,
                                                           budget.estimate, budget.gpu_gib, world.local_rank, dtype))

    # Model: the same initial weights on every process, then each its own dropout stream.
    torch.manual_seed(hp["seed"])
    progress.stage("loading the model" + (" (qlora: 4-bit weights dequantized once, see spec.qlora.dequantizeOnce)"
                                          if budget.dequantize else ""))
    model = load_for_training(spec, inputs["baseModel"], world, dtype, budget.dequantize,
                              head_of(spec, tokenizer.pad_token_id), tokenizer, added_tokens)
    budget = budget.with_token_rows(len(trained_token_rows(model)))  # marker rows seen only in the weights
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # 16-bit trainable weights (adapters too) are stepped as fp32 master weights (master_weights.py);
    # DeepSpeed keeps its own.
    master = MasterWeights(named) if not deepspeed_on and MasterWeights.needed(params) else None
    stepped = master.params if master else params  # what the optimizer updates
    groups = parameter_groups(model, named, stepped, spec)
    torch.manual_seed(hp["seed"] + 1000 * world.rank)
    random.seed(hp["seed"] + world.rank)

    # Optimizer and schedule (DeepSpeed builds its own from the same settings)
    updates_per_step = grpo["iterations"] if grpo else 1  # optimizer steps per step; the schedule counts them
    warmup = (hp["warmupSteps"] * updates_per_step if hp.get("warmupSteps") is not None
              else int(total_steps * updates_per_step * hp["warmupRatio"]))
    schedule = lr_lambda(hp.get("lrScheduler", "linear"), warmup, total_steps * updates_per_step,
                         hp.get("minLearningRateRatio") or 0.0)
    if deepspeed_on:
        import deepspeed  # noqa: PLC0415 - only in images that train with it

        distributed.group_of_one(world)
        config = distributed.deepspeed_config(dist_spec, hp, dtype, world.device.type == "cuda")
        if world.main:
            run.write_json("deepspeed.json", config)  # what ran, for whoever debugs it
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        inner = engine.module
    else:
        optimizer = adamw(hp)(groups, lr=hp["learningRate"], weight_decay=hp["weightDecay"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        engine = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
                  if world.size > 1 else model)
        inner = model

    # Resume from the newest committed checkpoint, if an earlier attempt left one
    state = checkpoint.TrainingState()
    reference: dict[str, torch.Tensor] | None = None  # DPO, KTO: the reference's answer log-probabilities by split

    def restore(step: int, weights_only: bool = False) -> None:
        """The training state saved at `step` (to resume), or only its weights (the best ones, at the end)."""
        nonlocal state, reference
        with tempfile.TemporaryDirectory(prefix="llmfactory-resume-") as tmp:
            local = checkpoint.download(run, step, Path(tmp), world)
            if deepspeed_on:  # collective
                # An adapter's checkpoint lacks the frozen base (save_checkpoint): loaded at the start already.
                # Under ZeRO 2 the module states hold the weights whole: the optimizer's shards are read only
                # to train on (the last step's checkpoint has none); under ZeRO 3 they hold the weights.
                moments = zero3 or not (weights_only or step == total_steps)
                engine.load_checkpoint(str(local / "deepspeed"), tag="state", load_module_strict=spec["method"] == "full",
                                       load_optimizer_states=moments)
            else:
                trained = load_file(local / "trainable.safetensors")
                load_trainable_state(inner, trained)
                if master:
                    master.load(trained)
                if not weights_only and step < total_steps:  # the last step's holds none (save_checkpoint)
                    optimizer.load_state_dict(torch.load(local / "optimizer.pt", weights_only=False))
                    scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=False))
            if weights_only:
                return
            checkpoint.set_rng_state(torch.load(local / f"rng-{world.rank}.pt", weights_only=False))
            saved = json.loads((local / "state.json").read_text())
            if saved.get("lossScale"):
                scaler.load_state_dict(saved["lossScale"])
            state = checkpoint.TrainingState.from_json(saved)
            if grpo and world.main:
                group_relative.resume_grader_usage(grpo["grader"], state.grader_usage)
            if referenced:
                reference = torch.load(local / "reference.pt", weights_only=True)
            if world.main and (local / TRACKING).is_dir():  # the earlier attempts' tracker files: curves go on
                shutil.copytree(local / TRACKING, tracking_dir, dirs_exist_ok=True)

    start = checkpoint.latest(run, world) or 0
    if start:
        progress.stage(f"resuming from checkpoint step {start}")
        restore(start)
    trackers = Trackers(spec["tracking"], task["digest"][:16], spec, tracking_dir) if world.main else None
    share = evaluation.Share(world, zero3)  # what each process evaluates

    if referenced and reference is None:  # before the first step: the model is still the reference
        reference = {}
        for split, encoded in (("train", data), ("validation", val)):
            mine = share.mine(list(range(encoded.units)))
            progress.stage(f"{objective}: the reference model's log-probabilities of the {split} {unit}s",
                           total=len(mine), unit=f"{unit}s")  # rank 0's share
            logps = torch.zeros((encoded.units, 2), dtype=torch.float32)
            logps[mine] = pair_logps(inner, encoded.examples, mine, micro, tokenizer.pad_token_id, world.device,
                                     on_batch=progress.update).cpu()
            reference[split] = logps if zero3 else world.sum_tensor(logps)

    def save_checkpoint(step: int) -> None:
        if grpo:  # collective, as the save
            state.grader_usage = group_relative.grader_usage(grpo["grader"], world.sum_tensor) or {}

        def write(local: Path) -> None:
            if deepspeed_on:  # collective: every rank writes its ZeRO shard
                last = step == total_steps  # nothing steps after it: no optimizer state
                if last and zero3:  # its shards hold the fp32 weights: Adam's moments go (8 of their 12 bytes a
                    engine.optimizer.optimizer.state.clear()  # weight), and their memory before the evaluation
                # Trained weights only, as HF Trainer saves a peft model's: else an adapter's checkpoint holds
                # the whole frozen base (16 GB of an 8B's bf16; SmolLM2: 617 MB, not 78: RESULTS.md).
                engine.save_checkpoint(str(local / "deepspeed"), tag="state", exclude_frozen_parameters=True)
                checkpoint.drop_frozen_weights(local / "deepspeed", inner)
                if last and not zero3:  # ZeRO 2's module states hold the weights whole
                    checkpoint.drop_optimizer_shards(local / "deepspeed")
            elif world.main:
                save_file(master.state() if master else trainable_state(inner), local / "trainable.safetensors")
                if step < total_steps:  # nothing steps after the last: no optimizer state (most of a full fine-tune's)
                    torch.save(optimizer.state_dict(), local / "optimizer.pt")
                    torch.save(scheduler.state_dict(), local / "scheduler.pt")
            if world.main:
                (local / "state.json").write_text(json.dumps(state.to_json(step, scaler.state_dict())))
                if referenced:
                    torch.save(reference, local / "reference.pt")
                trackers.flush()
                shutil.copytree(tracking_dir, local / TRACKING, symlinks=True)  # W&B links its latest run
            torch.save(checkpoint.rng_state(), local / f"rng-{world.rank}.pt")
        progress.update(step, figure=f"saving checkpoint {step}")
        checkpoint.save(run, world, step, write, ckpt["keepLast"],
                        evaluation.best_step(state.evals) if select_best else None)

    def evaluate(step: int) -> float | None:
        """The validation loss (grpo: none; its greedy answers' mean reward in state.rewards)."""
        got = evaluation.validate(spec, inner, tokenizer, val, reference["validation"] if reference else None, share,
                                  world.device, task["cacheUri"])
        if got.rewards:
            state.rewards[step] = got.rewards
        if got.loss is not None:
            state.evals.append((step, got.loss))
        if trackers and got.metrics(objective):
            trackers.log(step, got.metrics(objective))
        return got.loss

    def evaluate_on_the_way(step: int) -> None:
        """At every evalEverySteps-th step (the end has its own evaluation)."""
        every = hp.get("evalEverySteps")
        done = {e[0] for e in state.evals} | state.rewards.keys()
        if every and step % every == 0 and step < total_steps and step not in done:
            progress.update(step, figure="evaluating")
            loss = evaluate(step)
            if loss is not None:
                progress.update(step, figure=f"eval loss {loss:.3f}", evalLoss=round(loss, 4))
            elif grpo and step in state.rewards:
                progress.update(step, figure=f"eval reward {state.rewards[step][0]:.3f}",
                                evalReward=round(state.rewards[step][0], 4))

    def stop_early() -> bool:
        return bool(early) and evaluation.evaluations_without_improvement(
            [e[1] for e in state.evals], early["minDelta"]) >= early["patience"]

    def optimizer_step() -> None:
        """One update from the accumulated gradients: clipped, loss-scaled (fp16), on the master
        weights of 16-bit trainable weights."""
        if master:
            master.gradients_up()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(stepped, hp["maxGradNorm"])
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when the gradients overflowed
        scaler.update()
        if master:
            master.weights_down()
        if scale_loss and scaler.get_scale() < scale:
            state.counters["skippedSteps"] = state.counters.get("skippedSteps", 0) + 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    if grpo and val.examples and 0 not in state.rewards:  # the model before training, to compare the reward with
        progress.stage("grpo: the base model's reward on the validation prompts")
        evaluate(0)

    # grpo: sampled and scored prompts (group_relative.Groups) of micro-batches of prompts
    draw = grpo and functools.partial(group_relative.draw, inner, tokenizer, grpo=grpo, max_len=hp["maxSeqLength"],
                                      device=world.device, cache_uri=task["cacheUri"], sampler=sampler)

    # Train
    progress.stage("training", total=total_steps, unit="steps")
    progress.update(start)
    if start:
        evaluate_on_the_way(start)  # due there, if a SIGTERM cut the last attempt short of it
    step = start  # a new best there already has its checkpoint: the one resumed from
    while step < total_steps and not stop_early():
        step += 1
        began = time.perf_counter()
        epoch, index = _locate(step - 1, steps_per_epoch)
        rows = epochs[epoch][index * per_step:(index + 1) * per_step]
        micro_batches = [rows[i:i + micro] for i in range(0, len(rows), micro)][world.rank::world.size]
        reserve = [examples[i] for group in micro_batches[accum:] for row in group for i in row]  # grpo.dynamicSampling
        micro_batches = micro_batches[:accum]
        # Each micro-batch's loss is its share of the step's, normalized over the whole step on all
        # processes (token-weighted; dpo, kto, reward: pair- or example-weighted); DDP and DeepSpeed
        # average gradients over processes, hence the factor world.size.
        if grpo:  # the step's answers are sampled and scored first: its loss is normalized by all of them
            if sampler:  # all of this process's answers of a round in flight at once: vLLM batches them
                sampler.sync(inner, step)
            prompts = [[examples[i] for row in group for i in row] for group in micro_batches]
            current = grpo_step.GrpoStep(inner, tokenizer, grpo, world, prompts, reserve, draw, micro)
        elif objective == "sft":
            current = steps.SftStep(data, micro_batches, tokenizer.pad_token_id, hp["packing"], world)
        else:
            current = steps.PreferenceStep(spec, inner, data, reference["train"] if reference else None, micro_batches,
                                           tokenizer.pad_token_id, world)
        step_loss = 0.0
        for _ in range(updates_per_step):  # grpo.iterations; else one
            for i, (batch, counts) in enumerate(current.batches):
                batch = {k: v.to(world.device) for k, v in batch.items()}
                last = i == len(current.batches) - 1
                sync = contextlib.nullcontext() if last or world.size == 1 or deepspeed_on else engine.no_sync()
                with sync:
                    loss = current.loss(engine, batch, counts, i)
                    if deepspeed_on:
                        engine.backward(loss * world.size, scale_wrt_gas=False)
                        engine.step()  # steps the optimizer on the last micro-batch only
                    else:
                        scaler.scale(loss * world.size).backward()
                step_loss += float(loss.detach())
                state.counters["tokens"] += float(current.tokens(i))
                state.counters["positions"] += float(batch["input_ids"].numel())
            if not deepspeed_on:  # DeepSpeed's engine.step() updated on the last micro-batch
                optimizer_step()
        step_loss = world.sum(step_loss) / updates_per_step
        lr = scheduler.get_last_lr()[0]
        state.history.append((step, epoch, step_loss, lr, current.mean_reward) if grpo else (step, epoch, step_loss, lr))
        state.counters["seconds"] += time.perf_counter() - began
        rate = world.sum(state.counters["tokens"]) / max(state.counters["seconds"], 1e-9)
        of_step = current.report(updates_per_step)
        progress.update(step, figure=f"reward {current.mean_reward:.3f}" if grpo else f"loss {step_loss:.3f}",
                        loss=round(step_loss, 4), learningRate=lr, epoch=epoch, tokensPerSecond=round(rate, 1), **of_step)
        if trackers:
            trackers.log_step(step, of_step | {"loss": step_loss, "learningRate": lr, "tokensPerSecond": rate}
                              | ({"reward": current.mean_reward} if grpo else {}))
        if grpo and grpo.get("logCompletions"):  # a resumed run writes its steps' again, alike
            wanted = grpo["logCompletions"]  # the first prompts of all processes', in rank order (collective)
            completions = [row for rows in world.gather_objects(current.completions(tokenizer, wanted))
                           for row in rows][:wanted]
            if world.main:
                run.write_bytes(f"{COMPLETIONS}/step-{step:06d}.jsonl", dumps_jsonl(completions))
            if trackers:
                trackers.log_completions(step, completions)

        interrupted = world.any(stop.is_set())
        if not interrupted:  # else the checkpoint first: the grace period is short
            evaluate_on_the_way(step)
        new_best = select_best and evaluation.best_step(state.evals) == step  # its weights may be the ones to output
        # After the last step too (as HF Trainer does): a pod stopped while it evaluates, merges and
        # uploads resumes there, not at the last periodic checkpoint, up to everySteps steps before.
        if interrupted or new_best or step == total_steps or step % ckpt["everySteps"] == 0:
            save_checkpoint(step)
        if interrupted:
            raise Interrupted(f"SIGTERM at step {step}: checkpoint saved, the next attempt resumes there")

    running.close()  # the sampler's share of the GPU back before the evaluation and the merge
    # DeepSpeed scales an fp16 loss itself and counts the steps it skips (kept in its checkpoints).
    skipped = (int(state.counters.get("skippedSteps", 0)) if scale_loss
               else int(engine.skipped_steps) if deepspeed_on and dtype == torch.float16 else None)
    if step == total_steps:  # else stopped early, just after an evaluation
        progress.stage("evaluating")
        evaluate(total_steps)
    best = evaluation.best_step(state.evals) if select_best else None
    if best is not None and best != step:
        progress.stage(f"loading the best weights (step {best})")
        restore(best, weights_only=True)

    # Save (rank 0; a ZeRO-3 model is gathered first, on every rank)
    tokens, positions = world.sum(state.counters["tokens"]), world.sum(state.counters["positions"])
    grader_usage = group_relative.grader_usage(grpo["grader"], world.sum_tensor) if grpo else None
    full_state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if not world.main:
        return None
    if trackers:
        trackers.close()
    # Means over up to ten steps (a third of a short run): one step's loss depends on its rows.
    window = max(1, min(10, len(state.history) // 3))
    first = [h[2] for h in state.history[:window]]
    last = [h[2] for h in state.history[-window:]]
    saved_at = best or step  # the step whose weights are saved
    eval_loss, reward = dict(state.evals).get(saved_at), state.rewards.get(saved_at)
    summary = {
        "firstLoss": round(sum(first) / len(first), 4),
        "finalLoss": round(sum(last) / len(last), 4),
        "evalLoss": round(eval_loss, 4) if eval_loss is not None else None,
        "steps": step,
        "truncatedRows": data.truncated or None,
        "rowsLeftOut": data.unlearned or None,
        "bestStep": best,
        "stoppedEarly": step < total_steps if early else None,
        "rewardAccuracy": round(reward[0], 4) if reward and paired else None,
        "rewardMargin": round(reward[1], 4) if reward and paired else None,
        "reward": round(reward[0], 4) if reward and grpo else None,
        "baseReward": round(state.rewards[0][0], 4) if grpo and 0 in state.rewards else None,
        "processes": world.size,
        "trainTokens": int(tokens),
        "realTokenShare": round(tokens / max(positions, 1), 4),
        "tokensPerSecond": round(tokens / max(state.counters["seconds"], 1e-9), 1),
        "wallSeconds": round(state.counters["seconds"], 2),
        "resumedFromStep": start or None,
        "peakGpuMemoryGiB": round(torch.cuda.max_memory_allocated(world.device) / GIB, 2)
        if world.device.type == "cuda" else None,
        "dequantizedOnce": budget.dequantize if spec["method"] == "qlora" else None,
        "skippedSteps": skipped,
        "graderUsage": grader_usage,
    }
    progress.stage("saving")
    result = _save(task, run, inner, tokenizer, dtype, summary, full_state)
    if trackers and any(trackers.local_dir.iterdir()):
        run.upload_dir(trackers.local_dir, TRACKING)  # TensorBoard events, offline W&B runs
    # Absent rather than null: a merge patch of status drops nulls, and result.json should match it.
    summary = {k: v for k, v in summary.items() if v is not None}
    return {
        **result,
        **summary,
        "baseModel": inputs["baseModel"],
        **({"baseFineTune": ref["name"]} if (ref := task["spec"]["baseModel"].get("fineTuneRef")) else {}),
        "objective": objective,
        "datasetUri": dataset["uri"],
        "datasetFormat": dataset["format"],
        "datasetDigest": dataset["digest"],
        **({"datasetReferenceFields": references} if grpo else {}),
        **({"completionsUri": run.child(COMPLETIONS).uri} if grpo and grpo.get("logCompletions") else {}),
        "lossCurveUri": outputs.write_loss_curve(run, state.history, state.evals, task["resource"]["name"],
                                                 sorted((s, r[0]) for s, r in state.rewards.items()) if grpo else None),
        "estimate": {_camel(k): round(v, 3) for k, v in budget.estimate.as_dict().items()},
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _locate(step_index: int, steps_per_epoch: list[int]) -> tuple[int, int]:
    """(epoch, step within the epoch) of the step_index-th optimizer step."""
    for epoch, n in enumerate(steps_per_epoch):
        if step_index < n:
            return epoch, step_index
        step_index -= n
    raise IndexError(step_index)


def _save(task, run: Store, model, tokenizer, dtype, summary: dict, full_state) -> dict[str, Any]:
    spec, method = task["spec"], task["spec"]["method"]
    card = outputs.model_card(task, summary)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmfactory-save-") as tmp:
        out = Path(tmp)
        if method in ("lora", "qlora"):
            outputs.save_adapter(model, tokenizer, card, out / "adapter")
            run.upload_dir(out / "adapter", "adapter")
            result["adapterUri"] = run.child("adapter").uri
            result["digest"] = outputs.weights_digest(out / "adapter")
        if method == "full" or spec["mergeAdapter"]:
            if full_state is not None and method == "full":
                outputs.ends_turns(model, tokenizer)
                model.save_pretrained(out / "model", state_dict=full_state)
                tokenizer.save_pretrained(out / "model")
                (out / "model" / "README.md").write_text(card)
            else:
                outputs.save_merged(model, tokenizer, card, out / "model", method, task["inputs"]["baseModel"],
                                    out / "adapter", dtype, head_of(spec, tokenizer.pad_token_id))
            run.upload_dir(out / "model", "model")
            result["modelUri"] = run.child("model").uri
            result["digest"] = outputs.weights_digest(out / "model")
    return result

