"""Benchmark the DatasetBuild teacher against a rate-limited provider: the test server answers
in a fixed 200 ms and allows 600 requests/min (a token bucket holding a minute's worth, as
OpenAI's limits do; over it, 429 with Retry-After). The build is the real one (planner, answer
cache in a file store, filters) with requestsPerMinute: 600 and concurrency 16; the baseline
asks one prompt at a time.

    .venv/bin/python benchmarks/teacher_rate.py [prompts]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.openai_server

from llmfactory.planner import parse, plan  # noqa: E402
from llmfactory_runtime.dataset import build  # noqa: E402
from llmfactory_runtime.openai_client import TokenBucket  # noqa: E402
from llmfactory_runtime.progress import Progress  # noqa: E402
from llmfactory_runtime.store import open_store  # noqa: E402
from tests.openai_server import OpenAIServer  # noqa: E402

LIMIT, LATENCY = 600, 0.2


def limited(bucket: TokenBucket):
    def reply(request):
        if bucket.wait_time(1) > 0:
            return {"status": 429, "headers": {"Retry-After": f"{bucket.wait_time(1):.2f}"},
                    "error": "Rate limit reached for requests"}
        bucket.take(1)
        return {"text": f"An answer to: {request.last_user}"}
    return reply


def build_once(url: str, prompts: int, concurrency: int, folder: str, tag: str) -> float:
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": tag},
           "spec": {"sources": [{"inline": [{"text": f"{tag} prompt {i}: tell me about item {i}.", "language": "en"}
                                            for i in range(prompts)]}],
                    "filters": {"nearDuplicateThreshold": 0},
                    "teacher": {"openai": {"baseUrl": url, "model": "gpt-4o", "concurrency": concurrency,
                                           "requestsPerMinute": LIMIT, "maxRetries": 20}}}}
    task = plan(parse(doc), lambda *k: None, f"file://{folder}/store")
    store = open_store(task["artifactUri"])
    start = time.perf_counter()
    result = build.run(task, store, Progress(store))
    assert sum(result["rows"].values()) == prompts, result["dropped"]
    return time.perf_counter() - start


def main() -> None:
    prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 1200
    server = OpenAIServer(latency=LATENCY)
    url = server.start()
    with tempfile.TemporaryDirectory() as folder:
        server.reply = limited(TokenBucket(LIMIT))
        wall = build_once(url, prompts, 16, folder, "concurrent")
        ok = sorted(r.delivered_at for r in server.requests if r.status == 200)
        rejected = sum(r.status == 429 for r in server.requests)
        # The bucket starts full (a minute's burst, refilling while it is spent): the sustained
        # rate is measured over the last third of the build, long after the burst.
        first = len(ok) * 2 // 3
        steady = (len(ok) - 1 - first) / (ok[-1] - ok[first]) * 60

        serial_n = 60
        server.requests.clear()
        server.reply = limited(TokenBucket(LIMIT))
        serial = build_once(url, serial_n, 1, folder, "serial")
    server.stop()
    serial_rpm = serial_n / serial * 60
    print(f"{prompts} prompts, {LATENCY * 1000:.0f} ms latency, limit {LIMIT} requests/min, concurrency 16")
    print(f"{'':28} {'value':>10}")
    print(f"{'wall time (s)':28} {wall:>10.1f}")
    print(f"{'sustained requests/min':28} {steady:>10.0f}")
    print(f"{'share of the limit':28} {steady / LIMIT:>10.1%}")
    print(f"{'429s received':28} {rejected:>10}")
    print(f"{'one at a time: requests/min':28} {serial_rpm:>10.0f}")
    print(f"{'speed-up, sustained':28} {steady / serial_rpm:>10.1f}x")
    print(f"{'speed-up, whole build':28} {prompts / serial_rpm * 60 / wall:>10.1f}x")


if __name__ == "__main__":
    main()
