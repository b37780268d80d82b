"""The operator as a user sees it: apply manifests, watch them run, read status and Events."""

from __future__ import annotations

import pytest

from tests.e2e.test_local_runner import pipeline
from tests.operator.conftest import phase_is

pytestmark = pytest.mark.asyncio


async def test_four_resources_applied_at_once_run_in_order(cluster, operator, job_controller, tiny_model):
    for manifest in reversed(pipeline(tiny_model)):  # dependents first: they must wait
        await cluster.apply(manifest)
    bench = await cluster.wait_for("Benchmark", "bench", phase_is("Waiting"))
    assert "FineTune ft" in bench["status"]["conditions"][0]["message"]
    for kind, name in (("DatasetBuild", "data"), ("FineTune", "ft"), ("Benchmark", "bench"), ("Quantization", "gguf")):
        obj = await cluster.wait_for(kind, name, phase_is("Succeeded", "Failed"), timeout=240)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        ready = obj["status"]["conditions"][0]
        assert (ready["type"], ready["status"]) == ("Ready", "True")
        assert obj["status"]["result"] and obj["status"]["headline"]
    jobs = cluster.objects("jobs")
    assert len(jobs) == 4
