"""A bounded randomized fault campaign (issue 14): nothing lost, nothing doubled, nothing wrong.

A fixed set of real MovieLens instances is ingested, each user's in time order, by a client that
retries until every batch is accepted, while a fault injector (fixed seed, loopback only) SIGKILLs
and restarts the sequencer and the source service, pauses (SIGSTOP) and restarts Redis (append-only
file on, so what was acknowledged survives) and tightens `maxmemory` for a while. Afterwards:

- every accepted instance is in its user's sequence exactly once (no member missing, none extra);
- for random request times, the history endpoint lists exactly the reference history computed from
  the raw instances (newest first, strictly before T, at most L), and Score's `history_length`
  equals its length;
- Score answers equal those of a fault-free run of the same instances (same InsEmbs: each is a
  function of the instance and the user's earlier stored instances, which a per-user in-order
  client makes the same in both runs).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import defaultdict

import httpx
import numpy as np
import pytest

from harness.processes import ServiceProcess, free_port
from models.data.raw import raw_instances
from models.data.schema import load_schema
from storage.connection import EmbeddedRedis, connect

pytestmark = pytest.mark.slow

SEED = 1405
N_USERS = 24
BATCH = 6
REQUESTS = 48          # random (user, T) queries compared against the reference
CANDIDATES = [str(i) for i in range(1, 21)]
CONTEXT = ("age", "gender", "occupation", "zip_code")


class Redis:
    """A redis-server on a fixed loopback port with an append-only file fsynced on every write."""

    def __init__(self, directory):
        self.directory, self.port, self.server = directory, free_port(), None

    def start(self) -> "Redis":
        self.server = EmbeddedRedis(directory=self.directory, port=self.port,
                                    extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def pid(self) -> int:
        return self.server.process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def workload(movielens_models):
    """N_USERS trained users with 20..80 instances each, every user's instances in time order."""
    raw = raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)
    by_user: dict[str, list[dict]] = defaultdict(list)
    for inst in raw:
        if int(inst["user_id"]) <= movielens_models.max_users:
            by_user[inst["user_id"]].append(inst)
    eligible = sorted(u for u, items in by_user.items() if 20 <= len(items) <= 80)
    users = random.Random(SEED).sample(eligible, N_USERS)
    return {u: sorted(by_user[u], key=lambda i: (i["timestamp_ms"], i["request_id"], i["item_id"])) for u in users}


class Stack:
    """Redis and the three services as real processes; each service restartable on its port."""

    def __init__(self, model_dir, tmp):
        self.tmp = tmp
        self.redis = Redis(tmp / "redis").start()
        self.env = {"REDIS_URL": self.redis.url, "IAT_MODEL_DIR": str(model_dir), "IAT_REDIS_TIMEOUT_S": "0.5",
                    "IAT_CLAIM_IDLE_MS": "1000", "IAT_RELOAD_INTERVAL_S": "0", "IAT_API_TOKEN": ""}
        self.ports = {"sequencer": free_port(), "source": free_port(), "ranking": free_port()}
        self.grpc_port = free_port()
        self.procs: dict[str, ServiceProcess] = {}
        for name in ("sequencer", "source", "ranking"):
            self.start(name)

    def start(self, name: str) -> None:
        extra = ["--grpc-port", str(self.grpc_port)] if name == "ranking" else []
        proc = ServiceProcess(["serve", name, "--host", "127.0.0.1", *extra], env=self.env,
                              log_path=self.tmp / f"{name}.log", http_port=self.ports[name])
        self.procs[name] = proc.wait("/readyz", timeout_s=180)

    def restart(self, name: str) -> None:
        self.procs[name].kill(signal.SIGKILL)
        self.start(name)

    def url(self, name: str) -> str:
        return self.procs[name].base_url

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.redis.stop()


def _ingest(stack: Stack, workload: dict, stop: threading.Event, accepted: dict) -> None:
    """Round-robin over users, each user's batches in time order; a batch is retried until the
    source accepts it (503 / 5xx / connection refused while a fault lasts)."""
    queues = {u: [items[i:i + BATCH] for i in range(0, len(items), BATCH)] for u, items in workload.items()}
    http = httpx.Client(timeout=10.0)
    while any(queues.values()):
        for user in list(queues):
            if not queues[user]:
                continue
            batch = queues[user].pop(0)
            deadline = time.monotonic() + 300
            while True:
                assert time.monotonic() < deadline, f"batch of user {user} never accepted"
                try:
                    reply = http.post(stack.url("source") + "/v1/instances", json={"instances": batch})
                    if reply.status_code == 200:
                        accepted[user].extend(int(i) for i in reply.json()["ins_ids"])
                        break
                    assert reply.status_code in (503, 500, 502, 504), reply.text
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            time.sleep(0.03)  # paced, so that faults meet ingest in flight
    stop.set()


def _inject_faults(stack: Stack, stop: threading.Event, log: list) -> None:
    try:
        _faults(stack, stop, log)
    except BaseException as exc:  # the test fails on it instead of running on without faults
        log.append(exc)


