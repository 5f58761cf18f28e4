"""`iat replay`'s clear errors, without prompting (CI=true, no stdin): no trainer reachable, an
unknown dataset, a bad number. The replay itself, against real services, is in
test_demo_online.py."""
from __future__ import annotations

import os
import re
import shutil
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


@pytest.mark.slow
def test_a_replay_with_late_labels_trains_every_instance_on_its_joined_labels(movielens_models, start_service,
                                                                             tmp_path):
    """Instances posted without labels, their labels by POST /v1/labels 60 s of event time later:
    the trainer trains every instance, none on a label the policy filled in (the window, 49 days,
    never closes first), and the replay reports it, a table and a plot."""
    import httpx

    from storage.connection import EmbeddedRedis

    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    try:
        env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(tmp_path / "models"), "IAT_TORCH_THREADS": "1",
               "IAT_TRAINER_DIR": str(tmp_path / "trainer"), "IAT_TRAINER_BATCH_SIZE": "64",
               "IAT_TRAINER_PUBLISH_EVERY": "128", "IAT_TRAINER_PUBLISH_INTERVAL_S": "0",
               "IAT_TRAINER_FLUSH_S": "0.5", "IAT_TRAINER_HISTORY_LIMIT": "31", "IAT_LABEL_WINDOW_S": "4294967",
               "IAT_RELOAD_INTERVAL_S": "0"}
        shutil.copytree(movielens_models.model_dir, tmp_path / "models")
        source = start_service(["serve", "source"], env=env)
        trainer = start_service(["serve", "trainer"], env=env)
        plot = tmp_path / "auc.png"
        result = replay("--dataset", "movielens-100k", "--data-dir", str(movielens_models.data_dir),
                        "--max-users", str(movielens_models.max_users), "--limit", "256", "--batch-size", "32",
                        "--late-labels", "--label-delay-s", "60", "--source", source.base_url,
                        "--trainer", trainer.base_url, "--plot", str(plot), "--poll-s", "0.2")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "posted 256 instances (256 accepted, 256 late label updates); trainer trained 256 (all trained)" \
            in result.stdout, result.stdout
        # a version after each 128 more trained (at the first step past it: partial batches after an idle 0.5 s)
        published = [int(n.replace(",", "")) for n in re.findall(r"after\s+([\d,]+) instances: source", result.stdout)]
        assert published and published[0] >= 128, result.stdout
        assert all(b - a >= 128 for a, b in zip(published, published[1:])), published
        stats = httpx.get(trainer.base_url + "/v1/stats", timeout=30).json()
        assert stats["instances"] == 256 and stats["progressive"]["iat"]["like"]["n"] == 256
        metrics = httpx.get(trainer.base_url + "/metrics", timeout=30).text
        defaulted = [line for line in metrics.splitlines()
                     if line.startswith("iat_trainer_defaulted_labels_total{") and not line.endswith(" 0.0")]
        assert defaulted == [], defaulted
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.stop()
