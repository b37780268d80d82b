"""What a cluster would do that kmock does not: stamp objects (uid, resourceVersion, generation)
and run Jobs. The Job controller here really executes each Job's container command -- the real
runtime -- as a local process, with the task from the Job's ConfigMap, then writes the Job's
status back the way the real Job controller does (Complete, or Failed with its reason)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import sys
import threading
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf

from llmfactory import GROUP, VERSION
from llmfactory.api import KINDS
from llmfactory.controller.handlers import kopf_settings, register, replica_priority
from llmfactory.controller.job_builder import TASK_PATH
from llmfactory.controller.settings import OperatorSettings
from llmfactory_runtime import CONFIG_MAPS_ENV

_versions = itertools.count(1)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server adds to objects on create and update."""

    def __iter__(self):
        # kmock finds which reaction serves a request by testing whether the request is among the
        # requests each reaction's filter passes, iterating the server's whole request history:
        # quadratic, and what made hundreds of resources take minutes. Only requests being served
        # can be asked about, so the filters see those (the history itself is kept).
        yield from getattr(self, "_serving", ())

    async def _handle(self, request):
        self._serving = getattr(self, "_serving", [])
        self._serving.append(request)
        try:
            return await self._handle_as_api_server(request)
        finally:
            self._serving.remove(request)

    async def _serve_watch(self, request):
        # kmock 0.8 lists the objects, streams them, and only then subscribes to the change bus: a
        # change in between was never delivered (a watcher could miss an update for good). Here
        # the subscription is taken with the listing, under the lock the changes are published in.
        yield b""
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            existing = [obj.raw for (resource, namespace, name), obj in self._objects.items()
                        if not obj.deleted and self._watched(request, resource, namespace, name)]
        try:
            for raw in existing:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._watched(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _watched(request, resource, namespace, name) -> bool:
        return (resource == request.resource and request.namespace in (None, namespace)
                and request.name in (None, name))

    async def _handle_as_api_server(self, request):
        agent = request.headers.get("User-Agent", "")
        if request.resource is not None and not agent.startswith("Python/"):  # the operator's own calls
            # (kopf's and the kubernetes client's, not the test's aiohttp): the Helm chart's RBAC must allow them.
            self.calls = getattr(self, "calls", set())
            self.calls.add((request.resource.group or "", request.resource.plural, request.subresource or "",
                            request.action.value))
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):  # kopf's Events use generateName
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = str(next(_versions))
            elif request.action == kmock.action.UPDATE:
                meta["resourceVersion"] = str(next(_versions))
                key = (request.resource, request.namespace, request.name)
                if "spec" in request.data and request.subresource is None and key in self.objects:
                    current = self.objects[key]
                    if request.data["spec"] != current.get("spec"):
                        meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        return await super()._handle(request)


def declare_resources(server) -> None:
    verbs = {"list", "watch", "get", "create", "patch", "delete"}
    for info in KINDS.values():
        server.resources[f"{GROUP}/{VERSION}/{info.plural}"] = kmock.ResourceInfo(
            kind=info.kind, namespaced=True, verbs=verbs, subresources={"status"})
    for key, kind in (("batch/v1/jobs", "Job"), ("v1/configmaps", "ConfigMap"), ("v1/services", "Service"),
                      ("v1/pods", "Pod"), ("v1/secrets", "Secret"), ("v1/events", "Event"),
                      ("v1/namespaces", "Namespace")):
        server.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=kind != "Namespace", verbs=verbs,
                                                   subresources={"status"} if kind == "Job" else set())


def objects_of(server, plural: str) -> list[dict[str, Any]]:
    return [obj.raw for (res, _, _), obj in list(server.objects.items())
            if res.plural == plural and not obj.deleted]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as the end of a pod's container does. Not its process
    group: torchrun starts every worker in a session of its own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid
            children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _exit_code_rule(job: dict, code: int) -> tuple[str | None, int | None]:
    """The Job controller's reading of the podFailurePolicy: (action, index) of the first exit-code
    rule that matches."""
    for index, rule in enumerate((job["spec"].get("podFailurePolicy") or {}).get("rules", [])):
        match = rule.get("onExitCodes")
        if match and (code in match["values"]) == (match["operator"] == "In"):
            return rule["action"], index
    return None, None


