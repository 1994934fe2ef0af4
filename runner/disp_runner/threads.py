"""How many CPU threads torch uses in this process.

torch sizes its intra-op pool from the machine's cores, not from what the process may use: in a
container limited to 2 CPUs on a 64-core node it starts 64 spinning OpenMP threads, and on a shared
machine where another process holds a core, 2 threads ran about 9x slower than 1. The runner
therefore chooses: `--threads N` if given, else OMP_NUM_THREADS if set, else the container's CPU
quota (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) rounded up, else the
cores this process may run on."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Mapping

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """CPUs the container's quota allows (e.g. 1.5), or None when there is no quota."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def choose_threads(requested: int | None, environ: Mapping[str, str] = os.environ,
                   cgroup: Path = CGROUP) -> tuple[int, str]:
    """(threads, where the number came from)."""
    if requested is not None:
        return requested, "--threads"
    env = environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cgroup)
    if quota is not None:
        return max(1, min(cores, math.ceil(quota))), f"the container's CPU quota ({quota:g})"
    return cores, "the cores this process may use"


def apply_threads(threads: int) -> None:
    """Before torch is imported, the environment decides its pools; after, torch is told directly."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
