"""`iat replay`'s clear errors, without prompting (CI=true, no stdin): no trainer reachable, an
unknown dataset, a bad number. The replay itself, against real services, is in
test_demo_online.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "replay", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, "CI": "true"})


def test_no_trainer_reachable_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = replay("--trainer", url, "--source", url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"iat replay: no trainer reachable at {url}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset", "no-such-dataset"], "--dataset"),
    (["--max-users", "0"], "--max-users: must be >= 1, got 0"),
    (["--limit", "-3"], "--limit: must be >= 1, got -3"),
    (["--label-delay-s", "-1"], "--label-delay-s: must be >= 0"),
])
def test_bad_arguments_are_named(args, message):
    result = replay(*args, "--trainer", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
