"""The local runner: plan each resource in dependency order and run its task as a subprocess
of the real runtime, drawing progress from the progress.json it writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmfactory_runtime import CONFIG_MAPS_ENV
from llmfactory_runtime.store import TASK, finished_result, open_store, read_progress

from ..api import KINDS
from ..api.headline import gates_failed, headline
from ..planner import Resource, Waiting, config_maps_among, dependency_order, parse, plan, promises_among
from ..planner.manifests import config_map_bytes


@dataclass
class Outcome:
    resource: Resource
    status: str  # Succeeded, Reused, Failed, Skipped
    task: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    seconds: float = 0.0
    message: str = ""
    log: Path | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.status in ("Succeeded", "Reused")


class LocalRunner:
    def __init__(self, store_uri: str, log_dir: Path, console: Console | None = None,
                 env: dict[str, str] | None = None, poll_seconds: float = 0.5):
        self.store_uri, self.log_dir = store_uri, Path(log_dir)
        self.console = console or Console()
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.poll_seconds = poll_seconds

    def run(self, manifests: list[dict[str, Any]]) -> list[Outcome]:
        manifests, self.config_maps, others = config_maps_among(manifests)
        for other in others:
            self.console.print(f"{other}: left out (not an llmfactory kind)", soft_wrap=True)
        resources = dependency_order(parse(m) for m in manifests)
        # What a spec shows wrong by itself (a gate's metric) or beside what it references (a FineTune with
        # objective dpo on a build of conversations) is refused before anything runs.
        promise_of = promises_among(resources)
        for res in resources:
            plan(res, lambda *_: None, self.store_uri, lambda ns, name: self.config_maps.get((ns, name)), promise_of)
        outcomes: dict[tuple, Outcome] = {}

        def result_of(kind: str, namespace: str, name: str):
            done = outcomes.get((kind, namespace, name))
            return done.result if done and done.ok else None

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TimeElapsedColumn(), TextColumn("{task.fields[figure]}"), console=self.console) as bars:
            for res in resources:
                task = plan(res, result_of, self.store_uri, lambda ns, name: self.config_maps.get((ns, name)))
                if isinstance(task, Waiting):
                    outcomes[res.key] = Outcome(res, "Skipped", message=_why_skipped(
                        task, outcomes.get((task.kind, res.namespace, task.name))))
                    continue
                outcomes[res.key] = self._run_one(res, task, bars)
        return list(outcomes.values())

    def _run_one(self, res: Resource, task: dict[str, Any], bars: Progress) -> Outcome:
        run = open_store(task["artifactUri"])
        label = f"{res.kind} {res.name}"
        previous = finished_result(run)
        if previous is not None:
            bars.add_task(f"{label}: reused {task['digest'][:12]}", total=1, completed=1, figure=headline(res.kind, previous))
            return _finished(res, "Reused", task, previous, message=f"finished result reused from {run.uri}")
        run.write_json(TASK, task)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{res.kind.lower()}-{res.name}-{task['digest'][:12]}.log"
        bar = bars.add_task(f"{label}: starting", total=100, figure="")
        started = time.time()
        command = [sys.executable, "-m", "llmfactory_runtime", KINDS[res.kind].phase, "--task", task["artifactUri"]]
        processes = _training_processes(res)
        if processes > 1:  # as the Job's torchrun, on this machine (the digest counts the processes)
            command[1:1] = ["-m", "llmfactory_runtime.torchrun", "--standalone", f"--nproc-per-node={processes}"]
        shards = task["spec"].get("shards", 1) if res.kind == "DatasetBuild" else 1
        # A sharded build: one process per shard, as the Indexed Job's pods; the last one merges.
        commands = [command + ["--shard", str(i)] for i in range(shards)] if shards > 1 else [command]
        env = {**self.env, **spec_env(res, self.config_maps), CONFIG_MAPS_ENV: str(self._write_config_maps(res.namespace))}
        with log.open("w") as out:
            procs = [subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT, env=env) for c in commands]
            progress: dict[str, Any] = {}
            while any(p.poll() is None for p in procs):
                time.sleep(self.poll_seconds)
                progress = read_progress(run) or progress
                self._draw(bars, bar, label, progress)
        progress = read_progress(run) or progress
        returncode = max(p.returncode for p in procs)
        seconds = time.time() - started
        result = finished_result(run)
        if returncode != 0 or result is None:
            message = progress.get("message") or _tail(log)
            bars.update(bar, description=f"{label}: [red]failed[/red]", figure="")
            return Outcome(res, "Failed", task, None, seconds, message, log)
        bars.update(bar, description=f"{label}: done", completed=100, figure=headline(res.kind, result))
        return _finished(res, "Succeeded", task, result, seconds, log=log)

    def _write_config_maps(self, namespace: str) -> Path:
        """The namespace's ConfigMaps as files, laid out as a Job mounts them (<name>/<key>)."""
        folder = self.log_dir / "config-maps" / namespace
        for (ns, name), cm in self.config_maps.items():
            if ns != namespace:
                continue
            (folder / name).mkdir(parents=True, exist_ok=True)
            for key in {**(cm.get("data") or {}), **(cm.get("binaryData") or {})}:
                (folder / name / key).write_bytes(config_map_bytes(cm, key))
        return folder

    @staticmethod
    def _draw(bars: Progress, bar, label: str, progress: dict[str, Any]) -> None:
        if not progress:
            return
        stage = progress.get("stage") or ""
        done, total = progress.get("done"), progress.get("total")
        counter = f" {done}/{total} {progress.get('unit') or ''}" if total else ""
        bars.update(bar, description=f"{label}: {stage}{counter}", completed=progress.get("percent") or 0,
                    figure=progress.get("figure") or "")


