"""``--workers auto``: how many processes this machine (or container) gives us cores for."""

from __future__ import annotations

import os


def default_count(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """``--workers auto``: the cores this process may run on (its CPU affinity), capped by
    its cgroup's CPU quota (cgroup v2 ``cpu.max``: a container given 1.5 CPUs gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_cpus(cgroup_root: str, proc_cgroup: str) -> int | None:
    """Whole CPUs (rounded up) allowed by cpu.max of this process's cgroup and its parents;
    None when there is no limit or no cgroup v2."""
    try:
        with open(proc_cgroup) as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    best = None
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(cgroup_root, *parts[:depth], "cpu.max")) as f:
                fields = f.read().split()
        except OSError:
            continue
        limit, period = (fields + ["max", "100000"])[:2]
        if limit != "max":
            try:
                cpus = -(-int(limit) // int(period))
            except (ValueError, ZeroDivisionError):
                continue
            best = cpus if best is None else min(best, cpus)
    return best
