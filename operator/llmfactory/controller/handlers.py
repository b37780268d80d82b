"""kopf handlers: each a short function; the work is in reconcile()."""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import kopf

from llmfactory_runtime.store import open_store

from .. import GROUP, VERSION
from ..api import KINDS
from . import metrics
from .job_builder import MANAGED_BY
from .kube import SERVER_ENV, Kube, NotFound, custom_path
from .reconcile import dependents, job_owner, job_summary, reconcile, refused
from .settings import OperatorSettings

FINALIZER = "llmfactory.dev/artifacts"
# Changing this annotation is an update to kopf: the way to have a resource reconciled now, when
# its Job or what it waits for changed, instead of on its next timer tick.
NUDGE = "llmfactory.dev/last-change-seen"
TERMINAL = ("Succeeded", "Failed")
PEERING_API = "/apis/kopf.dev/v1"


def replica_priority() -> int:
    """kopf pauses every replica that sees another one with its own priority, which would leave
    the cluster unserved with two identical replicas: each draws its own. The highest reconciles;
    the others stand by and take over once its peering entry expires."""
    return random.SystemRandom().randint(1, 2**31 - 1)


def kopf_settings(namespaces: list[str] | None) -> kopf.OperatorSettings:
    """An operator that watches named namespaces holds only Roles there (the Helm chart's
    namespaced mode): it must neither list namespaces nor watch CRDs cluster-wide."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = bool(namespaces)
    return settings


def ensure_peering(kube: Kube, name: str, namespaces: list[str] | None) -> None:
    """kopf only patches an existing peering object: make it, so that a second replica stands
    by instead of both reconciling (the chart installs the peering CRDs when replicaCount > 1)."""
    if namespaces:
        for namespace in namespaces:
            kube.ensure(f"{PEERING_API}/namespaces/{namespace}/kopfpeerings",
                        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                         "metadata": {"name": name, "namespace": namespace}})
    else:
        kube.ensure(f"{PEERING_API}/clusterkopfpeerings",
                    {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}})


def _reads_config_maps(body: kopf.Body) -> bool:
    return any("configMap" in source for source in (body.get("spec") or {}).get("sources") or [])


def _reconcile(body: kopf.Body, kube: Kube, config: OperatorSettings,
               lock: threading.Lock) -> tuple[dict[str, Any], tuple[str, str, str]] | None:
    """Reconcile the object's latest version and patch its status before the next reconciliation
    of it begins; (the object, the Event to post) when something happened. kopf runs timers in
    parallel with the change handlers of the same object (by design), each with a body that may
    predate the other's patch: two views of different moments, patched in either order, left a
    status that was neither (phase Failed beside the conditions of a running attempt)."""
    kind, meta = body["kind"], body["metadata"]
    path = custom_path(KINDS[kind].plural, meta["namespace"], meta["name"])
    with lock:
        latest = kube.get_or_none(path)
        if latest is None or latest["metadata"].get("uid") != meta.get("uid") or \
                latest["metadata"].get("deletionTimestamp"):
            return None  # deleted or going (or made anew: its own events reconcile it)
        with metrics.timed(kind):
            outcome = reconcile(latest, kube, config)
        metrics.observe(kind, meta["namespace"], meta["name"], outcome.status.get("phase"),
                        outcome.event[1] if outcome.event else None, outcome.job_created)
        changes = status_changes(outcome.status, latest.get("status") or {})
        if changes:
            try:
                kube.patch(f"{path}/status", {"status": changes})
            except NotFound:
                return None
    return (latest, outcome.event) if outcome.event else None


def _post(happened: tuple[dict[str, Any], tuple[str, str, str]] | None) -> None:
    if happened:
        obj, (event_type, reason, message) = happened
        kopf.event(obj, type=event_type, reason=reason, message=message)


def status_changes(status: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The merge patch from the current status to `status`: only the fields that changed; never
    a rewrite of the whole status."""
    changes = {}
    for key, value in status.items():
        was = current.get(key)
        if was != value:
            if isinstance(value, dict) and isinstance(was, dict):
                # A merge patch only adds and replaces keys: drop the ones the new value lacks (a
                # stage's ETA or figure must not outlive it).
                value = {**{k: None for k in was if k not in value}, **value}
            changes[key] = value
    return changes


