"""How many CPUs this process may use: a container's CPU limit, not the node's cores.

PyTorch (OpenMP) and llama.cpp size their thread pools by the machine's cores. In a pod limited
to 8 CPUs on a 96-core node that is 96 threads sharing 8 CPUs' worth of CFS quota: the kernel
throttles them for most of each period, and the phase runs slower than with 8 threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available(cgroup: Path = CGROUP) -> int:
    """The CPUs this process is pinned to, capped by its cgroup's CPU quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0))
    quota = _quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _quota(cgroup: Path) -> float | None:
    """The quota in CPUs, or None when there is none (cgroup v2's `cpu.max`, else v1's CFS files)."""
    v2 = cgroup / "cpu.max"
    if v2.is_file():
        limit, period = v2.read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    for controller in ("cpu", "cpu,cpuacct"):
        quota, period = cgroup / controller / "cpu.cfs_quota_us", cgroup / controller / "cpu.cfs_period_us"
        if quota.is_file() and period.is_file():
            value = int(quota.read_text())
            return None if value <= 0 else value / int(period.read_text())
    return None


def torch_threads(environ: Mapping[str, str] = os.environ, cgroup: Path = CGROUP) -> int | None:
    """Threads for PyTorch's pool: the CPUs this pod may use, shared among its training processes
    (torchrun's LOCAL_WORLD_SIZE). None when OMP_NUM_THREADS is set: the user's (or torchrun's)
    choice stands."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, available(cgroup) // int(environ.get("LOCAL_WORLD_SIZE", "1")))
