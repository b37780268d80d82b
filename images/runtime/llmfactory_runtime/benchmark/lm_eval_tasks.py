"""Tasks of EleutherAI's lm-evaluation-harness (multiple-choice suites such as MMLU, ARC,
HellaSwag), offline: the task YAML files and their data come from spec.lmEval.tasksUri, read
with lm_eval's own TaskManager (its --include_path) and scored on the model already loaded
for the benchmark. Data files named in the YAML are relative to that folder."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from ..chat import template_kwargs
from ..task import InvalidTask


def task_folder(uri: str | None) -> Path | None:
    """spec.lmEval.tasksUri on local disk (an s3:// folder is downloaded once into the model cache)."""
    if uri is None:
        return None
    from ..models import locate  # noqa: PLC0415 - the one place that turns a URI into a local folder

    try:
        return Path(locate({"uri": uri}, what="task folder")[0])
    except InvalidTask as exc:
        raise InvalidTask(f"spec.lmEval.tasksUri: {exc}") from None


def metric_name(task: str, key: str) -> str | None:
    """lm_eval's "acc,none" -> "<task>.acc"; a filtered metric keeps its filter ("exact_match_strict")."""
    if "," not in key or "_stderr" in key:
        return None
    metric, filt = key.split(",", 1)
    return re.sub(r"[^\w.]", "_", f"{task}.{metric}" if filt == "none" else f"{task}.{metric}_{filt}")


def evaluate(model, tokenizer, spec: dict[str, Any], tasks_dir: Path | None) -> dict[str, float]:
    """{"<task>.<metric>": value} for every task (and every subtask of a group) in spec.tasks."""
    import lm_eval  # noqa: PLC0415 - only for benchmarks that name lm-eval tasks
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    # A task folder replaces the built-in tasks (their data is on the hub; indexing them takes seconds).
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None, include_defaults=tasks_dir is None)
    unknown = [t for t in spec["tasks"] if not manager.match_tasks([t])]
    if unknown:
        where = f" in {spec['tasksUri']}" if spec.get("tasksUri") else " (set tasksUri to a folder of task YAML)"
        raise InvalidTask(f"spec.lmEval.tasks: no task named {unknown}{where}")
    # The model's chatTemplateKwargs ({enable_thinking: false}) render lm-eval's prompts as every other one.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.get("batchSize", 8), device=str(model.device),
              chat_template_args=template_kwargs(tokenizer))
    # Relative data_files in the YAML resolve against the task folder.
    with contextlib.chdir(tasks_dir) if tasks_dir else contextlib.nullcontext():
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=spec["tasks"], num_fewshot=spec.get("numFewshot"),
                                          limit=spec.get("limit"), task_manager=manager, log_samples=False,
                                          apply_chat_template=spec.get("chatTemplate", False), bootstrap_iters=0,
                                          random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                          fewshot_random_seed=0)
        except FileNotFoundError as exc:  # datasets' "not found" errors too: no retry finds the data
            raise InvalidTask(f"spec.lmEval.tasks: a task's data is not there: {exc} (a task YAML's data_files "
                              "are read relative to tasksUri; a hub dataset needs the hub)") from None
    metrics = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            name = metric_name(task, key)
            if name and isinstance(value, (int, float)):
                metrics[name] = float(value)
    return metrics
