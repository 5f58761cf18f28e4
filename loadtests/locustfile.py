"""Locust load test of the served path: gRPC Score, REST /v1/score and ingest, at the same time.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000            # web UI
    make loadtest                                                                # headless, bounded

Requests come from real MovieLens-100K users (``$IAT_DATA_DIR/movielens-100k``): a user at the
time of one of their own instances, so history lengths spread as the data's (0 up to L), and
100 to 500 real items with their features as candidates. Without the data (e.g. a compose stack
seeded with synthetic data) requests fall back to numeric user and item ids without features.

Environment:
  IAT_GRPC_TARGET          host:port of gRPC Score (default: --host's name, port 50051)
  IAT_SOURCE_URL           source service for the ingest user (default: --host's name, port 8001)
  IAT_API_TOKEN            sent as ``Authorization: Bearer`` when set
  IAT_LOADTEST_MAX_USERS   draw requests from the first N users (sorted ids) only: those seeded
  IAT_LOADTEST_CANDIDATES  "lo,hi" candidates per request (default 100,500)
  IAT_LOADTEST_INGEST_BATCH instances per ingest POST (default 16)
  IAT_LOADTEST_UNTIL_REQUESTS quit once every request kind (gRPC Score, REST score, ingest) has this
                           many successful answers; --run-time is then only the deadline (exit 3 if it
                           comes first)
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

try:  # gRPC's blocking calls must yield to Locust's gevent loop
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()
except ImportError:  # pragma: no cover - grpcio without gevent support
    pass

import gevent
import grpc
import numpy as np
from iat.ranking.v1 import ranking_pb2_grpc
from locust import HttpUser, User, between, events, task
from locust.clients import HttpSession
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from harness.bench_ranking import MovieLensWorkload, to_proto
from services.config import Settings

POOL_SIZE = 64  # prebuilt requests per protocol: the client must not eat the cores it measures
REQUEST_KINDS = ("Score", "/v1/score", "/v1/instances")  # first word of each request name
_lock = threading.Lock()
_workload = None


SETTINGS = Settings()  # IAT_* from the environment loadtests.run (or compose) gives Locust


class FallbackWorkload:
    """No dataset at hand: numeric ids, no features (the service encodes missing features as a
    failed side-table join does)."""

    def __init__(self, users: int = 943, items: int = 1682) -> None:
        self.user_ids = [str(u) for u in range(1, users + 1)]
        self.item_ids = [str(i) for i in range(1, items + 1)]
        self.instances: list[dict] = []

    def live_request(self, rng: np.random.Generator, n_candidates: int, request_id: str = "") -> dict:
        user = self.user_ids[int(rng.integers(len(self.user_ids)))]
        items = rng.choice(len(self.item_ids), size=n_candidates, replace=n_candidates > len(self.item_ids))
        return {"request_id": request_id, "user_id": user, "request_time_ms": int(time.time() * 1000),
                "context": {"categorical": {}, "numeric": {}},
                "candidates": [{"item_id": self.item_ids[i], "features": {"categorical": {}, "numeric": {}}} for i in items],
                "model": ""}


def data_dir() -> Path:
    return SETTINGS.movielens_dir


def restrict_users(workload: MovieLensWorkload, max_users: int | None) -> MovieLensWorkload:
    """Keep the first ``max_users`` users by sorted id (the ones ``loadtests.run`` seeded)."""
    if max_users:
        keep = set(workload.user_ids[:max_users])
        workload.user_ids = workload.user_ids[:max_users]
        workload.instances = [i for i in workload.instances if i["user_id"] in keep]
    return workload


def workload():
    """The process-wide request source, loaded once (a few seconds of CSV parsing)."""
    global _workload
    with _lock:
        if _workload is None:
            if (data_dir() / "ml-100k.inter").is_file():
                max_users = SETTINGS.loadtest_max_users or None
                _workload = restrict_users(MovieLensWorkload(data_dir()), max_users)
            else:
                _workload = FallbackWorkload()
        return _workload


def request_pool(seed: int, size: int = POOL_SIZE) -> list[dict]:
    lo, hi = (int(v) for v in SETTINGS.loadtest_candidates.split(","))
    rng = np.random.default_rng(seed)
    w = workload()
    return [w.live_request(rng, int(rng.integers(lo, hi + 1)), request_id=f"lt-{seed}-{k}") for k in range(size)]


def grpc_target(host: str | None) -> str:
    if SETTINGS.grpc_target:
        return SETTINGS.grpc_target
    name = urlparse(host or "http://127.0.0.1:8000").hostname or "127.0.0.1"
    return f"{name}:50051"


def source_url(host: str | None) -> str:
    if SETTINGS.source_url:
        return SETTINGS.source_url.rstrip("/")
    parsed = urlparse(host or "http://127.0.0.1:8000")
    return f"{parsed.scheme or 'http'}://{parsed.hostname or '127.0.0.1'}:8001"


def auth_headers() -> dict[str, str]:
    token = SETTINGS.token
    return {"Authorization": f"Bearer {token}"} if token else {}


def size_bucket(n_candidates: int) -> str:
    return "C<300" if n_candidates < 300 else "C>=300"


def request_kind(name: str) -> str:
    return name.split(" ", 1)[0]


@events.init.add_listener
def quit_once_every_kind_answered(environment, **_kwargs) -> None:
    """IAT_LOADTEST_UNTIL_REQUESTS=N: a run bounded by a count of answers, not by a duration. On
    a loaded machine a fixed-length run can end before the slowest kind has answered at all."""
    wanted = int(os.environ.get("IAT_LOADTEST_UNTIL_REQUESTS", "0"))
    if wanted <= 0:
        return
    answered = dict.fromkeys(REQUEST_KINDS, 0)
    quitting: list = []

    def on_request(name: str, exception=None, **_kw) -> None:
        kind = request_kind(name)
        if exception is None and kind in answered:
            answered[kind] += 1
        if not quitting and min(answered.values()) >= wanted and environment.runner is not None:
            # from its own greenlet, as Locust's --run-time does: this one is a user's
            quitting.append(gevent.spawn(environment.runner.quit))

    def on_quitting(environment, **_kw) -> None:
        if min(answered.values()) < wanted:  # --run-time, the deadline, came first
            logging.getLogger(__name__).error("deadline reached before %d answers of every kind: %s", wanted, answered)
            environment.process_exit_code = 3

    environment.events.request.add_listener(on_request)
    environment.events.quitting.add_listener(on_quitting)


@events.quitting.add_listener
def write_final_stats(environment, **_kwargs) -> None:
    """Locust rewrites ``<--csv>_stats.csv`` once a second, so the last second of a run (all of a
    short one) is missing from it: written once more when the users have stopped."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        with open(f"{prefix}_stats.csv", "w", newline="") as fh:
            StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(fh))


