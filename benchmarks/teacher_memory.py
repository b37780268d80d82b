"""A DatasetBuild teacher's answering stage (teacher.answer: the answer cache in a file store, the
filters) asking N prompts of an OpenAI-compatible endpoint that answers at once (httpx's
MockTransport, in the process: what is measured is the build's own cost, not a provider's), with
concurrency 64: peak memory (RSS) and wall time, each N in a fresh process.

    .venv/bin/python benchmarks/teacher_memory.py [prompts ...]   # default: 50000 200000
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, os, resource, sys, tempfile, time
import httpx
from llmfactory_runtime import TEACHER_KEY_ENV
from llmfactory_runtime.dataset import teacher
from llmfactory_runtime.dataset.filters import AnswerFilter
from llmfactory_runtime.dataset.sources import Drops
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.store import open_store

os.environ[TEACHER_KEY_ENV] = "sk-benchmark"
n, tmp = int(sys.argv[1]), tempfile.mkdtemp()
reply = {"choices": [{"message": {"content": "An answer of a few words. " * 8}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 12, "completion_tokens": 48}}
prompts = [{"turns": [f"Question {i}: what is worth knowing about item {i}?"], "system": None, "language": "en",
            "answers": None} for i in range(n)]
spec = {"openai": {"baseUrl": "http://teacher.invalid/v1", "model": "m", "concurrency": 64}, "maxNewTokens": 64}
start = time.perf_counter()
rows, usage = teacher.answer(prompts, spec, None, f"file://{tmp}/cache", AnswerFilter({}), Drops(),
                             Progress(open_store(f"file://{tmp}/run")),
                             transport=httpx.MockTransport(lambda request: httpx.Response(200, json=reply)))
assert len(rows) == n and usage.requests == n
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [50_000, 200_000]
    print(f"{'prompts':>8} | {'peak RSS MiB':>12} | {'seconds':>8}")
    print("-" * 35)
    for prompts in sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(prompts)], check=True, capture_output=True,
                             text=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        print(f"{prompts:>8} | {measured['peak_mib']:>12.0f} | {measured['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
