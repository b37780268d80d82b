"""Operator latency and memory: N resources applied at once against kmock's emulator.

    .venv/bin/python benchmarks/operator_latency.py [N]

Reports the time from each resource's creation to its Job's creation (median, p95, max), the
time until every Job exists, and the process's resident memory before and after (the emulator
shares the process, so the growth is an upper bound for the operator's)."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from kmock._internal.apps import Server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmfactory.controller.kube import SERVER_ENV  # noqa: E402
from llmfactory.controller.settings import OperatorSettings  # noqa: E402
from tests.operator.harness import Emulator, Operator, declare_resources, objects_of  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def manifest(i: int) -> dict:
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild",
            "metadata": {"name": f"data-{i:04d}", "namespace": "default"},
            "spec": {"sources": [{"inline": [{"text": f"prompt {i}", "language": "en"}]}],
                     "teacher": {"model": {"uri": "file:///models/teacher"}}}}


async def main(n: int) -> None:
    async with Emulator() as server, Server(server):
        declare_resources(server)
        os.environ[SERVER_ENV] = str(server.url).rstrip("/")
        with tempfile.TemporaryDirectory() as store:
            before = rss_mb()
            operator = Operator(OperatorSettings(store_uri=f"file://{store}", poll_seconds=60))
            await operator.start()
            await asyncio.sleep(2)  # let it list and watch
            created: dict[str, float] = {}
            seen: dict[str, float] = {}
            url = f"{server.url}/apis/llmfactory.dev/v1alpha1/namespaces/default/datasetbuilds"
            started = time.monotonic()
            async with aiohttp.ClientSession() as session:
                for i in range(n):
                    body = manifest(i)
                    created[body["metadata"]["name"]] = time.monotonic()
                    async with session.post(url, json=body) as resp:
                        resp.raise_for_status()
            while len(seen) < n and time.monotonic() - started < 600:
                now = time.monotonic()
                for job in objects_of(server, "jobs"):
                    owner = job["metadata"]["ownerReferences"][0]["name"]
                    seen.setdefault(owner, now)
                await asyncio.sleep(0.25)  # the poll itself shares the emulator's event loop
            total = time.monotonic() - started
            after = rss_mb()
            await operator.stop()
    from prometheus_client import REGISTRY  # noqa: PLC0415

    count = REGISTRY.get_sample_value("llmfactory_reconcile_seconds_count", {"kind": "DatasetBuild"}) or 0
    spent = REGISTRY.get_sample_value("llmfactory_reconcile_seconds_sum", {"kind": "DatasetBuild"}) or 0
    latencies = sorted(seen[k] - created[k] for k in seen)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    rows = [("resources applied", f"{n}"), ("Jobs created", f"{len(seen)}"),
            ("creation -> Job, median", f"{statistics.median(latencies):.3f} s"),
            ("creation -> Job, p95", f"{p95:.3f} s"), ("creation -> Job, max", f"{latencies[-1]:.3f} s"),
            ("all Jobs created after", f"{total:.1f} s"),
            ("reconciliations", f"{count:.0f}, mean {1000 * spent / max(count, 1):.0f} ms each"),
            ("RSS before operator", f"{before:.0f} MB"), ("RSS with all resources", f"{after:.0f} MB")]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
