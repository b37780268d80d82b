"""What a runtime process pays before and around its work: a LoRA FineTune of the tests' tiny model
(2 epochs of 64 conversations, the adapter and the merged model saved: mostly imports), run as a
pod runs it, and with DeepSpeed imported as it was before the runtime left the libraries a task
does not use out of the process (`__main__.unused_libraries`), and with bitsandbytes left out too
(what it would save: peft imports it whenever installed; it stays, as a 4-bit checkpoint needs it). Wall and CPU
seconds, the median of N runs each (default 3), each a fresh process and a fresh artifact store.

    .venv/bin/python benchmarks/process_start.py [runs]
"""

from __future__ import annotations

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

from tests.runtime.finetune_helpers import finetune_task, write_dataset, write_task  # noqa: E402
from tests.tiny_model import make_tiny_llama  # noqa: E402

RUN = "import runpy, sys; sys.argv = ['llmfactory_runtime', 'finetune', '--task', sys.argv[1]]; " \
      "runpy.run_module('llmfactory_runtime', run_name='__main__')"
WAYS = {"as a pod runs it": RUN,
        "DeepSpeed imported (as before)": "import deepspeed; " + RUN,
        "bitsandbytes left out too": "import sys; sys.modules['bitsandbytes'] = None; " + RUN}


def timed(code: str, task: Path, store: Path) -> tuple[float, float]:
    shutil.rmtree(store, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(task)], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    tmp = Path(tempfile.mkdtemp())
    make_tiny_llama(tmp / "model")
    store = tmp / "store"
    task = write_task(finetune_task(tmp / "model", write_dataset(tmp / "data"), f"file://{store}",
                                    mergeAdapter=True), tmp)
    print(f"{'process':<36} | {'wall s':>6} | {'CPU s':>6}")
    print("-" * 54)
    for way, code in WAYS.items():
        times = [timed(code, task, store) for _ in range(runs)]
        print(f"{way:<36} | {statistics.median(t[0] for t in times):>6.2f} | "
              f"{statistics.median(t[1] for t in times):>6.2f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
