"""Every manifest under examples/ is accepted by the CRDs (nothing pruned), by the API models,
and plans in dependency order."""

from pathlib import Path

import pytest
import yaml

from llmfactory.api import KINDS
from llmfactory.planner import Waiting, dependency_order, parse, plan, read_manifests
from tests.crd_schema import validate_resource

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


@pytest.mark.parametrize("folder", sorted({p.parent for p in EXAMPLES}), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_folder_plans_in_dependency_order(folder):
    resources = dependency_order(parse(m) for m in read_manifests([folder]))
    kinds = [r.kind for r in resources]
    assert kinds.index("DatasetBuild") < kinds.index("FineTune") < kinds.index("Benchmark")
    first = plan(resources[0], lambda *k: None, "s3://bucket/llmfactory")
    assert not isinstance(first, Waiting) and first["artifactUri"].startswith("s3://bucket/llmfactory/default/")
    assert set(KINDS) == set(kinds)