class JobController:
    """Runs every Job it sees, once, honouring backoffLimit, the podFailurePolicy's exit-code rules
    (its pod-condition rules need a kubelet: no pod here is disrupted) and `suspend` (Kueue's
    preemption: the running pods get SIGTERM, their ends are not evaluated, and no new pod starts
    until the Job is resumed). A failing Job's other pods get SIGTERM, and the Job is marked Failed
    once they have ended (Kubernetes 1.31 on: FailureTarget first, Failed when no pod is left)."""

    def __init__(self, server, workdir: Path, env: dict[str, str] | None = None):
        self.server, self.workdir, self.env = server, workdir, env or {}
        self.started: set[str] = set()
        self.paused = False
        self._tasks: list[asyncio.Task] = []
        self._procs: list[asyncio.subprocess.Process] = []
        self.pods: dict[tuple[str, int | None], asyncio.subprocess.Process] = {}  # (job, index): its running process
        self._terminated: set[asyncio.subprocess.Process] = set()
        self.errors: list[str] = []  # Jobs that could not be run, and why

    async def run_forever(self) -> None:
        async with aiohttp.ClientSession() as session:
            self.session = session
            while True:
                if not self.paused:
                    for job in objects_of(self.server, "jobs"):
                        key = job["metadata"]["uid"]  # a Job deleted and made again under its name runs again
                        if job["spec"].get("suspend"):
                            self._stop_pods(job["metadata"]["name"])
                        if key not in self.started and not job["spec"].get("suspend"):
                            self.started.add(key)
                            self._tasks.append(asyncio.create_task(self._execute_noting_errors(job)))
                await asyncio.sleep(0.1)

    async def _patch_status(self, job: dict, status: dict) -> None:
        meta = job["metadata"]
        url = f"{self.server.url}/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}/status"
        async with self.session.patch(url, json={"status": status},
                                      headers={"Content-Type": "application/merge-patch+json"}) as resp:
            resp.raise_for_status()

    def _environment(self, job: dict, container: dict) -> dict[str, str]:
        env = {**os.environ, **self.env}
        namespace = job["metadata"]["namespace"]
        for var in container.get("env", []):
            if var["name"] in ("HOME", "LLMFACTORY_CACHE", "HF_HOME"):
                continue  # paths inside the image; the test process has its own
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "secretKeyRef" in var["valueFrom"]:  # the kubelet resolves references; so do we
                ref = var["valueFrom"]["secretKeyRef"]
                secret = self._object("secrets", namespace, ref["name"])
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                ref = var["valueFrom"]["configMapKeyRef"]
                env[var["name"]] = self._object("configmaps", namespace, ref["name"])["data"][ref["key"]]
        return env

    def _object(self, plural: str, namespace: str, name: str) -> dict:
        return next(o for o in objects_of(self.server, plural)
                    if (o["metadata"]["namespace"], o["metadata"]["name"]) == (namespace, name))

    async def _execute_noting_errors(self, job: dict) -> None:
        """A Job this stand-in cannot run (say, its ConfigMap is gone) would otherwise just never
        run, silently: the test fails at its teardown instead (see the job_controller fixture)."""
        try:
            await self._execute(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors.append(f"Job {job['metadata']['name']}: {traceback.format_exc()}")

    async def _execute(self, job: dict) -> None:
        meta, spec = job["metadata"], job["spec"]
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        config_maps = {c["metadata"]["name"]: c for c in objects_of(self.server, "configmaps")
                       if c["metadata"]["namespace"] == meta["namespace"]}
        folder = self.workdir / meta["name"]
        folder.mkdir(parents=True, exist_ok=True)
        # The kubelet's part: ConfigMap volumes as files (the task's, then any the run reads).
        task_volume, *source_volumes = [v["configMap"] for v in pod["volumes"] if "configMap" in v]
        (folder / "task.json").write_text(config_maps[task_volume["name"]]["data"]["task.json"])
        for volume in source_volumes:
            (folder / "config-maps" / volume["name"]).mkdir(parents=True, exist_ok=True)
            for item in volume["items"]:
                (folder / "config-maps" / volume["name"] / item["path"]).write_text(
                    config_maps[volume["name"]]["data"][item["key"]])
        # The image's python is this environment's.
        command = [self._resolve(job, part.replace(TASK_PATH, str(folder / "task.json")))
                   for part in container["command"]]
        assert command[0] == "python", command
        command[0] = sys.executable
        # An Indexed Job: one pod per index, with JOB_COMPLETION_INDEX set and $(...) expanded (the kubelet's part).
        indexes = range(spec.get("completions", 1)) if spec.get("completionMode") == "Indexed" else [None]
        state = {"failed": 0, "active": len(indexes), "succeeded": 0, "verdict": None}
        await self._patch_status(job, {"active": state["active"], "failed": 0,
                                       "startTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
        await asyncio.gather(*(self._run_pod(job, folder, container, command, index, state) for index in indexes))
        if state["verdict"]:
            reason, message = state["verdict"]
            await self._patch_status(job, {"active": 0, "failed": state["failed"], "conditions": [
                {"type": "Failed", "status": "True", "reason": reason, "message": message}]})
        else:
            await self._patch_status(job, {"active": 0, "succeeded": len(indexes), "conditions": [
                {"type": "Complete", "status": "True", "reason": "Completed"}]})

    def _resolve(self, job: dict, part: str) -> str:
        """Cluster DNS's part: `<job>-<index>.<subdomain>` names pod <index> of an Indexed Job whose
        pods' subdomain is a headless Service of the namespace; here every pod is on 127.0.0.1. Any
        other name stays as it is, and a pod that needs it fails as it would on a cluster."""
        flag, _, host = part.partition("=")
        if flag != "--master-addr":
            return part
        hostname, _, subdomain = host.partition(".")
        pod, ns = job["spec"]["template"]["spec"], job["metadata"]["namespace"]
        headless = {s["metadata"]["name"] for s in objects_of(self.server, "services")
                    if s["metadata"]["namespace"] == ns and s["spec"].get("clusterIP") == "None"}
        index = hostname.removeprefix(f"{job['metadata']['name']}-")
        if (job["spec"].get("completionMode") == "Indexed" and index.isdigit() and int(index) < job["spec"]["completions"]
                and subdomain == pod.get("subdomain") and subdomain in headless):
            return f"{flag}=127.0.0.1"
        return part

    async def _run_pod(self, job: dict, folder: Path, container: dict, command: list[str], index: int | None,
                       state: dict) -> None:
        env = {**self._environment(job, container), CONFIG_MAPS_ENV: str(folder / "config-maps")}
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
            command = [part.replace("$(JOB_COMPLETION_INDEX)", str(index)) for part in command]
        attempt = 0
        while state["verdict"] is None:
            while self._suspended(job):
                await asyncio.sleep(0.1)
            with (folder / f"attempt-{index or 0}-{attempt}.log").open("w") as log:
                # In a session of its own: a Ctrl-C of the tests ends it through shutdown(), as a whole.
                proc = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                            env=env, start_new_session=True)
                self._procs.append(proc)
                self.pods[(job["metadata"]["name"], index)] = proc
                code = await proc.wait()
            if code < 0:  # killed by a signal: the container runtime reports 128 + its number
                code = 128 - code
            if code == 0:
                state["active"] -= 1
                state["succeeded"] += 1
                return
            if state["verdict"] is not None:  # stopped because the Job failed: not evaluated
                return
            attempt += 1
            if self._suspended(job):  # stopped by the suspension: a new pod once resumed
                continue
            action, rule = _exit_code_rule(job, code)
            if action == "Ignore":  # a new pod, not counted
                continue
            state["failed"] += 1
            if action == "FailJob":
                pod_name = f"{job['metadata']['namespace']}/{job['metadata']['name']}-{index or 0}"
                state["verdict"] = ("PodFailurePolicy", f"Container {container['name']} for pod {pod_name} failed "
                                                        f"with exit code {code} matching FailJob rule at index {rule}")
            elif state["failed"] > job["spec"].get("backoffLimit", 6):
                state["verdict"] = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            if state["verdict"]:
                self._stop_pods(job["metadata"]["name"])  # Kubernetes ends the failed Job's other pods
                return
            await self._patch_status(job, {"active": state["active"], "failed": state["failed"]})

    def terminate(self, job_name: str, index: int | None = None) -> None:
        """The kubelet's part when a pod is preempted or evicted: SIGTERM to its PID 1 (the container's
        command), which must pass it on; the pod then exits with its own code."""
        proc = self.pods[(job_name, index)]
        if proc not in self._terminated:  # once: a second SIGTERM would cut torchrun's shutdown short
            self._terminated.add(proc)
            proc.send_signal(signal.SIGTERM)

    def running(self, job_name: str) -> int:
        """How many of the Job's pods still run (a terminated pod runs until it has stopped)."""
        return sum(proc.returncode is None for (name, _), proc in list(self.pods.items()) if name == job_name)

    def _stop_pods(self, job_name: str) -> None:
        for (name, index), proc in list(self.pods.items()):
            if name == job_name and proc.returncode is None:
                self.terminate(name, index)

    def _suspended(self, job: dict) -> bool:
        meta = job["metadata"]
        return any(j["spec"].get("suspend") for j in objects_of(self.server, "jobs")
                   if (j["metadata"]["namespace"], j["metadata"]["name"]) == (meta["namespace"], meta["name"]))

    async def shutdown(self) -> None:
        """Kill what still runs: a test that ends mid-Job leaves no processes behind."""
        for task in self._tasks:
            task.cancel()
        for proc in self._procs:
            if proc.returncode is None:
                kill_tree(proc.pid)  # the whole pod, torchrun's workers too
                await proc.wait()

    def log_of(self, job_name: str) -> str:
        return "\n".join(p.read_text() for p in sorted((self.workdir / job_name).glob("attempt-*.log")))


class Operator:
    """The real kopf operator, in a thread with its own event loop (as kopf.testing.KopfRunner
    does), so the emulator keeps serving in the test's loop; start and stop it at will."""

    def __init__(self, settings: OperatorSettings, namespaces: list[str] | None = None, peering: str | None = None,
                 peering_lifetime: int = 60):
        self.settings, self.namespaces, self.peering = settings, namespaces, peering
        self.priority = replica_priority()  # as `llmfactory operator` draws it
        self.peering_lifetime = peering_lifetime
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        registry = kopf.OperatorRegistry()
        register(registry, self.settings, namespaces=self.namespaces)
        loop = self.loop = asyncio.new_event_loop()
        self.kopf_settings = kopf_settings(self.namespaces)
        self.kopf_settings.peering.lifetime = self.peering_lifetime
        try:
            self.main = loop.create_task(kopf.operator(registry=registry, clusterwide=not self.namespaces,
                                                  namespaces=self.namespaces or (), standalone=not self.peering,
                                                  peering_name=self.peering, priority=self.priority,
                                                  settings=self.kopf_settings,
                                                  stop_flag=self.stop_flag))
            self.running.set()
            loop.run_until_complete(self.main)
        except asyncio.CancelledError:
            pass  # killed
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc
        finally:
            # A killed operator leaves its handler threads; let them go with it.
            self.kopf_settings.execution.executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    async def start(self) -> None:
        self.stop_flag, self.running = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self.thread.start()
        # Until its loop and task exist, a kill would reach the previous run's closed loop (seen
        # on a loaded machine).
        assert await asyncio.to_thread(self.running.wait, 60), "the operator did not start"

    async def kill(self) -> None:
        """Stop abruptly, as a deleted or OOM-killed pod does: no graceful shutdown."""
        if self.thread:
            self.loop.call_soon_threadsafe(self.main.cancel)
            await asyncio.to_thread(self.thread.join, 60)
            self.stop_flag.set()  # kopf waits for it in a thread of its own: release that thread
            assert not self.thread.is_alive(), "the operator did not stop"
            self.thread = None

    async def stop(self) -> None:
        if self.thread:
            self.stop_flag.set()
            await asyncio.to_thread(self.thread.join, 60)
            assert not self.thread.is_alive(), "the operator did not stop"
            self.thread = None
        assert self.error is None, f"the operator crashed: {self.error!r}"
