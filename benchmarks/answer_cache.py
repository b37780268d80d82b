"""The answer cache of a DatasetBuild's teacher (and of every judge and grader) on S3: what a build
of N answers costs in requests and time as it answers, what a restart after a kill (no time to
compact) reads, what the build's end does to fold the answers into packs, and what the next start
reads. Against a local SeaweedFS (`weed mini`, started here, as the tests' fixture does), whose
requests take ~1 ms; at S3's ~20 ms a request, the request counts are what the times scale with.
Answers of ~1.5 KB, put by 16 threads as an API's answers arrive. Then a GRPO run's grader (a reward
model's or an embedding model's scores, a pack of 64 a step) over STEPS steps, and its restart.

    .venv/bin/python benchmarks/answer_cache.py [answers ...]   # default: 5000 20000; STEPS 5000
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llmfactory_runtime.answer_cache import AnswerCache


def _weed(root: Path) -> subprocess.Popen:
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "bench", "credentials": [
        {"accessKey": "bench", "secretKey": "bench-secret"}], "actions": ["Admin", "Read", "Write", "List"]}]}))
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    proc = subprocess.Popen([weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.config={config}", "-master.telemetry=false", "-webdav=false", "-admin.ui=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL="http://127.0.0.1:8333", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench-secret", AWS_REGION="us-east-1")
    import boto3  # noqa: PLC0415

    client = boto3.client("s3")
    for _ in range(120):
        try:
            client.create_bucket(Bucket="answer-cache")
            return proc
        except Exception:  # noqa: BLE001 - the gateway answers a little after the port opens
            time.sleep(0.5)
    raise SystemExit("SeaweedFS did not start")


def _counted(cache: AnswerCache) -> Counter:
    """The S3 requests the cache's client makes, by operation."""
    calls: Counter = Counter()
    cache.store.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


def _timed(step) -> tuple[float, int]:
    start = time.perf_counter()
    calls = step()
    return time.perf_counter() - start, sum(calls.values())


def measure(answers: int) -> dict[str, tuple[float, int]]:
    uri, identity = "s3://answer-cache/cache", {"model": "bench", "answers": answers}
    text = "word " * 300
    cache = AnswerCache(uri, "teacher", identity)
    cache.load()

    def answering() -> Counter:
        calls = _counted(cache)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: cache.put(f"{i:064x}", {"text": text, "tokens": 300, "finished": True}),
                          range(answers)))
        return calls

    def restart() -> Counter:
        again = AnswerCache(uri, "teacher", identity)
        calls = _counted(again)
        assert len(again.load()) == answers
        return calls

    def end() -> Counter:
        calls = _counted(cache)
        cache.compact()
        return calls

    return {"answering": _timed(answering), "restart after a kill": _timed(restart),
            "the build's end (compact)": _timed(end), "restart after the end": _timed(restart)}


STEPS = 5000


def measure_grader(steps: int) -> dict[str, tuple[float, int]]:
    uri, identity = "s3://answer-cache/cache", {"model": "rm", "steps": steps}
    cache = AnswerCache(uri, "grader", identity)
    cache.load()

    def training() -> Counter:
        calls = _counted(cache)
        for step in range(steps):
            cache.put_pack({f"{step:032x}{i:032x}": {"score": i / 64} for i in range(64)})
        return calls

    def restart() -> Counter:
        again = AnswerCache(uri, "grader", identity)
        calls = _counted(again)
        assert len(again.load()) == steps * 64
        return calls

    return {f"grader: {steps} steps": _timed(training), "grader: restart": _timed(restart)}


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [5000, 20000]
    with tempfile.TemporaryDirectory() as tmp:
        weed = _weed(Path(tmp))
        try:
            rows = [(n, step, *cost) for n in sizes for step, cost in measure(n).items()]
            rows += [(STEPS * 64, step, *cost) for step, cost in measure_grader(STEPS).items()]
        finally:
            weed.terminate()
            weed.wait()
    print(f"{'answers':>8} | {'step':<26} | {'seconds':>8} | {'S3 requests':>11}")
    print("-" * 64)
    for n, step, seconds, requests in rows:
        print(f"{n:>8} | {step:<26} | {seconds:>8.1f} | {requests:>11}")


if __name__ == "__main__":
    main()
