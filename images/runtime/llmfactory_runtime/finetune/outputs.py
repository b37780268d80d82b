"""What a finished FineTune leaves behind: adapter, merged model, model card, loss curve."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from ..digests import sha256_files
from ..grader import describe
from ..generate import stop_token_ids
from ..models import load_model
from ..store import Store

# step, epoch, loss, learning rate (objective grpo: and the step's mean reward)
HistoryRow = tuple[int, int, float, float] | tuple[int, int, float, float, float]
EvalRow = tuple[int, float]  # step, validation loss (objective grpo: validation mean reward)


def loss_csv(history: list[HistoryRow], evals: list[EvalRow], eval_rewards: list[EvalRow] | None = None) -> bytes:
    """One row a step; eval_loss is empty where the validation split was not evaluated. With rewards
    (objective grpo), also the step's mean reward and the validation prompts' where evaluated."""
    at = {step: f"{loss:.6f}" for step, loss in evals}
    graded = {step: f"{r:.6f}" for step, r in eval_rewards or []}
    lines = ["step,epoch,loss,learning_rate,eval_loss" + (",reward,eval_reward" if eval_rewards is not None else "")]
    if 0 in graded:  # the model before its first step
        lines.append(f"0,,,,,,{graded[0]}")
    for s, e, loss, lr, *reward in history:
        rewarded = f",{reward[0]:.6f},{graded.get(s, '')}" if reward else ""
        lines.append(f"{s},{e},{loss:.6f},{lr:.8g},{at.get(s, '')}{rewarded}")
    return "".join(line + "\n" for line in lines).encode()


def loss_png(history: list[HistoryRow], evals: list[EvalRow], title: str,
             eval_rewards: list[EvalRow] | None = None) -> bytes:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")  # no display in a pod
    from matplotlib import pyplot as plt  # noqa: PLC0415

    if eval_rewards is None:
        fig, loss_ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    else:  # the reward is what GRPO raises; its loss hovers near 0
        fig, (reward_ax, loss_ax) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
        reward_ax.plot([h[0] for h in history], [h[4] for h in history], color="tab:purple", label="train reward")
        if eval_rewards:
            reward_ax.plot([e[0] for e in eval_rewards], [e[1] for e in eval_rewards], "o-", color="tab:green",
                           label="validation reward")
        reward_ax.set_ylabel("mean reward")
        reward_ax.legend(loc="lower right")
        reward_ax.set_title(title)
    steps = [h[0] for h in history]
    loss_ax.plot(steps, [h[2] for h in history], color="tab:blue", label="train loss")
    if evals:
        loss_ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:green", label="validation loss")
        loss_ax.legend(loc="upper right")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss", color="tab:blue")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(steps, [h[3] for h in history], color="tab:orange", alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    if eval_rewards is None:
        loss_ax.set_title(title)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def write_loss_curve(run: Store, history: list[HistoryRow], evals: list[EvalRow], title: str,
                     eval_rewards: list[EvalRow] | None = None) -> str:
    run.write_bytes("metrics/loss.csv", loss_csv(history, evals, eval_rewards))
    run.write_bytes("metrics/loss.png", loss_png(history, evals, title, eval_rewards))
    return run.child("metrics").uri


def model_card(task: dict[str, Any], summary: dict[str, Any]) -> str:
    spec, inputs = task["spec"], task["inputs"]
    base = inputs["baseModel"]
    config = {k: spec[k] for k in ("method", "objective", "dpo", "kto", "grpo", "reward", "lora", "qlora", "hyperparameters",
                                   "distribution") if spec.get(k)}
    objective = spec.get("objective", "sft")
    preferences = {"dpo": "preferences (validation pairs)", "kto": "labelled answers (validation examples)",
                   "reward": "reward model on the validation pairs"}
    return "\n".join([
        f"# {task['resource']['name']}", "",
        f"Fine-tuned by llmfactory ({spec['method']}) from `{base.get('huggingface') or base.get('uri')}`"
        + (f" (`{base['ggufFile']}`)" if base.get("ggufFile") else "") + ".", "",
        "## Data", "",
        f"- dataset: `{inputs['dataset']['uri']}`",
        f"- dataset digest: `{inputs['dataset']['digest']}`", "",
        "## Training", "",
        f"- steps: {summary['steps']} on {summary['processes']} process(es); train tokens {summary['trainTokens']}"
        f" ({summary['realTokenShare']:.0%} of computed positions were real tokens)",
        f"- {objective.upper() + ' loss' if objective != 'sft' else 'loss'}: {summary['firstLoss']} (first steps) -> "
        f"{summary['finalLoss']} (last steps); validation loss {summary['evalLoss']}",
        *([f"- {preferences[objective]}: reward accuracy {summary['rewardAccuracy']}, reward margin "
           f"{summary['rewardMargin']}" + (f" (beta {spec[objective]['beta']})" if objective != "reward" else
                                           " (chosen answers' mean score minus the rejected ones')")]
          if objective in preferences else []),
        *([(f"- grader's mean reward on the validation prompts (greedy answers): {summary['baseReward']} before "
            f"training -> {summary['reward']}" if summary.get("reward") is not None else
            "- no validation prompts: no reward measured")
           + f" (grader: {describe(spec['grpo']['grader'])}; {spec['grpo']['generations']} answers sampled per prompt; "
           f"KL weight beta {spec['grpo']['beta']})"]
          if objective == "grpo" else []),
        *([f"- weights: those of step {summary['bestStep']}, the lowest validation loss"
           + ("; training stopped early (earlyStopping)" if summary.get("stoppedEarly") else "")]
          if summary.get("bestStep") else []),
        f"- throughput: {summary['tokensPerSecond']} tokens/s, wall time {summary['wallSeconds']} s",
        f"- task digest: `{task['digest']}`", "",
        "## Configuration", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
    ])


def save_adapter(model, tokenizer, card: str, out: Path) -> None:
    # Never the whole embedding matrices, which peft would add once they were resized: the new rows
    # are in the adapter (model_setup._token_rows), the rest is the base's.
    model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)


def save_merged(model, tokenizer, card: str, out: Path, method: str, base: dict[str, Any],
                adapter_dir: Path | None, dtype: torch.dtype, head: dict[str, Any] | None = None) -> None:
    """The whole model Benchmark and Quantization (or, a reward model, a grader) load. A 4-bit base
    cannot absorb its adapter exactly, so QLoRA merges into the base reloaded unquantized (as the
    QLoRA authors do), with the head it trained with (model_setup.head_of)."""
    if method == "qlora":
        from peft import PeftModel  # noqa: PLC0415
        unquantized = load_model(base, dtype=dtype, tokenizer=tokenizer, **(head or {}))
        model = PeftModel.from_pretrained(unquantized, adapter_dir)
    merged = model.merge_and_unload() if method in ("lora", "qlora") else model
    merged.config.use_cache = True  # for whoever generates with it
    ends_turns(merged, tokenizer)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)


def ends_turns(model, tokenizer) -> None:
    """The saved generation config stops where our engines stop (generate.stop_token_ids): transformers'
    generate and vLLM, which read it, then end a turn at <|im_end|> too, not only at end-of-sequence."""
    if model.can_generate():
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)


def weights_digest(folder: Path) -> str:
    return "sha256:" + sha256_files(sorted(folder.glob("*.safetensors")))
