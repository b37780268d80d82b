"""Local answering on SmolLM2-135M-Instruct (the quickstart's teacher), on the quickstart
DatasetBuild's prompts and settings: one prompt at a time, static batches (transformers'
`generate` with left padding: a batch decodes until its longest answer ends), continuous batching
(a finished answer hands its place to the next prompt at once), and the runtime's choice
(`llmfactory_runtime.generate.generate`: continuous where prompts wait for a place, else one static
batch).

    .venv/bin/python benchmarks/generation_batching.py [--prompts 100] [--max-new-tokens 160] [--batch 16,24]
    .venv/bin/python benchmarks/generation_batching.py --prompts 6 --max-new-tokens 96 --batch 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from llmfactory_runtime.generate import (continuous, generate, generation_config, prompt_ids, stop_token_ids,
                                         to_generation)
from llmfactory_runtime.models import load_model, load_tokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "01-dataset.yaml"


@torch.inference_mode()
def static_batches(model, tokenizer, conversations, max_new_tokens: int, batch: int) -> list:
    """What the runtime did before continuous batching: one left-padded generate per batch."""
    tokenizer.padding_side = "left"
    stop, answers = stop_token_ids(tokenizer), []
    for start in range(0, len(conversations), batch):
        enc = tokenizer.apply_chat_template(conversations[start:start + batch], add_generation_prompt=True,
                                            return_tensors="pt", padding=True, return_dict=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None)
        answers += [to_generation(tokenizer, row, stop) for row in out[:, enc["input_ids"].shape[1]:].tolist()]
    return answers


@torch.no_grad()
def continuous_batches(model, tokenizer, conversations, max_new_tokens: int, batch: int) -> list:
    """Continuous batching, even where every prompt fits in one batch."""
    stop, answers = stop_token_ids(tokenizer), [None] * len(conversations)
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    for i, tokens in continuous(model, prompts, generation_config(tokenizer, max_new_tokens, 0.0), 0, batch):
        answers[i] = to_generation(tokenizer, tokens, stop)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch", default="16,24", help="batch sizes and concurrencies to try")
    parser.add_argument("--one-at-a-time", action="store_true", help="also the unbatched row (slow)")
    args = parser.parse_args()

    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    source = spec["teacher"]["model"]
    system = [{"role": "system", "content": spec["teacher"]["systemPrompt"]}]
    conversations = [system + [{"role": "user", "content": p["text"]}]
                     for p in spec["sources"][0]["inline"][:args.prompts]]
    model, tokenizer = load_model(source), load_tokenizer(source)
    model.eval()
    generate(model, tokenizer, conversations[:2], 4)  # warm-up

    runs = [("one at a time", 1, lambda: generate(model, tokenizer, conversations, args.max_new_tokens, concurrency=1))
            ] if args.one_at_a_time else []
    for b in (int(x) for x in args.batch.split(",")):
        runs.append(("static batches", b, lambda b=b: static_batches(model, tokenizer, conversations,
                                                                      args.max_new_tokens, b)))
        runs.append(("continuous", b, lambda b=b: continuous_batches(model, tokenizer, conversations,
                                                                      args.max_new_tokens, b)))
        if len(conversations) <= b:  # else the runtime's is the continuous row
            runs.append(("the runtime's: one static batch", b, lambda b=b: generate(
                model, tokenizer, conversations, args.max_new_tokens, concurrency=b)))
    print(f"{len(conversations)} prompts, up to {args.max_new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads")
    print("| decoding | batch | seconds | answers/s | tokens/s | same answers as continuous |\n|---|---|---|---|---|---|")
    reference = None
    runs.sort(key=lambda r: r[0] != "continuous")  # continuous first: the others are compared with it
    for name, batch, run in runs:
        began = time.perf_counter()
        answers = run()
        seconds = time.perf_counter() - began
        reference = reference or answers
        same = sum(a.text == r.text for a, r in zip(answers, reference))
        print(f"| {name} | {batch} | {seconds:.1f} | {len(answers) / seconds:.2f} | "
              f"{sum(a.tokens for a in answers) / seconds:.1f} | {same}/{len(answers)} |", flush=True)


if __name__ == "__main__":
    main()
