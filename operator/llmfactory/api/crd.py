"""API models -> apiextensions.k8s.io/v1 CustomResourceDefinitions with structural schemas."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from .. import GROUP, VERSION
from .common import KindInfo

# Keys of pydantic's JSON schema that a structural OpenAPI v3 schema does not take.
_DROPPED = {"title", "$defs", "discriminator"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs, turn Optional into plain optional fields, map draft-2020 keywords onto OpenAPI v3."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        target.update(node)  # a field's own description wins over the type's
        node = target
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions are not structural: {options}")
        merged = dict(options[0])
        merged.update(node)
        node = merged
        if "$ref" in node:
            return _structural(node, defs)
    if node.get("default", 0) is None:
        del node["default"]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or (key == "additionalProperties" and isinstance(value, bool)):
            continue  # a boolean here is not structural: pruning, or preserve-unknown-fields, says it
        if key == "properties":
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    if "properties" in out or "additionalProperties" in out:
        out.setdefault("type", "object")
    return out


class _FactoryDefaults(GenerateJsonSchema):
    """Fields with a default_factory get their default in the schema too, as Kubebuilder's
    `+kubebuilder:default`: the API server then stores what the operator will use (`kubectl get -o
    yaml` and `kubectl explain` show it, CEL rules see it). A nested object defaults to `{}`, whose
    own fields' defaults the server fills in, so each default is written once."""

    def get_default_value(self, schema):
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return {}
        default = factory()
        return default if default is not None else NoDefault


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_FactoryDefaults)
    return _structural(raw, raw.get("$defs", {}))


def crd(info: KindInfo) -> dict[str, Any]:
    spec_schema = openapi_schema(info.spec)
    status_schema = openapi_schema(info.status)
    spec_schema["description"] = info.description
    status_schema["description"] = "Observed state, written by the operator (or the local runner)."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.kind.lower(),
                "shortNames": info.short_names,
                "categories": ["llmfactory"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.figure"},
                    {"name": info.headline_column, "type": "string", "jsonPath": ".status.headline"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": info.description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
            }],
        },
    }
