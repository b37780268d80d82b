"""A task's digest: the same inputs, the same digest, the same artifact prefix, so finished work is reused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..api.common import RUNTIME_ONLY_FIELDS, operational_fields
from .manifests import Resource


def canonical_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def digest_spec(res: Resource) -> dict[str, Any]:
    """The part of the spec a run's result depends on, as the digest sees it: fields left at their
    default are left out, so a field added with a default in a later version (which the CRD then
    fills into every stored object) does not make finished resources run again after an upgrade.
    How often to checkpoint or where to report does not change what is computed either."""
    written = res.spec.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")
    digested = {k: v for k, v in written.items() if k not in operational_fields(res.kind)}
    for path in RUNTIME_ONLY_FIELDS:
        *parents, field = path.split(".")
        holder = digested
        for key in parents:
            holder = holder.get(key) or {}
        holder.pop(field, None)
    return digested
