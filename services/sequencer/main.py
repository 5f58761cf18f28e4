"""`iat serve sequencer`: consumer-group workers in threads, FastAPI for health and metrics."""
from __future__ import annotations

import logging
import os
import socket
import threading

import uvicorn
from fastapi import FastAPI

from services import metrics
from services.config import Settings
from services.health import StoreGuard, health_router
from services.security import RequestGuard
from services.sequencer.worker import SequencerWorker
from storage.connection import connect
from storage.instance_store import InstanceStore
from storage.stream import InstanceStream

log = logging.getLogger(__name__)


class Sequencer:
    """The workers of one process and what its HTTP port reports about them."""

    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self.client = client if client is not None else connect(settings.redis_url)
        self.store_guard = StoreGuard(self.client, settings.allow_evicting_redis)
        self.store_guard.check_startup()
        self.store = InstanceStore(
            self.client, prefix=settings.key_prefix, retention_days=settings.retention_days,
            max_sequence_length=settings.max_sequence_length,
        )
        self.stream = InstanceStream(self.client, prefix=settings.key_prefix, maxlen=settings.stream_maxlen)
        base = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.workers = [
            SequencerWorker(
                self.stream, self.store, f"{base}-{i}",
                batch_size=settings.sequencer_batch_size, claim_idle_ms=settings.claim_idle_ms,
            )
            for i in range(settings.sequencer_workers)
        ]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.stream.ensure_group()
        for worker in self.workers:
            t = threading.Thread(target=worker.run, args=(self.stop,), name=worker.consumer, daemon=True)
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._report_lag, name="stream-lag", daemon=True)
        t.start()

    def _report_lag(self) -> None:
        while not self.stop.wait(2.0):
            try:
                metrics.STREAM_LAG.set(self.stream.lag())
            except Exception as exc:  # the gauge is best effort; workers log outages
                log.debug("stream lag: %s", exc)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)

    def app(self) -> FastAPI:
        async def workers_ok() -> tuple[bool, str]:
            alive = sum(t.is_alive() for t in self.threads)
            return alive == len(self.workers), f"{alive}/{len(self.workers)} workers alive"

        app = FastAPI(title="iat sequencer", version="1")
        app.include_router(health_router({"workers": workers_ok}, store=self.store_guard))
        app.add_middleware(RequestGuard, token=self.settings.token, max_body_bytes=self.settings.max_body_bytes)

        @app.get("/v1/stats")
        async def stats() -> dict:
            return {
                "workers": {w.consumer: vars(w.stats) for w in self.workers},
                "stream_length": self.stream.length(),
                "pending": self.stream.pending_count(),
            }

        return app


def serve(settings: Settings, host: str, port: int) -> int:
    sequencer = Sequencer(settings)
    sequencer.start()
    log.info("sequencer: %d workers, HTTP on %s:%d", len(sequencer.workers), host, port)
    try:
        uvicorn.run(sequencer.app(), host=host, port=port, log_level="warning")
    finally:
        sequencer.shutdown()
    return 0
