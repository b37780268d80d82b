"""Real Helm (v3 and v4, fetched by scripts/fetch_helm.py at install) on the chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "llmfactory"
TOOLS = Path(sys.executable).parent.parent / "tools"  # .venv/tools, where `make` puts them
HELM_VERSIONS = ("3.18", "4.1")
RELEASE, NAMESPACE = "llmf", "llmfactory-system"


def helm(version: str) -> Path:
    binary = TOOLS / f"helm-{version}" / "helm"
    if not binary.exists():  # an environment made before the chart existed: fetch as `make` would
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_helm.py"), str(TOOLS)], check=True)
    return binary


def run(version: str, *args: str, values: dict[str, Any] | None = None, tmp: Path | None = None):
    command = [str(helm(version)), *args]
    if values is not None:
        path = (tmp or Path("/tmp")) / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.json"
        path.write_text(json.dumps(values))
        command += ["-f", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render(version: str, values: dict[str, Any], tmp: Path | None = None) -> list[dict[str, Any]]:
    result = run(version, "template", RELEASE, str(CHART), "-n", NAMESPACE, values=values, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
