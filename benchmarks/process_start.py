"""What a runtime process pays before and around its work: a LoRA FineTune of the tests' tiny model
(2 epochs of 64 conversations, the adapter and the merged model saved: mostly imports), run as a
pod runs it (the optional libraries its task does not name left out: llmfactory_runtime.libraries)
and with every installed library, as before (LLMFACTORY_KEEP_LIBRARIES, what a restart for a 4-bit
checkpoint sets). Wall and CPU seconds, the median of N runs each (default 3), each a fresh process
and a fresh artifact store.

    .venv/bin/python benchmarks/process_start.py [runs]
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llmfactory_runtime.libraries import KEEP_ENV  # noqa: E402
from tests.runtime.finetune_helpers import finetune_task, write_dataset, write_task  # noqa: E402
from tests.tiny_model import make_tiny_llama  # noqa: E402

WAYS = {"as a pod runs it": {}, "every installed library (before)": {KEEP_ENV: "1"}}


def timed(task: Path, store: Path, env: dict[str, str]) -> tuple[float, float]:
    shutil.rmtree(store, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmfactory_runtime", "finetune", "--task", str(task)], check=True,
                   capture_output=True, env={**os.environ, **env})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    tmp = Path(tempfile.mkdtemp())
    make_tiny_llama(tmp / "model")
    store = tmp / "store"
    task = write_task(finetune_task(tmp / "model", write_dataset(tmp / "data"), f"file://{store}",
                                    mergeAdapter=True), tmp)
    print(f"{'process':<34} | {'wall s':>6} | {'CPU s':>6}")
    print("-" * 52)
    for way, env in WAYS.items():
        times = [timed(task, store, env) for _ in range(runs)]
        print(f"{way:<34} | {statistics.median(t[0] for t in times):>6.2f} | "
              f"{statistics.median(t[1] for t in times):>6.2f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
