"""How many CPUs this process may really use, and torch's intra-op threads from it.

``os.cpu_count()`` is the node's core count; a container or pod gets fewer through its CPU
affinity (cpusets) and its cgroup CPU quota (``docker --cpus``, the k8s CPU limit). Each model
worker of a service runs its own intra-op team, so a team as wide as the node per worker
oversubscribes the quota: the kernel then throttles the whole cgroup and tail latency jumps.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """controller ("" for cgroup v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


def _dirs_up(base: Path, cgroup: str | None) -> list[Path]:
    """The process's cgroup directory under ``base`` and each ancestor up to ``base`` (a limit on
    any of them applies). Inside a container the path in /proc/self/cgroup may name the host's
    hierarchy, which the container does not see: then only ``base`` itself is read."""
    dirs = []
    if cgroup and cgroup != "/":
        here = base / cgroup.lstrip("/")
        if here.is_dir():
            while here != base and base in here.parents:
                dirs.append(here)
                here = here.parent
    dirs.append(base)
    return dirs


def _quota(quota: str, period: str) -> float | None:
    """CPUs of one quota/period pair; None when unlimited ("max" in v2, -1 in v1) or unreadable."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs the cgroup CPU quota grants (quota / period, the tightest along the hierarchy), or
    None when there is no quota. cgroup v2 (``cpu.max``: "<quota|max> <period>") first, then v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 = unlimited)."""
    own = _own_cgroups(proc_cgroup)
    limits = []
    if (root / "cgroup.controllers").exists() or (root / "cpu.max").exists():
        for d in _dirs_up(root, own.get("")):
            raw = _read(d / "cpu.max")
            if raw and len(raw.split()) == 2:
                limits.append(_quota(*raw.split()))
    else:
        for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
            base = root / mount
            if not base.is_dir():
                continue
            for d in _dirs_up(base, own.get("cpu")):
                quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if quota is not None and period is not None:
                    limits.append(_quota(quota, period))
            break
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota rounded down
    (a 1.5-CPU quota keeps one thread busy without throttling, two would be throttled), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def intra_op_threads(setting: int, workers: int, cpus: int, processes: int = 1) -> int:
    """``setting`` when positive (IAT_TORCH_THREADS), else the CPUs shared out among the
    ``processes`` serving processes (IAT_RANKING_WORKERS) and, within each, the model workers
    that run forwards concurrently, at least one each."""
    if setting > 0:
        return setting
    return max(1, cpus // (max(1, processes) * max(1, workers)))


def configure_torch_threads(setting: int, workers: int, processes: int = 1) -> int:
    """Sets torch's intra-op threads for this process, before any model runs (a thread takes
    the value when it first runs torch: executor threads started later inherit it), publishes
    the choice as the ``iat_torch_threads`` gauge and returns it."""
    import torch

    from services import metrics

    cpus = available_cpus()
    threads = intra_op_threads(setting, workers, cpus, processes)
    torch.set_num_threads(threads)
    metrics.TORCH_THREADS.set(threads)
    metrics.CPUS_AVAILABLE.set(cpus)
    how = ("IAT_TORCH_THREADS" if setting > 0 else
           f"{cpus} CPUs available / {processes} process(es) / {workers} model worker(s) each")
    log.info("torch intra-op threads: %d (%s)", threads, how)
    return threads


async def report_worker_threads(executor) -> int:
    """What a model worker thread of ``executor`` really runs with, as the ``iat_torch_threads``
    gauge (the value set in the main thread only matters if the workers inherit it)."""
    import asyncio

    import torch

    from services import metrics

    threads = await asyncio.get_running_loop().run_in_executor(executor, torch.get_num_threads)
    metrics.TORCH_THREADS.set(threads)
    return threads
