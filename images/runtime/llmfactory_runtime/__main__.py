"""python -m llmfactory_runtime <phase> --task PATH_OR_URI

Reads the task, does the phase's work under the task's artifact prefix, writes progress.json
while it works and result.json + COMMITTED when it is done. A task whose result is already
committed is not run again. Exit codes: 0 done, 1 failed (retry may help), 2 invalid task.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from . import EXIT_FAILED, EXIT_INVALID_TASK, EXIT_OK
from .store import TASK, finished_result, open_store, write_result
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

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

    from .progress import Progress  # noqa: PLC0415

    progress = Progress(run)
    phase = importlib.import_module(PHASES[args.phase])  # imports torch: after the cheap checks
    try:
        result = phase.run(task, run, progress)
    except InvalidTask as exc:
        log.error("invalid task: %s", exc)
        progress.finish("Failed", f"InvalidTask: {exc}")
        return EXIT_INVALID_TASK
    except Exception as exc:  # noqa: BLE001 - reported to the operator, then the pod fails
        traceback.print_exc()
        progress.finish("Failed", f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    write_result(run, result)
    progress.finish("Succeeded")
    log.info("result committed at %s", run.uri)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
