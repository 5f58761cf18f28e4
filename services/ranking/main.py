"""`iat serve ranking`: gRPC Score on IAT_RANKING_GRPC_PORT and REST on the HTTP port, one loop
per process; with IAT_RANKING_WORKERS > 1, several such processes on the same two ports
(services/ranking/workers.py)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket

import uvicorn

from services.allocator import keep_freed_memory
from services.config import Settings
from services.cpus import configure_torch_threads, report_worker_threads
from services.health import StoreGuard
from services.ranking.grpc_server import start_grpc_server
from services.ranking.http_app import create_app
from services.ranking.registry import ModelRegistry
from services.ranking.serving import RankingServing
from services.stores import async_redis_client

log = logging.getLogger(__name__)


async def build_serving(settings: Settings) -> RankingServing:
    client = await async_redis_client(settings)
    await StoreGuard(client, settings.allow_evicting_redis).acheck_startup()  # before minutes of model loading
    registry = ModelRegistry(settings.model_dir, runtime=settings.runtime, device=settings.device,
                             default=settings.default_model)
    outcomes = await asyncio.to_thread(registry.refresh)
    for name, outcome in outcomes.items():
        log.info("model %s: %s", name, outcome)
    if not registry.models:
        log.warning("no ranking model loaded from %s: Score answers NOT_FOUND until one appears",
                    settings.model_dir)
    return RankingServing(settings, registry, client)


async def watch_models(serving: RankingServing, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(serving.registry.refresh)
        except Exception:  # a reload must never take the service down
            log.exception("model refresh failed")


class _HttpServer(uvicorn.Server):
    """uvicorn re-raises the SIGTERM/SIGINT it caught once HTTP has drained, which would kill
    the process there, before gRPC drains its calls in flight; here the signal only ends
    ``serve()`` and the process exits once both have drained."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT: every worker binds its own on the same port and
    the kernel spreads new connections among them. Bound only once the worker's models are
    loaded, so no connection waits on a worker that cannot answer yet."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve_async(settings: Settings, host: str, port: int, reuse_port: bool = False) -> int:
    serving = await build_serving(settings)
    await report_worker_threads(serving.executor)
    grpc_server, grpc_port = await start_grpc_server(serving, host, settings.ranking_grpc_port, reuse_port)
    http = _HttpServer(uvicorn.Config(create_app(serving), host=host, port=port, log_level="warning",
                                         access_log=False))
    sockets = [reuse_port_socket(host, port)] if reuse_port else None
    watcher = asyncio.create_task(watch_models(serving, settings.reload_interval_s)) if settings.reload_interval_s else None
    # Warm-up objects are long-lived: keep them out of every future GC pass (DESIGN.md section 6).
    gc.collect()
    gc.freeze()
    log.info("ranking: gRPC on %s:%d, HTTP on %s:%d, models %s", host, grpc_port, host, port,
             sorted(serving.registry.models))
    try:
        await http.serve(sockets=sockets)  # returns on SIGINT/SIGTERM, in-flight requests answered
    finally:
        if watcher:
            watcher.cancel()
        await grpc_server.health_servicer.enter_graceful_shutdown()  # NOT_SERVING to balancers first
        await grpc_server.stop(grace=5)
        serving.executor.shutdown(wait=False)
    return 0


def serve_worker(settings: Settings, host: str, port: int, reuse_port: bool = False) -> int:
    # IAT_MODEL_THREADS executor threads per process run forwards concurrently, in each of
    # IAT_RANKING_WORKERS processes: they all share the CPUs
    keep_freed_memory(settings.malloc_keep_mb)
    configure_torch_threads(settings.torch_threads, workers=settings.model_threads,
                            processes=settings.ranking_workers)
    return asyncio.run(serve_async(settings, host, port, reuse_port))


def serve(settings: Settings, host: str, port: int) -> int:
    if settings.ranking_workers > 1:
        from services.ranking.workers import serve_workers

        return serve_workers(settings, host, port)
    return serve_worker(settings, host, port)