def spec_env(res: Resource, config_maps: dict[tuple[str, str], dict]) -> dict[str, str]:
    """A resource's spec.env as this machine can give its phase's process: values as written, a
    ConfigMap's key from the applied ConfigMaps; a Secret's variable (and a ConfigMap's not applied)
    as this process's environment has it, as API keys are."""
    env = {}
    for var in res.spec.env or []:
        ref = var.value_from.config_map_key_ref if var.value_from else None
        content = config_map_bytes(config_maps.get((res.namespace, ref.name)) or {}, ref.key) if ref else None
        if var.value is not None or content is not None:
            env[var.name] = var.value if var.value is not None else content.decode()
    return env


def _finished(res: Resource, status: str, task: dict[str, Any], result: dict[str, Any], seconds: float = 0.0,
              message: str = "", log: Path | None = None) -> Outcome:
    """A run with a result: a Benchmark whose gates failed is a failure, as on the cluster."""
    failure = gates_failed(res.kind, result)
    if failure:
        return Outcome(res, "Failed", task, result, seconds, failure, log)
    return Outcome(res, status, task, result, seconds, message, log)


def _why_skipped(waiting: Waiting, upstream: Outcome | None) -> str:
    """What a resource waited on, and why it never came: the failure's last line, or, behind a
    resource skipped in turn, the chain back to it ("Benchmark b was skipped: FineTune f did not
    succeed (...)") rather than the reasons nested in one another."""
    if waiting.kind == "ConfigMap":
        return f"ConfigMap {waiting.name} is not among the manifests"
    if upstream and upstream.status == "Skipped":
        return f"{waiting.kind} {waiting.name} was skipped: {upstream.message}"
    reason = f" ({upstream.message.splitlines()[-1]})" if upstream and upstream.message else ""
    return f"{waiting.kind} {waiting.name} did not succeed{reason}"


def _training_processes(res: Resource) -> int:
    """How many processes a FineTune trains with: gpusPerNode x nodes, as on the cluster. They shape
    the global batch, so the result is the one its digest promises; other kinds run one process."""
    if res.kind != "FineTune":
        return 1
    return max(res.spec.resources.gpus_per_node, 1) * res.spec.resources.nodes


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def summary(outcomes: list[Outcome]) -> Table:
    table = Table(title="llmfactory run")
    table.add_column("Resource", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Time", justify="right", no_wrap=True)
    table.add_column("Result")
    colour = {"Succeeded": "green", "Reused": "cyan", "Failed": "red", "Skipped": "yellow"}
    for o in outcomes:
        if o.ok:
            text = headline(o.resource.kind, o.result)
        else:
            text = o.message.splitlines()[-1] if o.message else ""
        table.add_row(f"{o.resource.kind}/{o.resource.name}", f"[{colour[o.status]}]{o.status}[/]",
                      f"{o.seconds:.0f}s" if o.seconds else "-", text)
    return table
