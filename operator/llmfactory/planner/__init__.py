"""Manifests + referenced results -> task documents (the contract with the runtime)."""

from .checks import benchmark_metric_names
from .digest import canonical_digest
from .errors import PlanError
from .graph import dependency_order, references
from .manifests import ManifestError, Resource, config_maps_among, parse, read_manifests
from .promise import Promise, promised, promises_among
from .tasks import Waiting, plan

__all__ = ["ManifestError", "PlanError", "Promise", "Resource", "Waiting", "benchmark_metric_names", "canonical_digest",
           "config_maps_among", "dependency_order", "parse", "plan", "promised", "promises_among", "read_manifests",
           "references"]
