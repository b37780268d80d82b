"""The operator as the Helm chart runs it: with peering (replicaCount > 1) and namespaced (Roles only)."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from datetime import datetime, timezone

import kmock
import kopf
import pytest

from tests.e2e.test_local_runner import pipeline
from llmfactory.controller.handlers import replica_priority
from tests.helm import render
from tests.operator.conftest import phase_is
from tests.operator.harness import Operator, objects_of

pytestmark = pytest.mark.asyncio


def declare_peerings(server) -> None:
    verbs = {"list", "watch", "get", "create", "patch"}
    server.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs=verbs)
    server.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(kind="KopfPeering", namespaced=True, verbs=verbs)


async def wait_until(predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not reached in time")


def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


async def test_a_peered_replica_works_within_the_charts_rbac(cluster, operator_settings, job_controller, tiny_model,
                                                            tmp_path):
    """Two replicas in the chart: the operator makes its peering object, keeps it alive, runs a
    resource to the end and deletes its artifacts, and every API call it made on the way is one
    the chart's ClusterRole allows."""
    declare_peerings(cluster.server)
    op = Operator(operator_settings, peering="llmfactory")
    await op.start()
    try:
        peering = await wait_until(lambda: [p for p in objects_of(cluster.server, "clusterkopfpeerings")
                                            if (p.get("status") or {})])
        assert peering[0]["metadata"]["name"] == "llmfactory"
        assert len(peering[0]["status"]) == 1  # this replica, with its priority and lifetime
        data = pipeline(tiny_model)[0]
        data["spec"]["deletionPolicy"] = "Delete"
        await cluster.apply(data)
        obj = await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
        assert obj["status"]["jobName"]
        await cluster.delete("DatasetBuild", "data")
        await wait_until(lambda: not objects_of(cluster.server, "datasetbuilds"))
    finally:
        await op.stop()

    (role,) = [o for o in render("3.18", {"store": {"uri": "s3://bucket/x"}, "replicaCount": 2}, tmp_path)
               if o["kind"] == "ClusterRole"]
    verbs = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch",
             "DELETE": "delete"}
    calls = {(group, f"{plural}/{sub}" if sub else plural, verbs[action])
             for group, plural, sub, action in cluster.server.calls if plural}  # plural None: discovery
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in calls and ("", "events", "create") in calls
    denied = sorted(call for call in calls if not allowed(role["rules"], *call))
    assert denied == [], f"the operator needs these, the chart does not grant them: {denied}"


async def paused(identity: str, alive: dict[str, int]) -> bool:
    """kopf's own decision for one replica that sees these replicas (identity: priority) alive in
    the peering object: does it pause?"""
    from kopf._cogs.aiokits.aiotoggles import Toggle
    from kopf._core.engines.peering import Identity, process_peering_event

    now = datetime.now(timezone.utc).isoformat()
    body = {"metadata": {"name": "llmfactory"},
            "status": {who: {"priority": p, "lifetime": 60, "lastseen": now} for who, p in alive.items()}}
    settings = kopf.OperatorSettings()
    settings.peering.name, settings.peering.priority = "llmfactory", alive[identity]
    conflicts, pressure = Toggle(False), asyncio.Event()
    pressure.set()  # do not sleep until the others' entries expire
    await process_peering_event(raw_event={"type": "MODIFIED", "object": body}, namespace=None, resource=None,
                                identity=Identity(identity), settings=settings, autoclean=False,
                                stream_pressure=pressure, conflicts_found=conflicts)
    return conflicts.is_on()


async def test_two_replicas_draw_priorities_so_that_exactly_one_reconciles():
    """replicaCount: 2 runs two identical replicas. kopf pauses every replica that ties with another
    on priority, which would leave the cluster unserved; each replica draws its own, so the lower
    stands by (and resumes when the higher's entry expires: kopf's peering) and the higher works."""
    first, second = replica_priority(), replica_priority()
    assert first != second
    alive = {"pod-a": first, "pod-b": second}
    lower, higher = sorted(alive, key=alive.get)
    assert await paused(lower, alive) and not await paused(higher, alive)
    # One fixed priority for both, as before: both pause.
    assert await paused("pod-a", {"pod-a": 0, "pod-b": 0}) and await paused("pod-b", {"pod-a": 0, "pod-b": 0})


async def test_two_replicas_one_reconciles_and_the_other_takes_over(cluster, operator_settings, job_controller,
                                                                    tiny_model, caplog):
    """The same, with two real operators on the emulator: the standby stays paused while the
    leader works, and takes over when the leader is killed and its peering entry expires."""
    caplog.set_level(logging.INFO)
    declare_peerings(cluster.server)
    # The lower first: alone, it works; when the higher joins, it pauses in the higher's favour.
    # (A replica that finds a higher one at its start never works at all and says nothing.)
    replicas = sorted((Operator(operator_settings, peering="llmfactory", peering_lifetime=4) for _ in range(2)),
                      key=lambda r: r.priority)
    leader = replicas[-1]
    logged = lambda words: any(words in r.getMessage() for r in caplog.records)  # noqa: E731
    for replica in replicas:
        await replica.start()
        await wait_until(lambda: logged("Resuming operations after the pause"))
    try:
        await wait_until(lambda: logged("Pausing operations in favour of"))
        assert not logged("Possibly conflicting operators with the same priority")
        first = pipeline(tiny_model)[0]
        await cluster.apply(first)
        await cluster.wait_for("DatasetBuild", "data", phase_is("Succeeded"), timeout=120)
        await leader.kill()  # abruptly: its peering entry stays until its lifetime ends
        second = copy.deepcopy(first)
        second["metadata"]["name"] = "data-2"
        await cluster.apply(second)
        await cluster.wait_for("DatasetBuild", "data-2", phase_is("Succeeded"), timeout=120)
        assert logged("Resuming operations after the pause")
        assert len(objects_of(cluster.server, "jobs")) == 2
    finally:
        for replica in replicas:
            await replica.stop()


async def test_namespaced_operator_handles_only_its_namespace(cluster, operator_settings, tiny_model):
    """The chart's Role mode: no namespace listing or CRD watch (kopf scanning off), and a
    resource in another namespace is not touched."""
    op = Operator(operator_settings, namespaces=["team-a"])
    await op.start()
    try:
        mine, other = pipeline(tiny_model)[0], pipeline(tiny_model)[0]
        mine["metadata"]["namespace"] = "team-a"
        other["metadata"]["namespace"] = "team-b"
        await cluster.apply(mine)
        await cluster.apply(other)
        await cluster.wait_for("DatasetBuild", "data", phase_is("Running", "Succeeded"), timeout=60,
                               namespace="team-a")
        await asyncio.sleep(2)
        untouched = await cluster.get("DatasetBuild", "data", namespace="team-b")
        assert "status" not in untouched or not untouched["status"].get("phase")
        assert {j["metadata"]["namespace"] for j in objects_of(cluster.server, "jobs")} == {"team-a"}
    finally:
        await op.stop()

