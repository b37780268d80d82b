"""A resource plus the results of what it references -> the task document of one run.

The task is the whole contract with the runtime: it holds the spec with defaults filled in,
the resolved inputs (URIs and digests of upstream artifacts), where to write, and a digest
over all of that. Same inputs, same digest, same artifact prefix: finished work is reused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Callable

from .. import API_VERSION
from ..api import KINDS
from ..api.common import operational_fields
from .checks import check_spec
from .digest import canonical_digest, digest_spec
from .errors import PlanError
from .estimate import check_fits, check_targets, shape_source
from .graph import references
from .inputs import check_promises, inputs_of
from .manifests import Resource, config_map_bytes
from .promise import Promise, PromiseLookup

ResultLookup = Callable[[str, str, str], "dict[str, Any] | None"]  # (kind, namespace, name) -> status.result
ConfigMapLookup = Callable[[str, str], "dict[str, Any] | None"]  # (namespace, name) -> the ConfigMap


@dataclass(frozen=True)
class Waiting:
    """A referenced resource has no result yet."""

    kind: str
    name: str
    field: str
    estimate: dict[str, Any] | None = None  # a FineTune's resource estimate, known before its inputs

    @property
    def reason(self) -> str:
        until = "exist" if self.kind == "ConfigMap" else "succeed"
        return f"waiting for {self.kind} {self.name} ({self.field}) to {until}"


def artifact_uri(store_uri: str, res: Resource, digest: str) -> str:
    return f"{store_uri.rstrip('/')}/{res.namespace}/{res.kind.lower()}/{res.name}/{digest[:16]}"


def plan(res: Resource, result_of: ResultLookup, store_uri: str, config_map_of: ConfigMapLookup | None = None,
         promise_of: PromiseLookup | None = None) -> dict[str, Any] | Waiting:
    """The task document for `res`, or Waiting when a referenced resource has not succeeded (or a
    ConfigMap it reads does not exist yet). Before it waits, `res` is checked against what those
    resources' specs promise (`promise_of`, where their manifests are known)."""
    check_spec(res)
    upstream: dict[str, dict[str, Any]] = {}
    waiting = None
    for path, kind, name in references(res):
        result = result_of(kind, res.namespace, name)
        if result is None:
            waiting = waiting or Waiting(kind, name, path)
            result = promise_of(kind, res.namespace, name) if promise_of else Promise()
        upstream[path] = result
    estimate = None
    if res.kind == "FineTune":  # a FineTune's model (fineTuneRef) has the shape of the base it was trained from
        base = shape_source(res, upstream.get("spec.baseModel.fineTuneRef"), promise_of)
        if base is not None:  # a misspelt target first: the estimate would count no adapters
            check_targets(res, base)
            estimate = check_fits(res, base)
    if waiting:
        check_promises(res, upstream)
        return replace(waiting, estimate=estimate.as_dict() if estimate else None)
    res, inputs = inputs_of(res, upstream)
    if res.kind == "DatasetBuild":
        files = config_map_files(res, config_map_of)
        if isinstance(files, Waiting):
            return files
        if files:
            inputs["configMaps"] = files
    spec = {k: v for k, v in res.spec.wire().items() if k not in operational_fields(res.kind)}
    digested = digest_spec(res)
    body = {"phase": KINDS[res.kind].phase, "spec": spec, "inputs": inputs}
    digest = canonical_digest({**body, "spec": digested})
    task = {
        "apiVersion": API_VERSION,
        "kind": "Task",
        "resource": {"kind": res.kind, "namespace": res.namespace, "name": res.name},
        **body,
        "digest": digest,
        "artifactUri": artifact_uri(store_uri, res, digest),
        # Paid answers (teacher, judge) are kept per namespace, outside any run: a changed filter
        # or split is a new run that must not pay for them again.
        "cacheUri": f"{store_uri.rstrip('/')}/{res.namespace}/cache",
    }
    if estimate is not None:
        task["estimate"] = estimate.as_dict()
    return task


def config_map_files(res: Resource, config_map_of: ConfigMapLookup | None) -> dict[str, dict] | Waiting:
    """{source index: {name, key, sha256}} for the sources kept in ConfigMaps: the content's
    digest goes into the task's, so an edited ConfigMap is a new run."""
    files: dict[str, dict[str, Any]] = {}
    for i, source in enumerate(res.spec.sources):
        if source.config_map is None:
            continue
        field, ref = f"spec.sources[{i}].configMap", source.config_map
        if config_map_of is None:
            raise PlanError(res.ref, field, "a ConfigMap source needs a cluster, or the ConfigMap among the manifests")
        found = config_map_of(res.namespace, ref.name)
        if found is None:
            return Waiting("ConfigMap", ref.name, field)
        content = config_map_bytes(found, ref.key)
        if content is None:
            keys = sorted({**(found.get("data") or {}), **(found.get("binaryData") or {})})
            raise PlanError(res.ref, f"{field}.key", f"ConfigMap {ref.name} has no key {ref.key!r} (it has: {keys})")
        files[str(i)] = {"name": ref.name, "key": ref.key, "sha256": hashlib.sha256(content).hexdigest()}
    return files


