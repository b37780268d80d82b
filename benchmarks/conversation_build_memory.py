"""A DatasetBuild of conversations (format chatml, the sources' own answers, no teacher) on a
synthetic corpus: peak memory (RSS) and wall time of the whole build, as a Job runs it, for several
corpus sizes, on one CPU and on all of this machine's (language detection and the MinHash signatures
then run in a worker process a CPU; their memory is not in the peak, which is the build's own process).
Each build runs in a fresh process (text_build_memory's), so each peak is its own. The
corpus is a JSONL file of English and Russian one-turn conversations of ~2.5 KB (a prompt of
30 words, an answer of 250), language detection (en/ru) and the near-duplicate filter on, as the
seed example sets them; splits 98/1/1, written as JSONL and Parquet.

    .venv/bin/python benchmarks/conversation_build_memory.py [conversations ...]   # default: 20000 80000
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from text_build_memory import CHILD, WORDS


def corpus(path: Path, conversations: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(conversations):
            lang = "en" if i % 3 else "ru"
            prompt = " ".join(rng.choice(WORDS[lang]) + str(rng.randrange(10**6)) for _ in range(30))
            answer = " ".join(rng.choice(WORDS[lang]) for _ in range(250))
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [20_000, 80_000]
    print(f"{'conversations':>13} | {'corpus MiB':>10} | {'CPUs':>4} | {'peak RSS MiB':>12} | {'build s':>8} | "
          f"{'rows written':>12}")
    print("-" * 75)
    for conversations in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            size = corpus(Path(tmp) / "conversations.jsonl", conversations)
            doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "chats"},
                   "spec": {"sources": [{"uri": f"file://{tmp}/conversations.jsonl"}],
                            "languageDetection": {"candidates": ["en", "ru"]},
                            "filters": {"nearDuplicateThreshold": 0.85},
                            "split": {"validation": 0.01, "test": 0.01}}}
            for cpus in sorted({1, len(os.sched_getaffinity(0))}):
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(doc), f"file://{tmp}/store-{cpus}",
                                      str(cpus)], check=True, capture_output=True, text=True).stdout
                measured = json.loads(out.strip().splitlines()[-1])
                print(f"{conversations:>13} | {size / 2**20:>10.0f} | {cpus:>4} | {measured['peak_mib']:>12.0f} | "
                      f"{measured['seconds']:>8.1f} | {sum(measured['rows'].values()):>12}")


if __name__ == "__main__":
    main()
