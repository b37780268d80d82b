"""Every manifest under examples/ is accepted by the CRDs (nothing pruned), by the API models,
and plans in dependency order."""

from pathlib import Path

import pytest
import yaml

from llmfactory.api import KINDS
from llmfactory.planner import Waiting, dependency_order, parse, plan, read_manifests
from llmfactory.api.schema_check import validate_resource

ROOT = Path(__file__).resolve().parents[2]
CRDS = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"]: yaml.safe_load(p.read_text())
        for p in (ROOT / "crds").glob("*.yaml")}
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert any("quickstart" in str(p) for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_validates_against_its_crd(path):
    for doc in read_manifests([path]):
        assert doc["kind"] in CRDS, f"{path}: unknown kind {doc['kind']}"
        assert validate_resource(CRDS[doc["kind"]], doc) == []
        parse(doc)


def test_reference_workload_is_there():
    assert any("seed-llama3" in str(p) for p in EXAMPLES) and any("multi-node" in str(p) for p in EXAMPLES)


# An example is a top-level folder; its subfolders (variants such as seed-llama3/multi-node) plan with it.
@pytest.mark.parametrize("folder", sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir()),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_example_folder_plans_in_dependency_order(folder):
    resources = dependency_order(parse(m) for m in read_manifests([folder]))
    kinds = [r.kind for r in resources]
    assert kinds.index("DatasetBuild") < kinds.index("FineTune") < kinds.index("Benchmark")
    first = plan(resources[0], lambda *k: None, "s3://bucket/llmfactory")
    assert not isinstance(first, Waiting) and first["artifactUri"].startswith("s3://bucket/llmfactory/default/")
    assert set(KINDS) == set(kinds)


# What upstream resources report when they succeed (the fields the planner reads).
UPSTREAM = {
    "DatasetBuild": {"uri": "s3://bucket/data", "format": "sharegpt", "digest": "sha256:d"},
    "FineTune": {"modelUri": "s3://bucket/model", "digest": "sha256:m", "baseModel": {"huggingface": "org/base"},
                 "datasetUri": "s3://bucket/data", "datasetFormat": "sharegpt", "datasetDigest": "sha256:d"},
    "Benchmark": {"metrics": {"judge.score": 7.0}, "gates": [], "passed": True, "reportUri": "s3://bucket/r"},
    "Quantization": {"artifacts": [{"uri": "s3://bucket/q/model-q8_0.gguf", "sha256": "q"}],
                     "datasetUri": "s3://bucket/data", "datasetFormat": "sharegpt", "datasetDigest": "sha256:d"},
}


@pytest.mark.parametrize("folder", sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir()),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_plans_once_what_it_references_succeeded(folder):
    """Every resource, not only the first: gates, estimates and references are checked too."""
    resources = dependency_order(parse(m) for m in read_manifests([folder]))
    by_name = {(r.kind, r.name): r for r in resources}
    for res in resources:
        def result_of(kind, namespace, name):
            assert (kind, name) in by_name, f"{res.ref} references {kind} {name}, which the example lacks"
            if kind == "FineTune":  # a reward model is only what a FineTune with objective reward trained
                return {**UPSTREAM[kind], "objective": by_name[kind, name].spec.objective}
            if kind == "DatasetBuild":  # conversations, preference pairs or prompts with references
                spec = by_name[kind, name].spec  # and, with difficulty, what its sampling asked
                sampled = {"difficultyUsage": {"requests": 8, "cached": 0, "promptTokens": 0, "completionTokens": 0}}
                return {**UPSTREAM[kind], "format": spec.written_format(), **(sampled if spec.difficulty else {})}
            return UPSTREAM[kind]
        task = plan(res, result_of, "s3://bucket/llmfactory")
        assert not isinstance(task, Waiting) and task["digest"]
