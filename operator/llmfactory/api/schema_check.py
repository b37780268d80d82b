"""Validate a custom resource against a CRD's structural schema the way the API server would:
defaults, types, required fields, enums, patterns, bounds, CEL rules (x-kubernetes-validations) -- and
report fields the server would silently prune, which are bugs in a manifest.

The planner runs it on every manifest (llmfactory plan and run, the operator), so a manifest that
`kubectl apply` would refuse is refused locally too, with the API server's message: the CEL rules
of the API types are their single statement, not mirrored by hand in Python."""

from __future__ import annotations

import copy
import difflib
import json
import re
from functools import lru_cache
from typing import Any

import celpy

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}
_cel = celpy.Environment()


@lru_cache(maxsize=None)
def _program(rule: str):
    return _cel.program(_cel.compile(rule))


@lru_cache(maxsize=4096)
def _verdict(rule: str, value_json: str) -> bool | str:
    """Whether the rule holds for the value (as JSON), or why it could not be evaluated. Memoised:
    the operator validates the same spec at every reconciliation of it, and cel-python interprets
    each rule in Python (its rules were most of a FineTune's ~9 ms parse)."""
    try:
        return bool(_program(rule).evaluate({"self": celpy.json_to_cel(json.loads(value_json))}))
    except celpy.CELEvalError as exc:  # the API server refuses the object too (e.g. "no such key")
        return str(exc.args[0] if exc.args else exc)


def _cel_check(rule: dict, value_json: str, path: str) -> list[str]:
    verdict = _verdict(rule["rule"], value_json)
    if isinstance(verdict, str):
        return [f"{path}: {rule.get('message', rule['rule'])} (the rule {rule['rule']!r} could not be evaluated: "
                f"{verdict})"]
    if not verdict:
        return [f"{path}{rule.get('fieldPath', '')}: {rule.get('message', rule['rule'])}"]
    return []


def without_nulls(value: Any) -> Any:
    """The object as the API server stores it: a null is an unset field (the server drops nulls of
    fields that are not `nullable`, and no field of these CRDs is)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def with_defaults(schema: dict, value: Any) -> Any:
    """The object with the schema's defaults filled in where a field is absent, at every depth, as
    the API server stores it before it validates (CEL rules see the defaults). A defaulted `{}` gets
    its own fields' defaults in turn."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            value = {**{k: copy.deepcopy(p["default"]) for k, p in props.items() if "default" in p}, **value}
            return {k: with_defaults(props[k], v) if k in props else v for k, v in value.items()}
        if isinstance(schema.get("additionalProperties"), dict):
            return {k: with_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(schema["items"], v) for v in value]
    return value


def _nearest(name: str, fields: dict) -> str:
    """What a misspelt field was likely meant to be (a singular, snake_case), else the fields there are."""
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
    return f"did you mean {close[0]}?" if close else f"the fields here: {', '.join(sorted(fields))}"


def validate(schema: dict, value: Any, path: str = "") -> list[str]:
    errors: list[str] = []
    kind = schema.get("type")
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected integer, got {value!r}"]
    elif kind == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{path}: expected number, got {value!r}"]
    elif kind in _TYPES and not isinstance(value, _TYPES[kind]):
        return [f"{path}: expected {kind}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    for bound, ok in (("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b)):
        if bound in schema and isinstance(value, (int, float)):
            exclusive = schema.get("exclusive" + bound.capitalize(), False)
            if not ok(value, schema[bound]) or (exclusive and value == schema[bound]):
                errors.append(f"{path}: {value} violates {bound} {schema[bound]}")
    for bound, ok in (("minLength", lambda n, b: n >= b), ("maxLength", lambda n, b: n <= b),
                      ("minItems", lambda n, b: n >= b), ("maxItems", lambda n, b: n <= b)):
        if bound in schema and not ok(len(value), schema[bound]):
            errors.append(f"{path}: length {len(value)} violates {bound} {schema[bound]}")
    if isinstance(value, dict):
        props = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        for name, item in value.items():
            if props is not None and name in props:
                errors += validate(props[name], item, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(schema["additionalProperties"], item, f"{path}.{name}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field (the API server would prune it); {_nearest(name, props)}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(schema["items"], item, f"{path}[{i}]")
        if schema.get("x-kubernetes-list-type") == "set":  # the API server's "Duplicate value"
            seen = set()
            for i, item in enumerate(value):
                key = json.dumps(item, sort_keys=True)
                if key in seen:
                    errors.append(f"{path}[{i}]: duplicate value {item!r}: a set names each value once")
                seen.add(key)
        if schema.get("x-kubernetes-list-type") == "map":  # the API server's "Duplicate value" of an item's keys
            keys, seen = schema.get("x-kubernetes-list-map-keys", []), set()
            for i, item in enumerate(value):
                key = tuple((item or {}).get(k) for k in keys) if isinstance(item, dict) else None
                if key in seen:
                    named = ", ".join(f"{k} {v!r}" for k, v in zip(keys, key))
                    errors.append(f"{path}[{i}]: duplicate {named}: each item of this list names its own")
                seen.add(key)
    if not errors:
        rules = schema.get("x-kubernetes-validations", [])
        value_json = json.dumps(value, sort_keys=True) if rules else ""  # once for all the node's rules
        for rule in rules:
            errors += _cel_check(rule, value_json, path)
    return errors


def validate_resource(crd: dict, manifest: dict) -> list[str]:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    kept = ("apiVersion", "kind", "metadata", "spec", "status")
    body = with_defaults(schema, without_nulls({k: v for k, v in manifest.items() if k in kept}))
    return validate(schema, body, manifest.get("kind", ""))  # as the API server stores it