class GrpcScoreUser(User):
    """gRPC Score; every call reported to Locust's statistics through the request event."""

    weight = 3
    wait_time = between(0.0, 0.01)

    def __init__(self, environment):
        super().__init__(environment)
        self.target = grpc_target(self.host or environment.host)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.metadata = [(k.lower(), v) for k, v in auth_headers().items()]
        pool = request_pool(seed=id(self) % 10_000)
        self.requests = [(to_proto(body), len(body["candidates"])) for body in pool]
        self._next = itertools.cycle(self.requests)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def score(self) -> None:
        message, n = next(self._next)
        start = time.perf_counter()
        exception, length = None, 0
        try:
            response = self.stub.Score(message, timeout=30, metadata=self.metadata)
            length = response.ByteSize()
        except grpc.RpcError as err:
            exception = err
        self.environment.events.request.fire(
            request_type="grpc", name=f"Score {size_bucket(n)}", response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exception, context={"candidates": n})


class RestScoreUser(HttpUser):
    """POST /v1/score with the same requests as JSON."""

    weight = 1
    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.headers = auth_headers()
        self._next = itertools.cycle(request_pool(seed=10_000 + id(self) % 10_000))

    @task
    def score(self) -> None:
        body = next(self._next)
        self.client.post("/v1/score", json=body, headers=self.headers,
                         name=f"/v1/score {size_bucket(len(body['candidates']))}")


class IngestUser(User):
    """Posts MovieLens instances to the source service in time order (idempotent re-posts of what
    was seeded, then new ones), while the Score users run."""

    weight = 1
    wait_time = between(0.05, 0.15)

    def __init__(self, environment):
        super().__init__(environment)
        self.batch = SETTINGS.loadtest_ingest_batch
        self.client = HttpSession(base_url=source_url(self.host or environment.host),
                                  request_event=environment.events.request, user=self)
        self.client.trust_env = False
        self.headers = auth_headers()
        instances = workload().instances
        start = (id(self) * 7919) % max(1, len(instances))
        self._instances = itertools.cycle(instances[start:] + instances[:start]) if instances else None

    @task
    def ingest(self) -> None:
        if self._instances is None:  # fallback workload: nothing real to post
            return
        batch = [next(self._instances) for _ in range(self.batch)]
        self.client.post("/v1/instances", json={"instances": batch}, headers=self.headers,
                         name=f"/v1/instances B={self.batch}")
