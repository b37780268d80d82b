"""Thread pools sized by the pod's CPU limit, not by the node's cores (cgroup files as the kernel
writes them; the node is a 96-core one)."""

from __future__ import annotations

import os

import pytest
import torch

from llmfactory_runtime import cpus
from llmfactory_runtime.__main__ import _size_thread_pools


@pytest.fixture
def node_of_96_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "800000 100000\n"}, 8),  # cgroup v2, resources.limits.cpu: "8"
    ({"cpu.max": "250000 100000\n"}, 3),  # "2500m": a third thread, or a quarter of the quota idles
    ({"cpu.max": "20000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, 96),  # no limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "1600000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 16),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 96),  # v1, no limit
    ({}, 96),  # no cgroup files at all (not in a container)
])
def test_the_cpus_a_process_may_use_are_its_cgroups_quota(tmp_path, node_of_96_cores, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpus.available(tmp_path) == expected


def test_torch_threads_share_the_quota_among_a_pods_processes_unless_the_user_chose(tmp_path, node_of_96_cores):
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert cpus.torch_threads({}, tmp_path) == 8
    assert cpus.torch_threads({"LOCAL_WORLD_SIZE": "4"}, tmp_path) == 2  # four GPUs' processes in one pod
    assert cpus.torch_threads({"LOCAL_WORLD_SIZE": "16"}, tmp_path) == 1
    assert cpus.torch_threads({"OMP_NUM_THREADS": "6"}, tmp_path) is None  # torchrun's or the user's choice stands


def test_the_entrypoint_sets_torchs_pool_to_its_share_and_the_tokenizers_pool_to_the_pods_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpus, "available", lambda cgroup=cpus.CGROUP: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        _size_thread_pools()
        # The tokenizers library's (rayon's) threads: all the pod's CPUs, for the one process of the
        # node that tokenizes a FineTune's dataset while the others wait.
        assert torch.get_num_threads() == 3 and os.environ["RAYON_NUM_THREADS"] == "6"
        monkeypatch.setenv("RAYON_NUM_THREADS", "2")  # the user's choice stands
        _size_thread_pools()
        assert os.environ["RAYON_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)
