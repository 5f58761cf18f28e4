"""torch intra-op threads from the CPU quota: the quota read from cgroup files (v2 and v1,
nested hierarchies, laid out in a tmp dir the way the kernel does), the split among model
workers, and a real `iat serve ranking` process reporting the count its model workers run with."""
from __future__ import annotations

import os
import re

import httpx
import pytest

from services.cpus import available_cpus, cgroup_cpu_limit, intra_op_threads
from tests.conftest import free_port


def _v2(root, own_path: str, limits: dict[str, str]):
    """A cgroup v2 tree: cgroup.controllers at the root, cpu.max per directory, and the
    /proc/self/cgroup line naming the process's cgroup."""
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for rel, value in limits.items():
        d = root / rel if rel else root
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value + "\n")
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::{own_path}\n")
    return proc


def test_cgroup_v2_quota_is_quota_over_period(tmp_path):
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = _v2(root, "/", {"": "150000 100000"})   # a container's view: its cgroup at the root
    assert cgroup_cpu_limit(root, proc) == 1.5
    proc = _v2(root, "/", {"": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v2_tightest_limit_along_the_hierarchy_applies(tmp_path):
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = _v2(root, "/kubepods.slice/pod1/ctr", {"kubepods.slice": "max 100000",
                                                   "kubepods.slice/pod1": "200000 100000",
                                                   "kubepods.slice/pod1/ctr": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == 2.0
    (root / "kubepods.slice/pod1/ctr/cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 0.5
    # a path from the host's hierarchy that this mount namespace does not show: the root counts
    proc.write_text("0::/somewhere/else\n")
    (root / "cpu.max").write_text("300000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 3.0


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    (cpu / "cpu.cfs_quota_us").write_text("250000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(root, proc) == 2.5
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-proc") is None


def test_available_cpus_is_affinity_capped_by_the_quota_rounded_down(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = _v2(root, "/", {"": "150000 100000"})
    assert available_cpus(root, proc) == 1                     # 1.5 CPUs: one thread, not throttled
    _v2(root, "/", {"": "25000 100000"})
    assert available_cpus(root, proc) == 1                     # never below one
    _v2(root, "/", {"": f"{100000 * (affinity + 8)} 100000"})
    assert available_cpus(root, proc) == affinity              # a quota above the cpuset: the cpuset
    _v2(root, "/", {"": "max 100000"})
    assert available_cpus(root, proc) == affinity


def test_intra_op_threads_shares_the_cpus_among_model_workers():
    assert intra_op_threads(0, workers=2, cpus=8) == 4
    assert intra_op_threads(0, workers=3, cpus=8) == 2
    assert intra_op_threads(0, workers=4, cpus=2) == 1
    assert intra_op_threads(0, workers=1, cpus=2) == 2
    assert intra_op_threads(3, workers=2, cpus=8) == 3          # IAT_TORCH_THREADS wins


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))


@pytest.mark.parametrize("env, expected", [
    ({"IAT_MODEL_THREADS": "2"}, lambda: max(1, available_cpus() // 2)),
    ({"IAT_MODEL_THREADS": "2", "IAT_TORCH_THREADS": "3"}, lambda: 3),
], ids=["auto", "setting"])
def test_ranking_process_reports_the_threads_its_model_workers_use(start_service, redis_server, tmp_path,
                                                                    env, expected):
    """The process shares this test's affinity and cgroup, so it must find the same CPU count.
    The gauge is read back from a model worker thread, not from the main thread's setting."""
    ranking = start_service(["serve", "ranking", "--grpc-port", str(free_port())],
                            env={"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(tmp_path / "no-models"),
                                 "IAT_RELOAD_INTERVAL_S": "0", **env})
    metrics = httpx.get(ranking.base_url + "/metrics", timeout=30).text
    assert _gauge(metrics, "iat_torch_threads") == expected()
    assert _gauge(metrics, "iat_cpus_available") == available_cpus()
    assert f"torch intra-op threads: {expected()}" in ranking.log_tail(20_000)
