"""python -m llmfactory_runtime.torchrun [torchrun arguments] -m llmfactory_runtime finetune --task ...

torchrun, keeping the runtime's exit code. torchrun itself exits 1 whatever its workers exited
with, and the Job's podFailurePolicy reads the pod's exit code: 2 (invalid task) must fail the Job
at once and 3 (stopped by SIGTERM after a checkpoint) must not count as a failure, for a FineTune
on eight GPUs as for one on a single GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from . import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_TASK, EXIT_OK


def verdict(exit_codes: Iterable[int]) -> int:
    """One exit code for the pod from its failed workers' (a signal's is negative)."""
    codes = set(exit_codes)
    if EXIT_INVALID_TASK in codes:  # every rank reads the same task: one saying so is enough
        return EXIT_INVALID_TASK
    if codes == {EXIT_INTERRUPTED}:
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        return verdict(failure.exitcode for failure in exc.failures.values())
    except SignalException:
        # The pod's SIGTERM reached torchrun (PID 1), which passed it on to the workers and gave them
        # --shutdown-timeout seconds to checkpoint: the next attempt resumes from the last committed one.
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