def register(registry: kopf.OperatorRegistry, config: OperatorSettings, kube: Kube | None = None,
             namespaces: list[str] | None = None) -> None:
    """Register the handlers of the four kinds for this settings object."""
    clients: dict[str, Kube] = {}
    locks: dict[str, threading.Lock] = {}  # per object (uid): one reconciliation at a time
    locks_guard = threading.Lock()

    def lock_of(body: kopf.Body) -> threading.Lock:
        with locks_guard:
            return locks.setdefault(body["metadata"]["uid"], threading.Lock())

    def client() -> Kube:
        if "kube" not in clients:
            clients["kube"] = kube or Kube()
        return clients["kube"]

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = 20  # post INFO and above as Events
        if settings.peering.mandatory:
            ensure_peering(client(), settings.peering.name, namespaces)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if os.environ.get(SERVER_ENV):
            return kopf.ConnectionInfo(server=os.environ[SERVER_ENV], insecure=True)
        return kopf.login_via_client(**kwargs)

    def on_change(body: kopf.Body, **_: Any) -> None:
        _post(_reconcile(body, client(), config, lock_of(body)))

    def on_timer(body: kopf.Body, **_: Any) -> None:
        status = body.get("status") or {}
        settled = status.get("observedGeneration") == body["metadata"].get("generation")
        # A finished resource is done, unless it reads ConfigMaps: an edit to one is a new run.
        if settled and status.get("phase") in TERMINAL and not _reads_config_maps(body):
            return
        _post(_reconcile(body, client(), config, lock_of(body)))

    def on_deleted(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        metrics.forget(body["kind"], meta["namespace"], meta["name"])
        with locks_guard:
            locks.pop(meta.get("uid"), None)

    def on_delete(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        prefix = f"{config.store_uri.rstrip('/')}/{meta['namespace']}/{body['kind'].lower()}/{meta['name']}"
        open_store(prefix).delete_prefix()
        kopf.info(body, reason="ArtifactsDeleted", message=f"deleted {prefix} (deletionPolicy: Delete)")

    def deletes_artifacts(spec: kopf.Spec, **_: Any) -> bool:
        return spec.get("deletionPolicy") == "Delete"

    def nudge(kind: str, namespace: str, name: str, why: str) -> None:
        path = custom_path(KINDS[kind].plural, namespace, name)
        obj = client().get_or_none(path)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return  # gone or going: nothing to reconcile
        if (obj["metadata"].get("annotations") or {}).get(NUDGE) != why:
            try:
                client().patch(path, {"metadata": {"annotations": {NUDGE: why}}})
            except NotFound:  # deleted in between
                pass

    def on_spec_changed(body: kopf.Body, **_: Any) -> None:
        # What was refused for what this spec promised (a FineTune with objective dpo on a build of
        # conversations) plans again at once: the change may have mended it. Nothing else is nudged:
        # what ran on this one's last result reruns once its new result is there (on_settled).
        meta = body["metadata"]
        why = f"{body['kind']} {meta['name']} changed (generation {meta.get('generation')})"
        for kind, name in dependents(client(), body["kind"], meta["namespace"], meta["name"], where=refused):
            nudge(kind, meta["namespace"], name, why)

    def on_job_event(body: kopf.Body, **_: Any) -> None:
        owner = job_owner(dict(body))
        if owner:
            nudge(owner[0], body["metadata"]["namespace"], owner[1], job_summary(dict(body)))

    def on_settled(body: kopf.Body, **_: Any) -> None:
        # Dependents plan at once: with its result, or to say that what they wait for failed.
        meta, status = body["metadata"], body.get("status") or {}
        how = "succeeded" if status["phase"] == "Succeeded" else "failed"
        for kind, name in dependents(client(), body["kind"], meta["namespace"], meta["name"]):
            nudge(kind, meta["namespace"], name, f"{body['kind']} {meta['name']} {how} ({status.get('taskDigest', '')[:16]})")

    def settled_now(body: kopf.Body, **_: Any) -> bool:
        status = body.get("status") or {}
        return status.get("phase") in TERMINAL and status.get("observedGeneration") == body["metadata"].get("generation")

    kopf.on.event("batch", "v1", "jobs", registry=registry, labels=MANAGED_BY)(on_job_event)
    for info in KINDS.values():
        resource = (GROUP, VERSION, info.plural)
        kopf.on.event(*resource, registry=registry, when=settled_now)(on_settled)
        kopf.on.create(*resource, registry=registry)(on_change)
        kopf.on.update(*resource, registry=registry)(on_change)
        kopf.on.create(*resource, registry=registry)(on_spec_changed)
        kopf.on.update(*resource, registry=registry, field="spec")(on_spec_changed)
        kopf.on.resume(*resource, registry=registry)(on_change)
        kopf.timer(*resource, registry=registry, interval=config.poll_seconds, initial_delay=config.poll_seconds)(on_timer)
        kopf.on.delete(*resource, registry=registry, when=deletes_artifacts)(on_delete)
        kopf.on.delete(*resource, registry=registry, optional=True)(on_deleted)  # no finalizer needed
