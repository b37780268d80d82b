"""FineTune throughput: tokens/s, MFU and peak GPU memory of the real runtime, per method.

Builds a random-initialised Llama of a given shape (weights do not change speed), a synthetic
multi-turn dataset, and a FineTune task per method through the planner, then runs
`python -m llmfactory_runtime finetune` on each and prints a table. On CPU, `--shape small`
compares packing with plain padding (and `--hf-trainer` adds transformers' Trainer, padded, on
the same model and data).

    python benchmarks/finetune_throughput.py --shape llama3-8b --methods lora,qlora --seq 2048 --batch 2
    python benchmarks/finetune_throughput.py --shape small --methods lora --packing both --hf-trainer

`--profile N` instead runs N training steps per method in this process under torch.profiler (the
runtime's own model setup and packed batches) and prints where the time goes, by operator and
by kind of work: what to look at before changing anything for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "images" / "runtime"), str(ROOT / "tests")]

from llmfactory.planner import parse, plan  # noqa: E402
from llmfactory_runtime.data import dumps_jsonl  # noqa: E402
from llmfactory_runtime.finetune.estimate import KNOWN_SHAPES, PEAK_FLOPS, ModelShape, estimate, plan_of  # noqa: E402

SHAPES = {
    "llama3-8b": KNOWN_SHAPES["meta-llama/meta-llama-3-8b"],
    "llama3.2-3b": KNOWN_SHAPES["meta-llama/llama-3.2-3b"],  # a full fine-tune that fits one H100 with AdamW
    "small": ModelShape(hidden=512, layers=8, intermediate=1376, vocab=8000, heads=8, kv_heads=4),
    "tiny": ModelShape(hidden=64, layers=2, intermediate=128, vocab=400, heads=4, kv_heads=2),  # the suite's check
}
WORDS = ("the a model learns answers questions in english russian chinese quickly slowly because data "
         "sea sky blue light paris moscow beijing poem river mountain city history science music").split()


def make_model(shape: ModelShape, folder: Path, full_vocab: bool = False) -> None:
    """full_vocab: pad the tokenizer with plain tokens up to the model's vocabulary, so that any id a
    random model generates decodes (generation benchmarks)."""
    import torch
    from tiny_model import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    tokenizer = make_tokenizer(folder, vocab_size=400)
    if full_vocab:
        tokenizer.add_tokens([f" w{i}" for i in range(shape.vocab - len(tokenizer))])
        tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=shape.tied_embeddings, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)


def make_model_elsewhere(shape_name: str, folder: Path) -> None:
    """In a child process, so this one holds no GPU memory while the runs measure theirs."""
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--shape", shape_name, "--make-model", str(folder)], check=True)


def make_dataset(folder: Path, conversations: int, seq: int, seed: int = 0, dpo: bool = False) -> str:
    """Conversations of one to three turns and widely varied length (a few words to about a
    quarter of the sequence per answer), like real chat data; with dpo, preference rows whose
    rejected answer is another answer of the same kind."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = []
    for _ in range(conversations):
        messages = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages += [{"role": "user", "content": text(rng.randint(5, 30))},
                         {"role": "assistant", "content": text(rng.randint(5, max(20, seq // 12)))}]
        rows.append({"prompt": messages[:-1], "chosen": messages[-1:],
                     "rejected": [{"role": "assistant", "content": text(rng.randint(5, max(20, seq // 12)))}]}
                    if dpo else {"messages": messages})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_bytes(dumps_jsonl(rows))
    (folder / "validation.jsonl").write_bytes(dumps_jsonl(rows[:4]))
    return f"file://{folder}"


def task_for(model: Path, dataset: str, store: str, method: str, args, packing: bool,
             optimizer: str = "adamw") -> dict:
    spec = {"baseModel": {"uri": f"file://{model}"}, "dataset": {"uri": dataset}, "method": method,
            "mergeAdapter": False,
            "hyperparameters": {"epochs": 1, "batchSize": args.batch, "maxSeqLength": args.seq, "packing": packing,
                                "learningRate": args.learning_rate,
                                "gradientCheckpointing": args.checkpointing, "warmupRatio": 0.0,
                                "fusedKernels": args.fused_kernels, "compile": args.compile,
                                "optimizer": optimizer},
            "checkpointing": {"everySteps": 100000}, "resources": {"gpusPerNode": 1}}
    if args.dpo:
        spec["objective"] = "dpo"
    if method != "full":
        spec["lora"] = {"r": 16, "alpha": 32, "dropout": args.lora_dropout, "targetModules": ["all-linear"],
                        "dora": args.dora}
    if method == "qlora":
        spec["qlora"] = {"dequantizeOnce": args.qlora_dequantize}
    manifest = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune",
                "metadata": {"name": f"bench-{method}-{'packed' if packing else 'padded'}-{optimizer}"}, "spec": spec}
    return plan(parse(manifest), lambda *key: None, store)


def run_runtime(task: dict, workdir: Path) -> dict:
    """The run's result, with its process's wall time and peak resident memory (the CPU's measure of
    what a run holds; on a GPU the result's peakGpuMemoryGiB is)."""
    path = workdir / f"task-{task['digest'][:12]}.json"
    path.write_text(json.dumps(task))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "images" / "runtime"), os.environ.get("PYTHONPATH", "")])}
    began = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmfactory_runtime", "finetune", "--task", str(path)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"runtime failed:\n{err.read().decode(errors='replace')[-5000:]}")
    result = json.loads(Path(task["artifactUri"][7:], "result.json").read_text())
    result["processSeconds"] = time.time() - began
    result["peakRssGiB"] = usage.ru_maxrss / 2 ** 20  # KiB on Linux
    return result


def run_hf_trainer(model_dir: Path, dataset: str, args) -> dict:
    """transformers' Trainer with a padding collator (what most hand-written scripts do)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.data import read_split

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = encode_rows(tok, read_split(dataset, "train"), args.seq)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    train_args = TrainingArguments(output_dir=str(Path(args.workdir) / "hf"), per_device_train_batch_size=args.batch,
                                   num_train_epochs=1, learning_rate=args.learning_rate, logging_steps=10 ** 6,
                                   save_strategy="no",
                                   report_to=[], bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                                   dataloader_num_workers=0, remove_unused_columns=False,
                                   gradient_checkpointing=args.checkpointing,
                                   gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=train_args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    began = time.time()
    trainer.train()
    seconds = time.time() - began
    real = sum(len(r["input_ids"]) for r in rows)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    positions = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
    return {"tokensPerSecond": real / seconds, "realTokenShare": real / positions, "wallSeconds": seconds,
            "peakGpuMemoryGiB": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None}


# Kinds of work, by the names torch.profiler gives kernels and ops (first match wins).
KINDS = [("attention", ("attention", "flash", "fmha", "efficient_attention", "sdpa")),
         ("4-bit dequantize", ("dequantize", "kdequant")),
         ("matmul", ("gemm", "matmul", "mm", "linear", "addmm", "bmm", "cutlass", "sm90_xmma", "nvjet")),
         ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
         ("optimizer", ("adam", "foreach", "multi_tensor")),
         ("dropout", ("bernoulli", "dropout")),
         ("copy and cast", ("copy", "to_copy", "cat", "contiguous", "clone", "memcpy")),
         ("elementwise", ("mul", "add", "silu", "rsqrt", "pow", "mean", "neg", "elementwise", "vectorized",
                          "reduce", "fill", "where", "index"))]


def profile(task: dict, shape: ModelShape, steps: int) -> None:
    """After a few warm-up steps (where a compiled run compiles), time `steps` training steps of `task`
    (steady-state tokens/s, start-up excluded), then run as many again under torch.profiler and print
    the operators that take the most device time and the split by kind of work."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from llmfactory_runtime.batching import collate_sequences, encode_rows
    from llmfactory_runtime.data import read_split
    from llmfactory_runtime.finetune.distributed import World
    from llmfactory_runtime.finetune.master_weights import MasterWeights
    from llmfactory_runtime.finetune.model_setup import (gpu_memory_gib, load_for_training, parameter_groups,
                                                         qlora_dequantized, training_dtype)
    from llmfactory_runtime.finetune.train import adamw, epoch_rows
    from llmfactory_runtime.models import load_tokenizer

    spec, inputs = task["spec"], task["inputs"]
    hp, micro = spec["hyperparameters"], spec["hyperparameters"]["batchSize"]
    cuda = torch.cuda.is_available()
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cuda" if cuda else "cpu"))
    tokenizer = load_tokenizer(inputs["baseModel"])
    examples = encode_rows(tokenizer, read_split(inputs["dataset"]["uri"], "train"), hp["maxSeqLength"])
    rows = epoch_rows([len(e["input_ids"]) for e in examples], 0, hp, micro, hp["maxSeqLength"])
    groups = [rows[i:i + micro] for i in range(0, len(rows) - micro + 1, micro)]
    warm_up = 6 if hp.get("compile") else 2  # a compiled run compiles a graph per variant it meets
    if len(groups) < 2 * steps + warm_up:
        raise SystemExit(f"--profile {steps} needs {2 * steps + warm_up} batches, the data makes {len(groups)}: "
                         "raise --conversations")
    batches = [collate_sequences(examples, g, tokenizer.pad_token_id, hp["packing"]) for g in groups]
    real = [sum(len(examples[j]["input_ids"]) for row in g for j in row) for g in groups]
    dequantize = qlora_dequantized(spec, shape, plan_of(spec), gpu_memory_gib(world.device)) is not None
    model = load_for_training(spec, inputs["baseModel"], world, training_dtype(hp["precision"], world.device), dequantize,
                              tokenizer=tokenizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # As the runtime steps: a 16-bit full fine-tune through fp32 master weights (the copies timed too).
    master = MasterWeights(named) if MasterWeights.needed([p for _, p in named]) else None
    groups = parameter_groups(model, named, master.params if master else [p for _, p in named], spec)
    optimizer = adamw(hp)(groups, lr=hp["learningRate"], weight_decay=hp["weightDecay"])

    def train(first: int, n: int) -> float:
        began = time.perf_counter()
        for batch in batches[first:first + n]:
            loss = model(**{k: v.to(world.device) for k, v in batch.items()}, use_cache=False).loss
            loss.backward()
            if master:
                master.gradients_up()
            optimizer.step()
            if master:
                master.weights_down()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    train(0, warm_up)
    seconds = train(warm_up, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        train(warm_up + steps, steps)
    device_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    kinds: dict[str, float] = {}
    for e in events:
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # on a GPU, kernels only (their CPU-side ops would count twice)
        if e.is_user_annotation:
            continue  # a named region (Optimizer.step#AdamW.step), whose span on the GPU covers other kernels too
        name = e.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + getattr(e, device_time) / 1e6
    busy = sum(kinds.values())
    label = spec["method"] + (" (dequantized once)" if dequantize else "") + (" compiled" if hp.get("compile") else "")
    print(f"\n{label}: {steps} steps in {seconds:.2f} s after warm-up: {sum(real[warm_up:warm_up + steps]) / seconds:.0f} real "
          f"tokens/s; under the profiler, {'GPU' if cuda else 'CPU'} busy {busy:.2f} s")
    print(f"{'kind of work':<18} {'seconds':>8} {'share':>6}")
    for kind, secs in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<18} {secs:>8.3f} {secs / max(busy, 1e-9):>6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--methods", default="lora")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=120)
    parser.add_argument("--packing", choices=["on", "off", "both"], default="on")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the FineTune default's (speed does not "
                        "depend on it; a check that the loss falls in a few steps of a random model does)")
    parser.add_argument("--dora", action="store_true", help="lora.dora (weight-decomposed LoRA)")
    parser.add_argument("--dpo", action="store_true", help="objective dpo on preference pairs (a row holds "
                                                            "pairs: up to twice --seq tokens)")
    parser.add_argument("--fused-kernels", action="store_true", help="Liger kernels (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="hyperparameters.compile (torch.compile per layer)")
    parser.add_argument("--qlora-dequantize", choices=["auto", "always", "never"], default="never",
                        help="spec.qlora.dequantizeOnce for the qlora runs")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "both"], default="adamw",
                        help="hyperparameters.optimizer (both: each)")
    parser.add_argument("--hf-trainer", action="store_true", help="also run transformers' Trainer (padded, lora)")
    parser.add_argument("--workdir", default="/tmp/llmfactory-bench")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--profile", type=int, metavar="STEPS", help="profile STEPS steps per method instead")
    parser.add_argument("--make-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dpo and (args.profile or args.hf_trainer):
        parser.error("--dpo runs the runtime only: --profile and --hf-trainer train on conversations")
    if args.make_model:
        return make_model(SHAPES[args.shape], Path(args.make_model))

    work = Path(args.workdir)
    shape = SHAPES[args.shape]
    began = time.time()
    make_model_elsewhere(args.shape, work / f"model-{args.shape}")
    print(f"model {args.shape}: {shape.params / 1e9:.2f}B params, ready in {time.time() - began:.0f} s", flush=True)
    dataset = make_dataset(work / f"data-{args.seq}{'-dpo' if args.dpo else ''}", args.conversations, args.seq,
                           dpo=args.dpo)
    optimizers = ["adamw", "adamw8bit"] if args.optimizer == "both" else [args.optimizer]
    if args.profile:
        for method in args.methods.split(","):
            for optimizer in optimizers:
                packing = args.packing != "off"
                profile(task_for(work / f"model-{args.shape}", dataset, f"file://{work}/profile", method, args, packing,
                                 optimizer), shape, args.profile)
        return
    rows = []
    for method in args.methods.split(","):
        for packing in {"on": [True], "off": [False], "both": [True, False]}[args.packing]:
            for optimizer in optimizers:
                task = task_for(work / f"model-{args.shape}", dataset, f"file://{work}/store-{time.time_ns()}", method,
                                args, packing, optimizer)
                est = estimate(shape, plan_of(task["spec"]))
                r = run_runtime(task, work)
                mfu = r["tokensPerSecond"] * est.flops_per_token / PEAK_FLOPS if r.get("peakGpuMemoryGiB") else None
                rows.append({"engine": "llmfactory", "method": method + ("*" if r.get("dequantizedOnce") else ""),
                             "optimizer": optimizer, "packing": packing, "tokensPerSecond": r["tokensPerSecond"],
                             "realTokenShare": r["realTokenShare"], "mfu": mfu,
                             "peakGpuMemoryGiB": r.get("peakGpuMemoryGiB"), "peakRssGiB": r["peakRssGiB"],
                             "estimatedGiB": r["estimate"]["totalGib"], "steps": r["steps"],
                             "trainTokens": r["trainTokens"], "firstLoss": r["firstLoss"], "finalLoss": r["finalLoss"]})
                print(json.dumps(rows[-1]), flush=True)
    if args.hf_trainer:
        r = run_hf_trainer(work / f"model-{args.shape}", dataset, args)
        rows.append({"engine": "hf-trainer", "method": "lora", "optimizer": "adamw", "packing": False, **r})
        print(json.dumps(rows[-1]), flush=True)

    adapters = (f", lora r 16 all-linear dropout {args.lora_dropout}{' dora' if args.dora else ''}"
                if set(args.methods.split(",")) - {"full"} else "")
    print(f"\n{args.shape}, seq {args.seq}, micro-batch {args.batch}, gradient checkpointing {args.checkpointing}"
          f"{adapters}"
          f"{', objective dpo' if args.dpo else ''}, fused kernels {args.fused_kernels}, compile {args.compile}"
          f"{'; qlora* = 4-bit weights dequantized once' if any(r['method'] == 'qlora*' for r in rows) else ''}")
    print(f"{'engine':<11} {'method':<6} {'optimizer':<10} {'packing':<8} {'tokens/s':>10} {'real share':>10} "
          f"{'MFU':>6} {'peak GiB':>9} {'RSS GiB':>8} {'est. GiB':>9} {'loss':>13}")
    for r in rows:
        peak = f"{r['peakGpuMemoryGiB']:.1f}" if r.get("peakGpuMemoryGiB") else "-"
        rss = f"{r['peakRssGiB']:.2f}" if r.get("peakRssGiB") else "-"
        est_gib = f"{r['estimatedGiB']:.1f}" if r.get("estimatedGiB") else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        loss = f"{r['firstLoss']:.2f} -> {r['finalLoss']:.2f}" if r.get("firstLoss") else "-"
        print(f"{r['engine']:<11} {r['method']:<6} {r['optimizer']:<10} {str(r['packing']):<8} "
              f"{r['tokensPerSecond']:>10.0f} {r['realTokenShare']:>10.1%} {mfu:>6} {peak:>9} {rss:>8} {est_gib:>9} "
              f"{loss:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
