"""Optional libraries a runtime process imports only where its work uses them. Others import them
whenever they are installed: accelerate imports DeepSpeed at every save_pretrained (~1 s, with
MLflow for its autotuner), peft imports bitsandbytes with itself (~1.7 s, with torch's compiler);
most of a small task's process is imports (benchmarks/process_start.py). So a process runs as if
the ones its task does not name were not installed, and a checkpoint that turns out to need one (a
model saved 4-bit by bitsandbytes) restarts the process with everything: its work resumes as after
any restart of a pod."""

from __future__ import annotations

import os
import sys
from typing import Any

KEEP_ENV = "LLMFACTORY_KEEP_LIBRARIES"  # set by the restart: this process imports as installed


class Needed(Exception):
    """A library this process left out that its work turns out to need: the process restarts."""


def unused(task: dict[str, Any]) -> list[str]:
    """The optional libraries the task does not name: DeepSpeed but for a FineTune's
    distribution.strategy deepspeed; bitsandbytes but for method qlora or optimizer adamw8bit, and
    for a process of several (a torchrun rank could not restart alone)."""
    if os.environ.get(KEEP_ENV):
        return []
    spec = task.get("spec") or {}
    finetune = task.get("phase") == "finetune"
    deepspeed = finetune and (spec.get("distribution") or {}).get("strategy") == "deepspeed"
    quantizes = finetune and (spec.get("method") == "qlora"
                              or (spec.get("hyperparameters") or {}).get("optimizer") == "adamw8bit")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    return [name for name, used in (("deepspeed", deepspeed), ("bitsandbytes", quantizes or ranks > 1)) if not used]


def leave_out(task: dict[str, Any]) -> None:
    """A None in sys.modules is what importlib.util.find_spec, and so every library's
    is-it-installed check, reads as absent."""
    for name in unused(task):
        sys.modules.setdefault(name, None)


def _left_out(name: str) -> bool:
    return name in sys.modules and sys.modules[name] is None


def check_checkpoint(where: str, **kwargs: Any) -> None:
    """Before loading the weights at `where` (a folder or a hub id; from_pretrained's kwargs):
    Needed when they are quantized by a library this process left out."""
    if not _left_out("bitsandbytes"):
        return
    # The config alone (a folder's file, a hub id's from the cache from_pretrained then reads).
    from transformers import PretrainedConfig  # noqa: PLC0415

    settings = PretrainedConfig.get_config_dict(where, **kwargs)[0]
    if (settings.get("quantization_config") or {}).get("quant_method") == "bitsandbytes":
        raise Needed(f"{where} is quantized with bitsandbytes: it needs bitsandbytes, which this process had left out")


def restart(argv: list[str]) -> None:
    """This process again, with every installed library (os.execv: the same pid, so a Job's pod or
    a test's subprocess sees one process)."""
    os.environ[KEEP_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "llmfactory_runtime", *argv])
