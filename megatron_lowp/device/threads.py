"""How many intra-op CPU threads a process uses: chosen deliberately, never by accident.

torch's default is every core it can see. On a machine whose cores are shared (several ranks per
node, other jobs, a container with a CPU quota) that oversubscribes, and OpenMP threads that wait
on each other spin: a 2-core machine ran the quickstart in 631 s with the default and 67 s with one
thread. The rule here, in order:
1. `device.cpu_threads: N` in the recipe;
2. `OMP_NUM_THREADS` in the environment (what torchrun sets for its workers, or what you export);
3. otherwise the cores this process may use (its CPU affinity, capped by a cgroup CPU quota)
   divided among the ranks of this node (`LOCAL_WORLD_SIZE`), at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def usable_cores() -> int:
    """Cores the scheduler lets this process run on: affinity, capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return math.ceil(int(text[0]) / int(text[1]))
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return math.ceil(quota / period)
    except (OSError, ValueError):
        pass
    return None


def choose_cpu_threads(setting: int | None) -> tuple[int, str]:
    """(threads, why) by the rule in this module's docstring."""
    if setting is not None:
        return setting, "device.cpu_threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = usable_cores()
    return max(1, cores // local_ranks), f"{cores} usable cores / {local_ranks} local rank{'s' * (local_ranks > 1)}"


def set_cpu_threads(setting: int | None) -> str:
    """Apply the rule; returns a line for the log, e.g. "CPU threads: 2 (2 usable cores / 1 local rank)"."""
    threads, why = choose_cpu_threads(setting)
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} per process ({why})"
