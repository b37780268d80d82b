"""API types: the single source of truth; crds/ is generated from them (llmfactory crds)."""

from . import benchmark, dataset_build, fine_tune, quantization
from .common import KindInfo

KINDS: dict[str, KindInfo] = {m.KIND.kind: m.KIND for m in (dataset_build, fine_tune, benchmark, quantization)}

__all__ = ["KINDS", "KindInfo"]
