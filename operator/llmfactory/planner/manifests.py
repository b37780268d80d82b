"""Manifests (YAML documents) -> validated resources."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from .. import API_VERSION, GROUP
from ..api import KINDS
from ..api.common import CREDENTIALS_IN_URL, PATTERN_MEANINGS, ApiModel
from ..api.crd import crd
from ..api.schema_check import validate_resource, without_nulls
from .errors import PlanError

Key = tuple[str, str, str]  # kind, namespace, name


@dataclass(frozen=True)
class Resource:
    kind: str
    namespace: str
    name: str
    spec: ApiModel
    manifest: dict[str, Any] = field(compare=False, repr=False)

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def _field_path(loc: Iterable[Any]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


@lru_cache(maxsize=None)
def _crd(kind: str) -> dict[str, Any]:
    return crd(KINDS[kind])


def parse(manifest: dict[str, Any], default_namespace: str = "default") -> Resource:
    """Validate one manifest against its kind's API model, then against its CRD as the API server
    would (its CEL rules above all): what `kubectl apply` refuses is refused here too."""
    kind = manifest.get("kind")
    meta = manifest.get("metadata") or {}
    name = meta.get("name") or "<unnamed>"
    ref = f"{kind} {meta.get('namespace', default_namespace)}/{name}"
    if manifest.get("apiVersion") != API_VERSION or kind not in KINDS:
        raise PlanError(ref, "apiVersion/kind",
                        f"expected apiVersion {API_VERSION} and a kind of {sorted(KINDS)}, "
                        f"got {manifest.get('apiVersion')!r} {kind!r}")
    if not meta.get("name"):
        raise PlanError(ref, "metadata.name", "is required")
    manifest = {**manifest, "spec": without_nulls(manifest.get("spec") or {})}  # as kubectl apply stores it
    try:
        spec = KINDS[kind].spec.model_validate(manifest["spec"])
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "extra_forbidden":  # the schema check names the field meant, or those there are
            _refuse_invalid(ref, kind, manifest)
        raise PlanError(ref, _field_path(first["loc"]), _message(first)) from None
    _refuse_invalid(ref, kind, manifest)
    return Resource(kind, meta.get("namespace", default_namespace), meta["name"], spec, manifest)


def _message(error: dict[str, Any]) -> str:
    """A field's error with the value it got (none that carries a credential) and, for a pattern, what
    the pattern means: "'64GB' is not a Kubernetes quantity, e.g. ...", not the regular expression."""
    value = error.get("input")
    if not isinstance(value, (str, int, float)) or re.match(CREDENTIALS_IN_URL, str(value)):
        return error["msg"]
    if error["type"] == "string_pattern_mismatch":
        regex = error["ctx"]["pattern"]
        return f"{value!r} is not {PATTERN_MEANINGS[regex]}" if regex in PATTERN_MEANINGS else \
            f"{value!r} does not match {regex}"
    return f"{error['msg']}, not {value!r}"


def _refuse_invalid(ref: str, kind: str, manifest: dict[str, Any]) -> None:
    """The first error the API server would give the manifest, naming its field."""
    errors = validate_resource(_crd(kind), {k: v for k, v in manifest.items() if k != "status"})
    if errors:
        where, _, message = errors[0].partition(": ")
        raise PlanError(ref, where.removeprefix(f"{kind}."), message)


class ManifestError(ValueError):
    """A manifest file that is not there, or not YAML documents of Kubernetes objects."""


def read_manifests(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every YAML document in the given files and directories (*.yaml, *.yml), sorted by path."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml"))
        elif p.exists():
            files.append(p)
        else:
            raise ManifestError(f"no such manifest file or directory: {p}")
    docs = []
    for f in files:
        try:
            with f.open(encoding="utf-8") as stream:
                found = [d for d in yaml.safe_load_all(stream) if d]
        except yaml.YAMLError as exc:  # its message says where: the file, line and column
            raise ManifestError(f"{f}: not valid YAML: {exc}") from None
        for n, doc in enumerate(found, 1):
            if not isinstance(doc, dict) or not isinstance(doc.get("metadata", {}), dict):
                raise ManifestError(f"{f}: document {n} is not a Kubernetes object (a mapping of apiVersion, kind, "
                                    f"metadata and spec), but {type(doc).__name__} {str(doc)[:80]!r}")
        docs += found
    return docs


def config_maps_among(docs: list[dict[str, Any]], default_namespace: str = "default"
                      ) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]], list[str]]:
    """(the llmfactory manifests, {(namespace, name): ConfigMap}, the other objects left out as
    "Kind namespace/name"): a DatasetBuild applied from files reads its ConfigMap sources from the
    same files; a Secret, a Namespace or an Argo CD Application beside them (a GitOps folder) is not
    the planner's. A document of llmfactory's group, or of none, is parsed (and refused if wrong)."""
    config_maps, rest, others = {}, [], []
    for doc in docs:
        meta, version = doc.get("metadata") or {}, str(doc.get("apiVersion") or "")
        where = (meta.get("namespace", default_namespace), meta.get("name"))
        if version == "v1" and doc.get("kind") == "ConfigMap":
            config_maps[where] = doc
        elif version and not version.startswith(f"{GROUP}/"):
            others.append(f"{doc.get('kind')} {where[0]}/{where[1]}")
        else:
            rest.append(doc)
    return rest, config_maps, others


def config_map_bytes(config_map: dict[str, Any], key: str) -> bytes | None:
    """A ConfigMap key's content, from data (text) or binaryData (base64); None when absent."""
    if key in (config_map.get("data") or {}):
        return config_map["data"][key].encode()
    if key in (config_map.get("binaryData") or {}):
        return base64.b64decode(config_map["binaryData"][key])
    return None
