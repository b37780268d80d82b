"""The real kopf operator against kmock's Kubernetes emulator, with the harness as Job controller."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from llmfactory.api import KINDS
from llmfactory.controller.kube import SERVER_ENV
from llmfactory.controller.settings import OperatorSettings
from tests.operator.harness import Emulator, JobController, Operator, declare_resources, objects_of


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/operator/" in str(item.fspath):
            item.add_marker(pytest.mark.kmock(cls=Emulator))


class Cluster:
    """What a test does with the cluster: apply, read, wait, as kubectl would."""

    def __init__(self, server, session: aiohttp.ClientSession):
        self.server, self.session = server, session

    def _path(self, kind: str, namespace: str = "default", name: str | None = None) -> str:
        if kind in KINDS:
            base = f"{self.server.url}/apis/llmfactory.dev/v1alpha1/namespaces/{namespace}/{KINDS[kind].plural}"
        else:  # core objects a user applies beside ours
            base = f"{self.server.url}/api/v1/namespaces/{namespace}/{ {'ConfigMap': 'configmaps'}[kind]}"
        return f"{base}/{name}" if name else base

    async def apply(self, manifest: dict[str, Any]) -> None:
        ns = manifest["metadata"].get("namespace", "default")
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": ns}}
        async with self.session.post(self._path(manifest["kind"], ns), json=manifest) as resp:
            resp.raise_for_status()

    async def patch_spec(self, kind: str, name: str, spec: dict) -> None:
        async with self.session.patch(self._path(kind, name=name), json={"spec": spec},
                                      headers={"Content-Type": "application/merge-patch+json"}) as resp:
            resp.raise_for_status()

    async def delete(self, kind: str, name: str) -> None:
        async with self.session.delete(self._path(kind, name=name)) as resp:
            resp.raise_for_status()

    async def annotate(self, kind: str, name: str, annotations: dict[str, str]) -> None:
        """`kubectl annotate --overwrite`: a metadata change, not a spec change."""
        async with self.session.patch(self._path(kind, name=name), json={"metadata": {"annotations": annotations}},
                                      headers={"Content-Type": "application/merge-patch+json"}) as resp:
            resp.raise_for_status()

    async def delete_child(self, api: str, plural: str, name: str) -> None:
        """What the garbage collector or the TTL controller does to a Job or ConfigMap (kmock has neither)."""
        async with self.session.delete(f"{self.server.url}/{api}/namespaces/default/{plural}/{name}") as resp:
            resp.raise_for_status()

    async def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        async with self.session.get(self._path(kind, namespace, name)) as resp:
            return None if resp.status == 404 else await resp.json()

    async def wait_for(self, kind: str, name: str, predicate, timeout: float = 120,
                       namespace: str = "default") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj = None
        while time.monotonic() < deadline:
            obj = await self.get(kind, name, namespace)
            if obj is not None and predicate(obj):
                return obj
            await asyncio.sleep(0.2)
        raise AssertionError(f"{kind} {name} did not get there in {timeout}s; last seen: {obj}")

    async def wait_gone(self, kind: str, name: str, timeout: float = 60) -> None:
        """Until the object is deleted for good (its finalizer removed by the operator)."""
        deadline = time.monotonic() + timeout
        while await self.get(kind, name) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{kind} {name} still exists {timeout}s after its deletion")
            await asyncio.sleep(0.2)

    def objects(self, plural: str) -> list[dict[str, Any]]:
        return objects_of(self.server, plural)


def phase_is(*phases):
    return lambda obj: (obj.get("status") or {}).get("phase") in phases


@pytest_asyncio.fixture
async def cluster(kmock, monkeypatch):
    declare_resources(kmock)
    monkeypatch.setenv(SERVER_ENV, str(kmock.url).rstrip("/"))
    async with aiohttp.ClientSession() as session:
        yield Cluster(kmock, session)


@pytest.fixture
def operator_settings(tmp_path, request) -> OperatorSettings:
    overrides = getattr(request, "param", {})  # @pytest.mark.parametrize("operator_settings", [{...}], indirect=True)
    return OperatorSettings(**{"store_uri": f"file://{tmp_path}/store", "poll_seconds": 0.5, "backoff_limit": 1,
                               **overrides},
                            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


@pytest_asyncio.fixture
async def operator(cluster, operator_settings):
    op = Operator(operator_settings)
    await op.start()
    yield op
    await op.stop()


@pytest_asyncio.fixture
async def job_controller(cluster, tmp_path):
    controller = JobController(cluster.server, tmp_path / "pods")
    task = asyncio.create_task(controller.run_forever())
    yield controller
    task.cancel()
    await controller.shutdown()
    assert not controller.errors, "\n".join(controller.errors)
