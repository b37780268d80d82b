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


def test_a_worker_rank_that_stops_or_fails_leaves_rank_0s_progress_as_it_is(tmp_path, monkeypatch):
    """On SIGTERM every rank stops at the same checkpoint; rank 0 reports the step, and a worker's own
    (empty) progress written after it would hide the step from the resource's status."""
    from llmfactory_runtime import EXIT_FAILED, EXIT_INTERRUPTED, Interrupted

    run = open_store(f"file://{tmp_path}/run")
    mine = {"state": "Interrupted", "stage": "training", "done": 5, "message": "SIGTERM at step 5"}
    run.write_json(PROGRESS, mine)
    monkeypatch.setenv("RANK", "1")

    def stopped(task, run, progress):
        raise Interrupted("SIGTERM at step 5: checkpoint saved")

    def broken(task, run, progress):
        raise RuntimeError("the collective broke")
    assert _execute(stopped, {}, run) == EXIT_INTERRUPTED and run.read_json(PROGRESS) == mine
    assert _execute(broken, {}, run) == EXIT_FAILED and run.read_json(PROGRESS) == mine
    monkeypatch.setenv("RANK", "0")
    assert _execute(broken, {}, run) == EXIT_FAILED and run.read_json(PROGRESS)["state"] == "Failed"
