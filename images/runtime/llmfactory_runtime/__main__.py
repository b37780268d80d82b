"""python -m llmfactory_runtime <phase> --task PATH_OR_URI [--shard INDEX]

Reads the task, does the phase's work under the task's artifact prefix, writes progress.json
while it works and result.json + COMMITTED when it is done. A task whose result is already
committed is not run again. Exit codes: 0 done, 1 failed (retry may help), 2 invalid task,
3 interrupted by SIGTERM, with what was done saved (the next attempt resumes there).

A sharded DatasetBuild runs as N processes (an Indexed Job's pods), each with --shard: each
does its share under shards/<index>/ and commits it there; whichever finds every shard
committed after its own merges them into the run's result (several may: the merge is
deterministic and writes the same files).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import threading
import traceback

from . import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_TASK, EXIT_OK, Interrupted, cpus, libraries
from .answer_cache import AnswerCache
from .store import SHARDS, TASK, Store, finished_result, open_store, write_result
from .task import InvalidTask, load_task

PHASES = {
    "dataset": "llmfactory_runtime.dataset.build",
    "finetune": "llmfactory_runtime.finetune.train",
    "benchmark": "llmfactory_runtime.benchmark.run",
    "quantize": "llmfactory_runtime.quantize.run",
}

log = logging.getLogger("llmfactory_runtime")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfactory_runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("--task", required=True, help="task.json path, or its s3:// / file:// URI")
    parser.add_argument("--shard", type=int, help="this process's shard of a DatasetBuild with spec.shards > 1 "
                                                  "(0-based; an Indexed Job passes its JOB_COMPLETION_INDEX)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs each request at INFO: a line per teacher or judge answer, per vLLM sampling call.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    try:
        task = load_task(args.task)
    except (InvalidTask, ValueError, OSError) as exc:
        log.error("cannot read task %s: %s", args.task, exc)
        return EXIT_INVALID_TASK
    if task["phase"] != args.phase:
        log.error("task is for phase %r, not %r", task["phase"], args.phase)
        return EXIT_INVALID_TASK

    run = open_store(task["artifactUri"])
    if finished_result(run) is not None:
        log.info("result already committed at %s: nothing to do", run.uri)
        return EXIT_OK
    if not run.exists(TASK):
        run.write_json(TASK, task)

    libraries.leave_out(task)
    try:
        return _run_phase(args, task, run)
    except libraries.Needed as exc:
        log.warning("%s: restarting with every installed library", exc)
        libraries.restart(sys.argv[1:] if argv is None else argv)
        raise  # not reached: the process is replaced


def _run_phase(args: argparse.Namespace, task: dict, run: Store) -> int:
    phase = importlib.import_module(PHASES[args.phase])  # imports torch: after the cheap checks
    _size_thread_pools()
    if args.shard is not None:
        shards = int(task["spec"].get("shards", 1))
        if args.phase != "dataset" or not 0 <= args.shard < shards:
            log.error("--shard %s: the task has %d shard(s) (spec.shards of a DatasetBuild)", args.shard, shards)
            return EXIT_INVALID_TASK
        own = run.child(f"{SHARDS}/{args.shard}")
        if finished_result(own) is None:
            code = _execute(functools.partial(phase.run_shard, shard=args.shard), task, own)
            if code != EXIT_OK:
                return code
        waiting = [i for i in range(shards) if finished_result(run.child(f"{SHARDS}/{i}")) is None]
        if waiting:
            log.info("shard %d committed; shards %s still working, the last of them merges", args.shard, waiting)
            return EXIT_OK
        log.info("every shard committed: merging")
        AnswerCache.forget_held()  # the grader's, held since this shard's work: the other shards' is in the store
    return _execute(phase.run, task, run)


def _size_thread_pools() -> None:
    """As many threads as the pod's CPU limit allows, not one per core of the node: PyTorch's, shared
    by the pod's training processes, and the tokenizers library's (Rust's rayon), which tokenizes a
    FineTune's raw texts while the node's other processes wait (finetune/token_files.py)."""
    import torch  # noqa: PLC0415

    os.environ.setdefault("RAYON_NUM_THREADS", str(cpus.available()))

    threads = cpus.torch_threads()
    if threads is not None and threads != torch.get_num_threads():
        log.info("PyTorch threads: %d (the CPUs this process may use), not %d", threads, torch.get_num_threads())
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _stopped_by_sigterm():
    """SIGTERM (Kubernetes stopping the pod: a preemption, an eviction, a deleted pod) ends the
    work with Interrupted, so the pod exits with 3 and the Job does not count it as a failure.
    Every phase keeps what it has paid for as it goes (answers and verdicts in the answer cache,
    FineTune checkpoints: training takes SIGTERM over itself and stops at a step's end), so
    stopping anywhere loses nothing the next attempt would need. Once only: an `except
    Exception` deep in a library may swallow it, and a second SIGTERM must not cut the
    shutdown short."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (a test calling this from another)
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted("SIGTERM: the pod is being stopped; what was saved so far (answers, checkpoints) "
                          "stays in the store and the next attempt goes on from it")
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# What to change when a phase runs out of GPU memory, by phase.
MEMORY_ADVICE = {
    "finetune": "Lower hyperparameters.batchSize (raise gradientAccumulation to keep the batch) or maxSeqLength, "
                "set hyperparameters.gradientCheckpointing, use method qlora, or more GPUs (resources.gpusPerNode, "
                "distribution.strategy deepspeed).",
    "benchmark": "Lower the batchSize of the part that ran out (judge, perplexity, lmEval, ranking) or "
                 "judge.maxNewTokens, or ask for a larger GPU (resources.gpuMemoryGiB).",
    "dataset": "Lower the local model's batchSize (teacher, preferences, filters, difficulty) or its maxNewTokens, "
               "or ask for a larger GPU (resources.gpuMemoryGiB).",
    "quantize": "Ask for a larger GPU (resources.gpuMemoryGiB), or lower calibrationSamples.",
    None: "Lower the batch size, or ask for a larger GPU.",
}


def _out_of_gpu_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # imported by every phase that can run out; not here to stay cheap
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _first_sentences(message: str, n: int = 3) -> str:
    """torch's "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ... free.", without its
    paragraph of allocator settings."""
    return ". ".join(message.split(". ")[:n]).rstrip(".") + "."


def _execute(work, task: dict, run: Store) -> int:
    """Run one unit of work under `run`: its progress.json while it works, its result + commit
    marker when done; the exit code says whether a retry can help. Work that returns no result is
    a worker of a distributed run (torchrun rank > 0): rank 0 writes the result when it has saved
    everything, so the worker commits nothing (a commit of its own would mark the run finished
    while rank 0 still uploads, and finished for good if rank 0 then died)."""
    from .openai_client import require_keys  # noqa: PLC0415
    from .progress import Progress  # noqa: PLC0415

    # One writer of progress.json per run: a torchrun rank other than 0 that stops (SIGTERM) or fails
    # would overwrite rank 0's steps and figures with its own empty state.
    progress = Progress(run, writes=os.environ.get("RANK", "0") == "0")
    try:
        with _stopped_by_sigterm():
            require_keys(task.get("spec") or {})
            result = work(task, run, progress)
    except libraries.Needed:
        raise  # not the work's failure: main restarts the process
    except InvalidTask as exc:
        log.error("invalid task: %s", exc)
        progress.finish("Failed", f"InvalidTask: {exc}")
        return EXIT_INVALID_TASK
    except Interrupted as exc:
        log.warning("%s", exc)
        progress.finish("Interrupted", str(exc))
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - reported to the operator, then the pod fails
        traceback.print_exc()
        if _out_of_gpu_memory(exc):  # the same batches run out again on a retry: the spec is to change
            advice = MEMORY_ADVICE[task.get("phase")]
            progress.finish("Failed", f"OutOfGPUMemory: {_first_sentences(str(exc))} {advice}")
            return EXIT_INVALID_TASK
        progress.finish("Failed", f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if result is None:
        log.info("this process's share is done; rank 0 commits the result")
        return EXIT_OK
    write_result(run, result)
    progress.finish("Succeeded")
    log.info("result committed at %s", run.uri)
    return EXIT_OK


def _exit(code: int) -> None:
    """Exit with `code`. A worker process of a multi-process run other than rank 0 has written all it
    writes (rank 0 holds the trackers and commits): it skips the interpreter's teardown, whose C++
    destructors (threads of DeepSpeed's and gloo's) can abort a finished process with SIGABRT
    ("terminate called without an active exception", seen once under ZeRO-3 on CPU), which would
    fail a Job whose result rank 0 has committed."""
    if int(os.environ.get("RANK", "0")) > 0:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
