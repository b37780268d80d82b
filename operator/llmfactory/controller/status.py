"""kstatus conditions (Ready, Reconciling, Stalled) and the status patch of each situation."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ..api.headline import gates_failed, headline


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(old: list[dict[str, Any]], generation: int | None, **new: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The full conditions list with `new` applied (type -> (status, reason, message)); a
    condition whose status does not change keeps its lastTransitionTime."""
    by_type = {c["type"]: c for c in old or []}
    for ctype, (status, reason, message) in new.items():
        previous = by_type.get(ctype)
        changed = previous is None or previous.get("status") != status
        by_type[ctype] = {"type": ctype, "status": status, "reason": reason, "message": message,
                          "lastTransitionTime": now() if changed else previous.get("lastTransitionTime", now()),
                          **({"observedGeneration": generation} if generation is not None else {})}
    order = ["Ready", "Reconciling", "Stalled"]
    return sorted(by_type.values(), key=lambda c: order.index(c["type"]) if c["type"] in order else 9)


def situation(phase: str, reason: str, message: str, old: dict[str, Any], generation: int | None,
              **fields: Any) -> dict[str, Any]:
    """The status patch for a phase; Ready, Reconciling and Stalled follow from it."""
    ready = ("True" if phase == "Succeeded" else "False", reason, message)
    reconciling = ("True", reason, message) if phase in ("Pending", "Waiting", "Running") else ("False", reason, "")
    stalled = ("True", reason, message) if phase == "Failed" else ("False", reason, "")
    return {"phase": phase, "observedGeneration": generation,
            "conditions": conditions(old.get("conditions", []), generation,
                                     Ready=ready, Reconciling=reconciling, Stalled=stalled),
            **fields}


def succeeded(kind: str, result: dict[str, Any], old: dict[str, Any], generation: int | None, **fields) -> dict[str, Any]:
    line = headline(kind, result)
    failure = gates_failed(kind, result)
    if failure:
        reason = "ValidationFailed" if kind == "Quantization" else "GatesFailed"
        return situation("Failed", reason, failure, old, generation, result=result, headline=line, **fields)
    return situation("Succeeded", "Succeeded", line, old, generation, result=result, headline=line, **fields)
