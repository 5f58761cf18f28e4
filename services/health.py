"""`/healthz`, `/readyz` and `/metrics`, the same on every HTTP port (DESIGN.md section 7)."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import redis.asyncio
import redis.asyncio.cluster
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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


def health_router(checks: dict[str, ReadinessCheck], store: StoreGuard | None = None) -> APIRouter:
    """``store``: adds the "store" readiness check and refreshes the store's memory gauges on
    each scrape of /metrics."""
    router = APIRouter(tags=["health"])
    if store is not None:
        checks = {"store": store.ready, **checks}

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

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
