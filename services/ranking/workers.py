"""The worker model of `iat serve ranking` with IAT_RANKING_WORKERS = N > 1.

One process's Score is capped by its GIL (featurization and the protocol run in Python on the
event loop), whatever the cores. With N > 1 the `iat serve ranking` process becomes a supervisor
that serves nothing itself and starts N worker processes (multiprocessing, spawn: no state
copied from the supervisor), each a complete ranking service (its own models, Redis pool and
event loop) that binds the same gRPC and HTTP ports with SO_REUSEPORT; the kernel spreads new
connections among the listening workers. A gRPC channel is one connection, so a client spreads
its load over the workers with several channels (or a load balancer in front does).

- Threads: torch intra-op threads per worker = CPUs available (affinity, cgroup quota) / N /
  IAT_MODEL_THREADS (services/cpus.py), unless IAT_TORCH_THREADS says otherwise.
- Readiness: a worker binds its ports only after its models are loaded, so a connection never
  reaches a worker that cannot answer; /readyz and gRPC health answer for the worker reached.
- /metrics: prometheus_client multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a fresh temporary
  directory unless set): whichever worker a scrape reaches reports all of them, counters and
  histograms summed, gauges per worker with a ``pid`` label. Score answers name the worker:
  the ``x-iat-worker-pid`` header (REST), the ``iat-worker-pid`` trailing metadata (gRPC).
- SIGTERM / SIGINT to the supervisor: forwarded to every worker, which drains (HTTP requests in
  flight answered, then gRPC with a grace period) and exits; the supervisor exits once all have.
- A worker that exits on its own stops the others and the supervisor exits non-zero: the
  orchestrator restarts the service whole rather than have it run silently at part capacity.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from services.config import Settings

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s"


def _free_port(host: str, port: int) -> int:
    """``port`` (0: a free one) after checking no one holds it: the workers' SO_REUSEPORT would
    otherwise share a port with another process that also set it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.bind(address)
        return probe.getsockname()[1]


def _worker(settings: Settings, host: str, port: int, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    from services.ranking.main import serve_worker

    try:
        raise SystemExit(serve_worker(settings, host, port, reuse_port=True))
    finally:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(settings.prometheus_multiproc_dir))


def _metrics_dir(settings: Settings) -> tuple[Path, bool]:
    """The multiprocess metrics directory, emptied (stale files of an earlier run would be summed
    in), and whether it is ours to remove at exit."""
    if settings.prometheus_multiproc_dir is None:
        return Path(tempfile.mkdtemp(prefix="iat-ranking-metrics-")), True
    path = Path(settings.prometheus_multiproc_dir)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path, False


def serve_workers(settings: Settings, host: str, port: int) -> int:
    n = settings.ranking_workers
    port = _free_port(host, port)
    grpc_port = _free_port(host, settings.ranking_grpc_port)
    metrics_dir, own_dir = _metrics_dir(settings)
    # prometheus_client picks its multiprocess mode from this variable when a worker imports it
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    worker_settings = settings.model_copy(update={"ranking_grpc_port": grpc_port, "prometheus_multiproc_dir": metrics_dir})
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(worker_settings, host, port, logging.getLogger().level),
                               name=f"ranking-worker-{k}") for k in range(n)]
    stopping = failed = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.pid is not None and w.exitcode is None:
                os.kill(w.pid, signal.SIGTERM)  # SIGTERM even for SIGINT: a second SIGINT forces uvicorn out

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for w in workers:
            w.start()
        log.info("ranking: %d workers (pids %s) on gRPC %s:%d and HTTP %s:%d, metrics in %s", n,
                 [w.pid for w in workers], host, grpc_port, host, port, metrics_dir)
        alive = list(workers)
        while alive:
            multiprocessing.connection.wait([w.sentinel for w in alive])
            ended = [w for w in alive if w.exitcode is not None]
            alive = [w for w in alive if w.exitcode is None]
            if ended and not stopping:
                log.error("ranking worker(s) %s exited (codes %s): stopping the others",
                          [w.pid for w in ended], [w.exitcode for w in ended])
                failed = True
                forward(signal.SIGTERM, None)
        codes = [w.exitcode for w in workers]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for w in workers:
            if w.exitcode is None and w.pid is not None:
                w.kill()
                w.join(10)
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("ranking workers exited with %s", codes)
    return 1 if failed or any(c != 0 for c in codes) else 0
