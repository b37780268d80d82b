"""Experiment trackers a FineTune reports to (spec.tracking), besides progress.json.

Each is optional and imported only when asked for; a missing package is an invalid task that
names the field. Keys (W&B) come from the environment, which the Job fills from a Secret.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .. import markdown_cell
from ..task import InvalidTask


def _require(module: str, field: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidTask(f"{field} needs the {module.split('.')[0]} package, which this runtime image lacks") from None


MLFLOW_RUN_ID = "mlflow-run-id"
# A training step's figures as progress.json names them -> as TRL's trainers log them (a sum grader's
# part X, progress.json's reward.X, goes to train/rewards/X).
TRAIN_METRICS = {
    "loss": "train/loss", "learningRate": "train/learning_rate", "tokensPerSecond": "train/tokens_per_second",
    "rewardAccuracy": "train/rewards/accuracy",  # dpo, kto, reward: the step's pairs (examples) preferred
    "reward": "train/reward", "kl": "train/kl", "answerLength": "train/completion_length",  # the rest: grpo
    "truncated": "train/truncated_ratio", "uniformGroups": "train/frac_reward_zero_std", "entropy": "train/entropy",
    "promptsSampled": "train/prompts_sampled", "clipped": "train/clip_ratio", "offPolicyMasked": "train/off_policy_masked",
    "samplerLogpDiff": "sampling/sampling_logp_difference/mean",
    "samplerMasked": "sampling/importance_sampling_ratio/frac_masked",
}


def _markdown(table: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table, texts quoted on one line."""
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    cells = [[markdown_cell(v) if isinstance(v, str) else str(v) for v in row.values()] for row in table]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


class Trackers:
    """Fan-out of metrics to the trackers a spec asks for. Local files (TensorBoard events, an
    offline W&B run) go to `local_dir`, which every checkpoint carries (a resumed run continues
    them) and the caller uploads to the store at the end."""

    def __init__(self, tracking: dict[str, Any], run_name: str, config: dict[str, Any], local_dir: Path):
        self.tensorboard = self.wandb = self.mlflow = None
        self.local_dir = local_dir
        if tracking.get("tensorboard"):
            tb = _require("torch.utils.tensorboard", "spec.tracking.tensorboard")
            self.tensorboard = tb.SummaryWriter(log_dir=str(local_dir / "tensorboard"))
        if tracking.get("wandb"):
            cfg = tracking["wandb"]
            wandb = _require("wandb", "spec.tracking.wandb")
            self.wandb = wandb.init(project=cfg["project"], entity=cfg.get("entity"), mode=cfg.get("mode", "online"),
                                    name=run_name, id=run_name, resume="allow", config=config,
                                    dir=str(local_dir))
        if tracking.get("mlflow"):
            cfg = tracking["mlflow"]
            mlflow = _require("mlflow", "spec.tracking.mlflow")
            mlflow.set_tracking_uri(cfg["trackingUri"])
            mlflow.set_experiment(cfg["experiment"])
            self.mlflow = mlflow
            run_id = local_dir / MLFLOW_RUN_ID
            if run_id.exists():  # restored with a checkpoint: the earlier attempt's run goes on
                mlflow.start_run(run_id=run_id.read_text())
            else:
                run_id.write_text(mlflow.start_run(run_name=run_name).info.run_id)
                mlflow.log_params({k: str(v) for k, v in config.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.tensorboard:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=step)

    def log_step(self, step: int, figures: dict[str, float]) -> None:
        """A training step's figures (progress.json's names), under TRAIN_METRICS' names."""
        self.log(step, {TRAIN_METRICS[k]: v for k, v in figures.items() if k in TRAIN_METRICS}
                 | {f"train/rewards/{k[7:]}": v for k, v in figures.items() if k.startswith("reward.")})

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """grpo.logCompletions' rows (GrpoStep.completions) as a table of the step's answers (prompt,
        completion, reward, advantage), where each tracker shows tables: W&B's `completions` (TRL's
        log_completions), a TensorBoard text (Markdown), an MLflow table artifact completions/step-N.json."""
        table = [{"step": step, "prompt": row["prompt"][-1]["content"], "completion": answer["text"],
                  "reward": answer["reward"], "advantage": answer["advantage"]}
                 for row in rows for answer in row["answers"]]
        if not table:
            return
        if self.tensorboard:
            self.tensorboard.add_text("completions", _markdown(table), step)
        if self.wandb:
            wandb = importlib.import_module("wandb")
            self.wandb.log({"completions": wandb.Table(columns=list(table[0]), data=[list(r.values()) for r in table])},
                           step=step)
        if self.mlflow:
            self.mlflow.log_table({key: [r[key] for r in table] for key in table[0]},
                                  artifact_file=f"completions/step-{step:06d}.json")

    def flush(self) -> None:
        """Local files up to date, for a checkpoint to carry them (the others report as they go)."""
        if self.tensorboard:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()
