"""The control plane never imports torch; the runtime never imports kubernetes."""

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules(package_dir: Path, package: str) -> list[str]:
    return [package] + [m.name for m in pkgutil.walk_packages([str(package_dir)], prefix=package + ".")]


def _imported_after(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print('\\n'.join(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_control_plane_never_imports_torch():
    modules = _modules(ROOT / "operator" / "llmfactory", "llmfactory")
    assert "llmfactory.local.runner" in modules and "llmfactory.planner.tasks" in modules
    loaded = _imported_after(modules)
    # The operator image installs only the `operator` extra: nothing of the runtime's may load.
    assert not loaded & {"torch", "transformers", "httpx", "datasets", "pyarrow", "datasketch", "py3langid", "lm_eval"}


def test_runtime_never_imports_kubernetes():
    modules = _modules(ROOT / "images" / "runtime" / "llmfactory_runtime", "llmfactory_runtime")
    assert "llmfactory_runtime.finetune.train" in modules
    loaded = _imported_after(modules)
    assert "torch" in loaded  # the check ran the real phases' imports
    assert "kubernetes" not in loaded and "kopf" not in loaded and "llmfactory" not in loaded
