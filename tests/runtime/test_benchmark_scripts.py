"""The scripts a GPU session runs (benchmarks/gpu/measure.sh) work against the runtime as it is now:
a device call is short and rare, and a script that a runtime change broke wastes it (the profile
once called the runtime's batching with an old signature and failed only there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _throughput(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune_throughput.py"), "--shape", "tiny",
                           "--seq", "128", "--conversations", "40", "--workdir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_finetune_throughput_profiles_and_measures_both_adapter_methods(tmp_path):
    profile = _throughput(tmp_path, "--methods", "lora,qlora", "--profile", "1")
    for method in ("lora", "qlora"):
        assert f"\n{method}: 1 steps in " in profile  # steady-state tokens/s
    assert profile.count("\nmatmul ") == 2  # and where each one's time went

    rows = tmp_path / "rows.json"
    # A learning rate 10x the default: at the default, one epoch of a random model's QLoRA loss is near
    # flat and once ended a hair above its start (5.947 vs 5.943).
    _throughput(tmp_path, "--methods", "qlora", "--learning-rate", "2e-3", "--json", str(rows))
    (row,) = json.loads(rows.read_text())
    assert row["method"] == "qlora" and row["tokensPerSecond"] > 0 and 0.5 < row["realTokenShare"] <= 1
    assert row["finalLoss"] < row["firstLoss"] and row["estimatedGiB"] > 0
    assert 0.2 < row["peakRssGiB"] < 20  # the run's process: torch and a tiny model
