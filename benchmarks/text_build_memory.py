"""A DatasetBuild of format text (continued pre-training documents) on a synthetic corpus: peak
memory (RSS) and wall time of the whole build, as a Job runs it, for several corpus sizes, on one
CPU and on all of this machine's (language detection and the MinHash signatures then run in a
worker process a CPU; their memory is not in the peak, which is the build's own process). Each
build runs in a fresh process, so each peak is its own. "resumed s": the same build stopped once it
has read every document (all its segments saved), then run again: what a restarted pod does again. The corpus is a JSONL file of English and
Russian documents of ~2 KB (a FineWeb page's median is ~2.5 KB), 5% of them exact duplicates;
language detection and the near-duplicate filter are on, as the seed example sets them.

    .venv/bin/python benchmarks/text_build_memory.py [documents ...]   # default: 20000 80000
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = {"en": "the river model data city music light winter garden question answer system story market "
               "mountain forest people history science water energy island bridge railway century".split(),
         "ru": "река модель данные город музыка свет зима сад вопрос ответ система история рынок "
               "гора лес люди наука вода энергия остров мост дорога век".split()}

CHILD = """
import json, os, resource, sys, time
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:int(sys.argv[3])]))  # the CPUs a pod may use
from llmfactory.planner import parse, plan
from llmfactory_runtime.dataset import build
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.store import open_store

doc, store_uri = json.loads(sys.argv[1]), sys.argv[2]
if sys.argv[4:] == ["stop"]:  # stopped once every document is read: what a restarted pod reads again
    from llmfactory_runtime.dataset import corpus
    def stop(*args, **kwargs):
        raise SystemExit(3)  # through the build's with blocks: its worker processes end too
    corpus.sample_per_language = stop
task = plan(parse(doc), lambda *k: None, store_uri)
store = open_store(task["artifactUri"])
start = time.perf_counter()
result = build.run(task, store, Progress(store))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": result["rows"], "dropped": result["dropped"],
                  "digest": result["digest"],
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def corpus(path: Path, documents: int, seed: int = 0) -> int:
    rng, written = random.Random(seed), []
    with path.open("w") as out:
        for i in range(documents):
            if written and rng.random() < 0.05:
                text = rng.choice(written)
            else:
                lang = "en" if i % 3 else "ru"
                text = " ".join(rng.choice(WORDS[lang]) + ("" if rng.random() < 0.8 else str(rng.randrange(10**6)))
                                for _ in range(300))
                if len(written) < 1000:
                    written.append(text)
            out.write(json.dumps({"text": text, "url": f"https://example.org/{i}"}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [20_000, 80_000]
    rows = []
    for documents in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            size = corpus(Path(tmp) / "corpus.jsonl", documents)
            doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "corpus"},
                   "spec": {"sources": [{"uri": f"file://{tmp}/corpus.jsonl"}], "format": "text",
                            "languageDetection": {"candidates": ["en", "ru"]},
                            "filters": {"minAnswerChars": 200, "nearDuplicateThreshold": 0.85},
                            "split": {"validation": 0.01, "test": 0.01}}}
            for cpus in sorted({1, len(os.sched_getaffinity(0))}):
                start = time.perf_counter()
                measured = _build(doc, f"file://{tmp}/store-{cpus}", cpus)
                process_s = time.perf_counter() - start
                # The same build stopped after reading, then resumed from its saved segments.
                subprocess.run([sys.executable, "-c", CHILD, json.dumps(doc), f"file://{tmp}/stopped-{cpus}", str(cpus),
                                "stop"], capture_output=True)
                resumed = _build(doc, f"file://{tmp}/stopped-{cpus}", cpus)
                assert resumed["digest"] == measured["digest"]
                rows.append((documents, size / 2**20, cpus, measured["peak_mib"], measured["seconds"], process_s,
                             resumed["seconds"], sum(measured["rows"].values())))
    print(f"{'documents':>10} | {'corpus MiB':>10} | {'CPUs':>4} | {'peak RSS MiB':>12} | {'build s':>8} | "
          f"{'process s':>9} | {'resumed s':>9} | {'rows written':>12}")
    print("-" * 95)
    for documents, mib, cpus, peak, build_s, process_s, resumed_s, written in rows:
        print(f"{documents:>10} | {mib:>10.0f} | {cpus:>4} | {peak:>12.0f} | {build_s:>8.1f} | {process_s:>9.1f} | "
              f"{resumed_s:>9.1f} | {written:>12}")


def _build(doc: dict, store_uri: str, cpus: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(doc), store_uri, str(cpus)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
