"""The runtime entrypoint's contract: what one process of a run may commit."""

from __future__ import annotations

from llmfactory_runtime.__main__ import _execute
from llmfactory_runtime.store import PROGRESS, finished_result, open_store


def test_a_worker_rank_commits_nothing_and_leaves_progress_to_rank_0(tmp_path):
    """torchrun rank > 0 returns no result: it must not mark the run finished while rank 0 still saves."""
    run = open_store(f"file://{tmp_path}/run")
    run.write_json(PROGRESS, {"state": "Running", "stage": "saving"})  # rank 0, uploading

    assert _execute(lambda task, run, progress: None, {}, run) == 0
    assert not run.is_committed() and not run.exists("result.json")
    assert run.read_json(PROGRESS) == {"state": "Running", "stage": "saving"}

    assert _execute(lambda task, run, progress: {"finalLoss": 0.5}, {}, run) == 0  # rank 0, done
    assert finished_result(run) == {"finalLoss": 0.5}
    assert run.read_json(PROGRESS)["state"] == "Succeeded"
