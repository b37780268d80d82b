"""References between resources and the order they run in."""

from __future__ import annotations

from typing import Any, Iterable

from ..api.common import ApiModel, TrainedModelSource
from .errors import PlanError
from .manifests import Key, Resource


def references(res: Resource) -> list[tuple[str, str, str]]:
    """(field path, kind, name) of every resource this one reads from."""
    spec, refs = res.spec, []
    if res.kind == "FineTune" and spec.dataset.dataset_build_ref:
        refs.append(("spec.dataset.datasetBuildRef", "DatasetBuild", spec.dataset.dataset_build_ref.name))
    if res.kind == "FineTune" and spec.base_model.fine_tune_ref:
        refs.append(("spec.baseModel.fineTuneRef", "FineTune", spec.base_model.fine_tune_ref.name))
    if res.kind in ("Benchmark", "Quantization") and spec.model.fine_tune_ref:
        refs.append(("spec.model.fineTuneRef", "FineTune", spec.model.fine_tune_ref.name))
    if res.kind in ("FineTune", "Quantization") and spec.benchmark_ref:
        refs.append(("spec.benchmarkRef", "Benchmark", spec.benchmark_ref.name))
    if res.kind == "Benchmark":
        if spec.model.quantization_ref:
            refs.append(("spec.model.quantizationRef", "Quantization", spec.model.quantization_ref.name))
        if spec.baseline_model and spec.baseline_model.fine_tune_ref:
            refs.append(("spec.baselineModel.fineTuneRef", "FineTune", spec.baseline_model.fine_tune_ref.name))
        if spec.baseline_model and spec.baseline_model.quantization_ref:
            refs.append(("spec.baselineModel.quantizationRef", "Quantization",
                         spec.baseline_model.quantization_ref.name))
        for name, section in (("perplexity", spec.perplexity), ("reward", spec.reward), ("ranking", spec.ranking)):
            if section and section.dataset and section.dataset.dataset_build_ref:
                refs.append((f"spec.{name}.dataset.datasetBuildRef", "DatasetBuild", section.dataset.dataset_build_ref.name))
    for path, source in trained_models(res.spec):
        refs.append((f"{path}.fineTuneRef", "FineTune", source.fine_tune_ref.name))
    return refs


def trained_models(node: Any, path: str = "spec") -> list[tuple[str, TrainedModelSource]]:
    """(field path, source) of every model the spec names by fineTuneRef to read it (a teacher, a
    judge, a grader's reward model...), wherever it sits: a FineTune's baseModel, which it trains
    further, and the model a Benchmark or Quantization evaluates are read apart (inputs.py)."""
    if isinstance(node, TrainedModelSource):
        return [(path, node)] if node.fine_tune_ref else []
    if isinstance(node, list):
        return [found for i, item in enumerate(node) for found in trained_models(item, f"{path}[{i}]")]
    if not isinstance(node, ApiModel):
        return []
    return [found for name, field in type(node).model_fields.items()
            for found in trained_models(getattr(node, name), f"{path}.{field.alias or name}")]


def dependency_order(resources: Iterable[Resource]) -> list[Resource]:
    """Resources sorted so that each comes after what it references; dangling references and
    cycles are errors naming the resource and the field."""
    by_key: dict[Key, Resource] = {}
    for res in resources:
        if res.key in by_key:
            raise PlanError(res.ref, "metadata.name", "defined twice in the manifests")
        by_key[res.key] = res
    deps: dict[Key, list[Key]] = {}
    for res in by_key.values():
        deps[res.key] = []
        for path, kind, name in references(res):
            target = (kind, res.namespace, name)
            if target not in by_key:
                known = sorted(k[2] for k in by_key if k[0] == kind and k[1] == res.namespace)
                raise PlanError(res.ref, f"{path}.name",
                                f"{kind} {name!r} is not among the manifests (known: {known or 'none'})")
            deps[res.key].append(target)
    return [by_key[k] for k in topological(deps, lambda k: by_key[k].ref)]


def topological(deps: dict[Key, list[Key]], describe=str) -> list[Key]:
    """Depth-first order; a cycle raises a PlanError listing it."""
    order: list[Key] = []
    state: dict[Key, str] = {}

    def visit(key: Key, trail: list[Key]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = trail[trail.index(key):] + [key]
            raise PlanError(describe(key), "references", "cycle: " + " -> ".join(map(describe, cycle)))
        state[key] = "visiting"
        for dep in deps[key]:
            visit(dep, trail + [key])
        state[key] = "done"
        order.append(key)

    for key in deps:
        visit(key, [])
    return order
