"""The demo's flow end to end on synthetic data, and its clean-up when interrupted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
DEMO = [sys.executable, "-m", "cli", "demo", "--synthetic", "--max-users", "60"]


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_demo_runs_end_to_end_on_synthetic_data(tmp_path):
    result = subprocess.run(DEMO + ["--out", str(tmp_path / "demo")], capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("1/6 data", "2/6 training", "3/6 exporting", "4/6 starting", "5/6 replaying", "6/6 scoring"):
        assert step in out
    assert "A. leave-one-out" in out and "B. ranking what the user really rated next" in out
    assert "latency per stage" in out and "fetch" in out and "/metrics" in out
    assert "services and Redis are stopped now" in out
    assert (tmp_path / "demo" / "models" / "iat").is_dir()


def test_demo_cleans_up_when_terminated(tmp_path):
    proc = subprocess.Popen(DEMO + ["--out", str(tmp_path / "demo")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "5/6 replaying" in line or time.monotonic() > deadline:
            children = _children_of(proc.pid)  # redis-server and the three services
            break
    assert len(children) >= 4, children
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest[-2000:]
    deadline = time.monotonic() + 60  # the children exit on their own signal handling: wait for it
    while [c for c in children if _alive(c)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [c for c in children if _alive(c)] == []