def _faults(stack: Stack, stop: threading.Event, log: list) -> None:
    rng = random.Random(SEED)
    admin = lambda: connect(stack.redis.url, socket_timeout=5)  # noqa: E731
    while not stop.wait(rng.uniform(0.4, 1.2)):
        action = rng.choice(["kill_sequencer", "kill_source", "pause_redis", "restart_redis", "tight_memory"])
        log.append(action)
        if action == "kill_sequencer":
            stack.restart("sequencer")
        elif action == "kill_source":
            stack.restart("source")
        elif action == "pause_redis":
            os.kill(stack.redis.pid, signal.SIGSTOP)
            time.sleep(rng.uniform(0.3, 1.0))
            os.kill(stack.redis.pid, signal.SIGCONT)
        elif action == "restart_redis":
            stack.redis.stop()
            stack.redis.start()
        else:
            client = admin()
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used + 64 * 1024)
            time.sleep(rng.uniform(0.5, 1.5))
            client.config_set("maxmemory", 0)
            client.close()


def _reference(items: list[dict], ins_ids: list[int], before_ms: int, limit: int) -> list[int]:
    """The user's instances strictly before T, newest first (ties: larger InsID first), at most L."""
    rows = sorted(((inst["timestamp_ms"], iid) for inst, iid in zip(items, ins_ids) if inst["timestamp_ms"] < before_ms),
                  reverse=True)
    return [iid for _, iid in rows[:limit]]


def _run(model_dir, tmp, workload: dict, faults: bool) -> dict:
    stack = Stack(model_dir, tmp)
    try:
        accepted: dict[str, list[int]] = defaultdict(list)
        stop, log = threading.Event(), []
        injector = threading.Thread(target=_inject_faults, args=(stack, stop, log), daemon=True) if faults else None
        if injector:
            injector.start()
        _ingest(stack, workload, stop, accepted)
        if injector:
            injector.join(timeout=120)
            errors = [e for e in log if isinstance(e, BaseException)]
            assert not errors, f"the fault injector failed: {errors!r}"
            for name in ("sequencer", "source", "ranking"):   # every process up again after the last fault
                stack.procs[name].wait("/readyz", timeout_s=120)
        client = connect(stack.redis.url, socket_timeout=5)
        # Every accepted instance sequenced exactly once: wait for the sequencer to catch up.
        deadline = time.monotonic() + 180
        while True:
            members = {u: {int(m) for m in client.zrange(f"iat:seq:{{{u}}}", 0, -1)} for u in workload}
            if all(members[u] == set(accepted[u]) for u in workload) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for u in workload:
            assert len(accepted[u]) == len(set(accepted[u])) == len(workload[u])
            assert client.zcard(f"iat:seq:{{{u}}}") == len(workload[u])
            assert members[u] == set(accepted[u]), f"user {u}: missing {set(accepted[u]) - members[u]}, extra {members[u] - set(accepted[u])}"
        # Random request times against the reference, through the history endpoint and Score.
        rng = random.Random(SEED + 1)
        http = httpx.Client(timeout=30.0)
        results = []
        limit = None
        for _ in range(REQUESTS):
            user = rng.choice(sorted(workload))
            items = workload[user]
            t = rng.choice(items)["timestamp_ms"] + rng.choice([0, 1, 3_600_000])
            body = {"request_id": "campaign", "user_id": user, "request_time_ms": t, "model": "iat",
                    "context": {"categorical": {k: items[0]["features"]["categorical"][k] for k in CONTEXT}},
                    "candidates": [{"item_id": c} for c in CANDIDATES]}
            score = http.post(stack.url("ranking") + "/v1/score", json=body)
            assert score.status_code == 200, score.text
            limit = limit or _max_history(model_dir)
            history = http.get(stack.url("ranking") + f"/v1/users/{user}/history", params={"before_ms": t, "limit": limit})
            assert history.status_code == 200, history.text
            listed = [int(i["ins_id"]) for i in history.json()["instances"]]
            expected = _reference(items, accepted[user], t, limit)
            assert listed == expected, f"user {user} T={t}: history endpoint differs from the reference"
            assert score.json()["history_length"] == len(expected)
            results.append((user, t, np.asarray(score.json()["scores"], dtype=np.float64)))
        return {"results": results, "faults": log}
    finally:
        stack.close()


def _max_history(model_dir) -> int:
    from contract.artifacts import latest_version, read_manifest

    return read_manifest(latest_version(model_dir, "iat")).max_history


def test_randomized_faults_lose_double_and_corrupt_nothing(movielens_models, workload, tmp_path):
    clean = _run(movielens_models.model_dir, tmp_path / "clean", workload, faults=False)
    faulty = _run(movielens_models.model_dir, tmp_path / "faulty", workload, faults=True)
    assert len(faulty["faults"]) >= 5, f"too few faults met the ingest: {faulty['faults']}"
    assert {"kill_sequencer", "kill_source", "pause_redis", "restart_redis", "tight_memory"} & set(faulty["faults"])
    for (u1, t1, s1), (u2, t2, s2) in zip(clean["results"], faulty["results"]):
        assert (u1, t1) == (u2, t2)
        np.testing.assert_allclose(s2, s1, atol=1e-6, err_msg=f"user {u1} T={t1}: scores differ from the fault-free run")
    print(f"faults injected ({len(faulty['faults'])}): "
          + ", ".join(f"{a} x{faulty['faults'].count(a)}" for a in sorted(set(faulty["faults"]))))
