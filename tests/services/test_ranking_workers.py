"""IAT_RANKING_WORKERS = 2: a real `iat serve ranking` supervisor and its two worker processes on
one gRPC port and one HTTP port (SO_REUSEPORT), with a real Redis and the quick MovieLens models.
Both workers answer on each port, /metrics sums them, and a SIGTERM to the supervisor drains
both workers: requests they had begun are answered, then everything exits cleanly."""
from __future__ import annotations

import re
import signal
import socket
import time

import grpc
import httpx
import psutil
import pytest
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from tests.conftest import free_port

DEADLINE_S = 120.0
BODY = {"request_id": "w", "user_id": "no-such-user", "request_time_ms": 1_700_000_000_000,
        "context": {"categorical": {"age": "25", "gender": "M", "occupation": "student"}, "numeric": {}},
        "candidates": [{"item_id": str(1000 + k), "features": {"categorical": {"release_year": "1995", "class": "Drama"},
                                                                "numeric": {}}} for k in range(4)],
        "model": "iat"}


@pytest.fixture(scope="module")
def two_workers(start_module_service, redis_server, movielens_models):
    """One service for the module (starting two workers is the slow part); the drain test, which
    stops it, runs last."""
    grpc_port = free_port()
    ranking = start_module_service(["serve", "ranking", "--grpc-port", str(grpc_port)],
                            env={"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(movielens_models.model_dir),
                                 "IAT_RELOAD_INTERVAL_S": "0", "IAT_API_TOKEN": "", "IAT_RANKING_WORKERS": "2"})
    ranking.wait("/readyz", timeout_s=DEADLINE_S)
    ranking.grpc_port = grpc_port
    return ranking


def _workers(ranking) -> set[int]:
    return {p.pid for p in psutil.Process(ranking.proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())}


def _until_both(call, workers: set[int]) -> tuple[set[int], int]:
    """``call()`` -> the pid that answered, over fresh connections, until both workers have."""
    seen, calls = set(), 0
    deadline = time.monotonic() + DEADLINE_S
    while seen != workers and time.monotonic() < deadline:
        seen.add(call())
        calls += 1
    return seen, calls


@pytest.mark.slow
def test_two_workers_answer_on_one_port_and_metrics_sum_them(two_workers):
    ranking = two_workers
    deadline = time.monotonic() + DEADLINE_S
    while len(_workers(ranking)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _workers(ranking)
    assert len(workers) == 2 and ranking.proc.pid not in workers

    def rest() -> int:
        with httpx.Client(timeout=60) as client:  # a new connection each time
            response = client.post(ranking.base_url + "/v1/score", json=BODY)
        assert response.status_code == 200, response.text
        assert len(response.json()["scores"]) == 4 * len(response.json()["tasks"])
        return int(response.headers["x-iat-worker-pid"])

    def grpc_call() -> int:
        # a channel of its own (no shared subchannel): a new connection each time
        with grpc.insecure_channel(f"127.0.0.1:{ranking.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            response, call = ranking_pb2_grpc.RankingServiceStub(ch).Score.with_call(
                ranking_pb2.ScoreRequest(**{**BODY, "context": ranking_pb2.Features(**BODY["context"]),
                                            "candidates": [ranking_pb2.Candidate(item_id=c["item_id"],
                                                           features=ranking_pb2.Features(**c["features"]))
                                                           for c in BODY["candidates"]]}), timeout=60)
        assert len(response.scores) == 4 * len(response.tasks)
        return int(dict(call.trailing_metadata())["iat-worker-pid"])

    rest_pids, rest_calls = _until_both(rest, workers)
    grpc_pids, grpc_calls = _until_both(grpc_call, workers)
    assert rest_pids == workers and grpc_pids == workers

    text = httpx.get(ranking.base_url + "/metrics", timeout=30).text
    counts = {proto: sum(float(v) for v in re.findall(
        rf'^iat_ranking_request_seconds_count{{(?=[^}}]*protocol="{proto}")(?=[^}}]*status="OK")[^}}]*}} (\S+)$', text, re.M))
        for proto in ("rest", "grpc")}
    assert counts == {"rest": rest_calls, "grpc": grpc_calls}  # summed over both workers, whichever answered
    threads = dict(re.findall(r'^iat_torch_threads{pid="(\d+)"} (\S+)$', text, re.M))
    assert {int(p) for p in threads} == workers  # each worker's own gauge


def _held_request(port: int) -> tuple[socket.socket, int]:
    """A connection whose first Score was answered (naming its worker) and whose second is in
    flight: headers sent with ``Expect: 100-continue``, the worker's app already reading the body
    (it answered 100 Continue), the body not yet sent."""
    body = httpx.Request("POST", "http://x", json=BODY).content
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    sock.sendall(head + b"\r\n" + body)
    first = _read_response(sock)
    assert first.startswith(b"HTTP/1.1 200"), first[:300]
    pid = int(re.search(rb"x-iat-worker-pid: (\d+)", first).group(1))
    sock.sendall(head + b"Expect: 100-continue\r\n\r\n")
    interim = sock.recv(4096)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return sock, pid


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


@pytest.mark.slow
def test_sigterm_drains_both_workers_without_failing_a_request_in_flight(two_workers):
    ranking = two_workers
    held: list[tuple[socket.socket, int]] = []
    deadline = time.monotonic() + DEADLINE_S
    while len({pid for _, pid in held}) < 2 and time.monotonic() < deadline:
        held.append(_held_request(ranking.http_port))
    assert len({pid for _, pid in held}) == 2, "the kernel never gave a connection to the second worker"

    ranking.proc.send_signal(signal.SIGTERM)
    # both workers have closed their listeners (shutting down) while the requests are in flight
    while not _refused(ranking.http_port) and time.monotonic() < deadline + DEADLINE_S:
        time.sleep(0.05)
    assert _refused(ranking.http_port)
    body = httpx.Request("POST", "http://x", json=BODY).content
    for sock, pid in held:
        sock.sendall(body)
        answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200"), (pid, answer[:300])
        assert f"x-iat-worker-pid: {pid}".encode() in answer and b'"scores"' in answer
        sock.close()
    assert ranking.proc.wait(DEADLINE_S) == 0, ranking.log_tail()
    assert "ranking workers exited with [0, 0]" in ranking.log_tail(20_000)


@pytest.mark.slow
def test_a_worker_that_dies_takes_the_service_down_whole(start_service, redis_server, tmp_path):
    """No silent half capacity: the supervisor stops the other worker and exits non-zero, so that
    the orchestrator restarts the service."""
    ranking = start_service(["serve", "ranking", "--grpc-port", str(free_port())],
                            env={"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(tmp_path / "no-models"),
                                 "IAT_RELOAD_INTERVAL_S": "0", "IAT_RANKING_WORKERS": "2"})
    deadline = time.monotonic() + DEADLINE_S
    while len(_workers(ranking)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    first, second = sorted(_workers(ranking))
    psutil.Process(first).kill()
    assert ranking.proc.wait(DEADLINE_S) == 1
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
    assert "stopping the others" in ranking.log_tail(20_000)


def test_torch_threads_are_shared_among_the_workers_too():
    from services.cpus import intra_op_threads

    assert intra_op_threads(0, workers=2, cpus=8, processes=2) == 2
    assert intra_op_threads(0, workers=1, cpus=8, processes=4) == 2
    assert intra_op_threads(0, workers=2, cpus=2, processes=2) == 1   # never below one
    assert intra_op_threads(3, workers=2, cpus=8, processes=2) == 3   # IAT_TORCH_THREADS wins
