"""`/healthz`, `/readyz` and `/metrics`, the same on every HTTP port (DESIGN.md section 7), and the
supervision of background workers that `/healthz` reports on.

Liveness (`/healthz`) is about this process: it fails (503) when a background worker (a sequencer
consumer, the source's raw-stream consumer, ...) is dead, hung, or stalled, so that an
orchestrator restarts the process. Readiness (`/readyz`) is about dependencies (the store, a
model): a store outage makes a service unready, never "not live" -- restarting cannot bring the
store back.

A worker runs its passes through :func:`run_supervised` (threads) or
:func:`run_supervised_async` (asyncio tasks): any exception a pass raises (a store error such as
ConnectionError, TimeoutError, OOM, READONLY or NOGROUP, or a bug) is logged, counted in
``iat_worker_errors_total{worker, error}``, and the pass is retried after a bounded exponential
backoff (redis-py's ``ExponentialBackoff``), so that the worker carries on once the store is back.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio
import redis.asyncio.cluster
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.backoff import AbstractBackoff, ExponentialBackoff

from services import metrics as service_metrics
from storage.errors import UNREACHABLE, is_transient
from storage.stream import StreamBacklogFull

log = logging.getLogger(__name__)

from services import metrics
from storage.connection import (
    EvictingStoreError,
    StoreMemory,
    check_no_eviction,
    check_no_eviction_async,
    eviction_refusal,
    store_memory,
    store_memory_async,
)

log = logging.getLogger(__name__)

# A readiness check returns (ok, detail); the service is ready when every check is ok.
ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]
# Errors that mean waiting on something outside this process -- the store cannot be reached, or
# the instance stream is full until the sequencer catches up: a restart cannot help, so a worker
# failing with these stays live (readiness and the backlog metrics tell the rest).
WAITING = (*UNREACHABLE, StreamBacklogFull)


class WorkerLiveness:
    """What `/healthz` knows of one background worker.

    - dead: its thread or task has ended (``is_alive`` is set by whoever starts it);
    - hung: no pass has ended, with or without an error, for ``stall_s`` (blocked in a call);
    - stalled: its passes keep failing with an error other than waiting (store unreachable,
      stream backlog full) -- OOM, READONLY after a failover, a bug -- and none has succeeded
      for ``stall_s``. A failing pass had work waiting (an idle worker's pass is a read that
      succeeds), so this is "no progress while there is a backlog". READONLY is cured by a
      restart (it reconnects to the new primary); the others at least become loud.
    ``stall_s=None``: only the dead check (a worker that has no passes while idle).
    """

    def __init__(self, name: str, stall_s: float | None, is_alive: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.stall_s = stall_s
        self.is_alive: Callable[[], bool] | None = is_alive  # None: not started yet
        now = time.monotonic()
        self.last_turn = now
        self.last_success = now
        self.last_error: str | None = None
        self.waiting = False

    def succeeded(self) -> None:
        now = time.monotonic()
        self.last_turn = self.last_success = now
        self.last_error = None
        self.waiting = False

    def failed(self, exc: BaseException) -> None:
        self.last_turn = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.waiting = isinstance(exc, WAITING)

    def verdict(self) -> tuple[bool, str]:
        if self.is_alive is None:
            return False, "not started"
        if not self.is_alive():
            return False, "dead" + (f" (last error {self.last_error})" if self.last_error else "")
        if self.stall_s is None:
            return True, "running"
        now = time.monotonic()
        if now - self.last_turn > self.stall_s:
            return False, f"hung: no pass has ended for {now - self.last_turn:.0f}s (limit {self.stall_s:g}s)"
        if self.last_error is None:
            return True, "running"
        if self.waiting:
            return True, f"waiting ({self.last_error}); see /readyz and the stream metrics"
        since = now - self.last_success
        if since > self.stall_s:
            return False, (f"stalled: no pass has succeeded for {since:.0f}s (limit {self.stall_s:g}s), "
                           f"last error {self.last_error}")
        return True, f"retrying after {self.last_error}"


def worker_backoff(base_s: float, cap_s: float) -> AbstractBackoff:
    return ExponentialBackoff(cap=cap_s, base=base_s)


def _failed(liveness: WorkerLiveness, role: str, exc: Exception, failures: int, delay: float) -> None:
    liveness.failed(exc)
    service_metrics.WORKER_ERRORS.labels(role, type(exc).__name__).inc()
    if isinstance(exc, WAITING) or is_transient(exc):
        log.warning("%s: %s: %s (failure %d in a row); retrying in %.2fs",
                    liveness.name, type(exc).__name__, exc, failures, delay)
    else:  # not a passing store condition: a bug or bad data; the traceback is what a developer needs
        log.error("%s: %s (failure %d in a row); retrying in %.2fs", liveness.name, type(exc).__name__,
                  failures, delay, exc_info=exc)


def run_supervised(step: Callable[[], object], stop: threading.Event, liveness: WorkerLiveness, role: str,
                   backoff: AbstractBackoff, on_error: Callable[[Exception], None] | None = None) -> None:
    """Call ``step`` until ``stop`` is set; an exception is reported and retried after a backoff.

    ``role`` labels the metric (e.g. "sequencer"; the consumer name would be unbounded).
    ``on_error(exc)`` lets the worker prepare the next pass (re-read its own pending entries,
    recreate a missing consumer group).
    """
    failures = 0
    while not stop.is_set():
        try:
            step()
        except Exception as exc:  # noqa: BLE001 -- any failure of a pass is retried; the thread must not end
            failures += 1
            delay = backoff.compute(failures)
            _failed(liveness, role, exc, failures, delay)
            if on_error is not None:
                on_error(exc)
            stop.wait(delay)
            continue
        failures = 0
        liveness.succeeded()


async def run_supervised_async(step: Callable[[], Awaitable[object]], liveness: WorkerLiveness, role: str,
                               backoff: AbstractBackoff,
                               on_error: Callable[[Exception], None] | None = None) -> None:
    """:func:`run_supervised` for an asyncio task (runs until cancelled)."""
    failures = 0
    while True:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 -- CancelledError is a BaseException: cancelling still ends it
            failures += 1
            delay = backoff.compute(failures)
            _failed(liveness, role, exc, failures, delay)
            if on_error is not None:
                on_error(exc)
            await asyncio.sleep(delay)
            continue
        failures = 0
        liveness.succeeded()


class StoreGuard:
    """What every service checks of its store: reachable, and not evicting (refused at start-up
    and in readiness unless ``allow_evicting``: storage/connection.py says why); its memory use
    is exported as gauges at each /metrics scrape. Works with sync and asyncio clients."""

    def __init__(self, client, allow_evicting: bool = False) -> None:
        self.client = client
        self.allow_evicting = allow_evicting
        self._async = isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster))

    def check_startup(self) -> None:
        """Sync clients: raise EvictingStoreError (logged) when the store evicts."""
        try:
            self._export(check_no_eviction(self.client, self.allow_evicting))
        except EvictingStoreError as exc:
            log.error("refusing to start: %s", exc)
            raise

    async def acheck_startup(self) -> None:
        """Asyncio clients: the same as ``check_startup``."""
        try:
            self._export(await check_no_eviction_async(self.client, self.allow_evicting))
        except EvictingStoreError as exc:
            log.error("refusing to start: %s", exc)
            raise

    async def _memory(self) -> list[StoreMemory]:
        return await store_memory_async(self.client) if self._async else store_memory(self.client)

    async def ready(self) -> tuple[bool, str]:
        """Readiness: the store answers and does not evict (someone may CONFIG SET it later)."""
        try:
            memories = await self._memory()
        except EvictingStoreError as exc:  # INFO refused: cannot tell
            return self.allow_evicting, str(exc)
        self._export(memories)
        refusal = eviction_refusal(memories)
        if refusal is None:
            return True, "ok, maxmemory-policy noeviction"
        if self.allow_evicting:
            return True, f"ok, evicting policy allowed by IAT_ALLOW_EVICTING_REDIS: {refusal}"
        return False, refusal

    async def refresh_gauges(self) -> None:
        try:
            self._export(await self._memory())
        except Exception as exc:  # a scrape must answer even while the store is down
            log.debug("store memory gauges not refreshed: %s", exc)

    @staticmethod
    def _export(memories: list[StoreMemory]) -> None:
        for m in memories:
            metrics.STORE_USED_MEMORY.labels(m.node).set(m.used_memory)
            metrics.STORE_MAXMEMORY.labels(m.node).set(m.maxmemory)


def health_router(checks: dict[str, ReadinessCheck], workers: Sequence[WorkerLiveness] = (),
                  store: StoreGuard | None = None) -> APIRouter:
    """``workers`` (liveness) is read at each request, so a list filled later (at start-up) is
    seen; ``store`` adds the "store" readiness check and refreshes the store's memory gauges on
    each scrape of /metrics."""
    router = APIRouter(tags=["health"])
    if store is not None:
        checks = {"store": store.ready, **checks}

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: the process answers and every background worker is alive and advancing."""
        results = {}
        for worker in list(workers):
            ok, detail = worker.verdict()
            results[worker.name] = {"ok": ok, "detail": detail}
        failing = sorted(name for name, r in results.items() if not r["ok"])
        body = {"status": "failing" if failing else "ok", "workers": results}
        if failing:
            body["message"] = "; ".join(f"{name}: {results[name]['detail']}" for name in failing)
        return JSONResponse(body, status_code=503 if failing else 200)

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: every dependency (store, model) answers; 503 with the failing ones."""
        results = {}
        for name, check in checks.items():
            try:
                ok, detail = await check()
            except Exception as exc:  # a failing check means not ready, never a 500
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            results[name] = {"ok": ok, "detail": detail}
        ready = all(r["ok"] for r in results.values())
        return JSONResponse({"ready": ready, "checks": results}, status_code=200 if ready else 503)

    @router.get("/metrics")
    async def metrics_endpoint() -> Response:
        if store is not None:
            await store.refresh_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
