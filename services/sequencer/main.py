"""`iat serve sequencer`: consumer-group workers in threads, FastAPI for health and metrics.

Besides the consumers, one maintenance thread trims the stream behind the consumer groups
(``XTRIM MINID``, every ``IAT_STREAM_TRIM_INTERVAL_S``) and updates the stream gauges. Every
thread runs supervised (services/health.py): a store error is retried with backoff, and
`/healthz` fails when a thread is dead, hung or stalled. `/readyz` is about the store only.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

import uvicorn
from fastapi import FastAPI

from services import metrics
from services.config import Settings
from services.health import (
    StoreGuard,
    WorkerLiveness,
    health_router,
    run_supervised,
    worker_backoff,
)
from services.http_errors import install_error_handlers, install_store_error_handler
from services.security import RequestGuard
from services.sequencer.worker import SequencerWorker
from services.stores import instance_store, instance_stream, redis_client

log = logging.getLogger(__name__)
MAINTENANCE = "stream-maintenance"


class Sequencer:
    """The workers of one process and what its HTTP port reports about them."""

    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self.client = client if client is not None else redis_client(settings)
        self.store_guard = StoreGuard(self.client, settings.allow_evicting_redis)
        self.store_guard.check_startup()
        self.store = instance_store(self.client, settings)
        self.stream = instance_stream(self.client, settings)
        base = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.workers = [
            SequencerWorker(
                self.stream, self.store, f"{base}-{i}",
                batch_size=settings.sequencer_batch_size, claim_idle_ms=settings.claim_idle_ms,
                backoff=worker_backoff(settings.worker_backoff_base_s, settings.worker_backoff_cap_s),
                stall_s=settings.worker_stall_s,
            )
            for i in range(settings.sequencer_workers)
        ]
        # Its passes end every trim interval, so the hang check applies to it too.
        self.maintenance = WorkerLiveness(MAINTENANCE, max(settings.worker_stall_s, 3 * settings.stream_trim_interval_s))
        self.liveness = [w.liveness for w in self.workers] + [self.maintenance]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads; none needs the store to be up (each creates the group when it can)."""
        for worker in self.workers:
            self._start(worker.consumer, worker.run, worker.liveness)
        self._start(MAINTENANCE, self._maintain, self.maintenance)

    def _start(self, name: str, target, liveness: WorkerLiveness) -> None:
        t = threading.Thread(target=target, args=(self.stop,), name=name, daemon=True)
        liveness.is_alive = t.is_alive
        t.start()
        self.threads.append(t)

    def _maintain(self, stop: threading.Event) -> None:
        backoff = worker_backoff(self.settings.worker_backoff_base_s, self.settings.worker_backoff_cap_s)

        def step() -> None:
            if stop.wait(self.settings.stream_trim_interval_s):
                return
            trimmed = self.stream.trim_acknowledged().trimmed
            metrics.STREAM_TRIMMED.inc(trimmed)
            metrics.STREAM_LENGTH.set(self.stream.length())
            metrics.STREAM_PENDING.set(self.stream.pending_count())
            metrics.STREAM_LAG.set(self.stream.lag())

        run_supervised(step, stop, self.maintenance, "stream-maintenance", backoff)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)

    def stats(self) -> dict:
        """What ``/v1/stats`` answers: the workers' counters and the stream's backlog as it is."""
        lag_cap = 100_000  # counted by the server (Redis 6.2): tens of ms at the cap
        length = self.stream.length()
        pending = self.stream.pending_count()
        undelivered = self.stream.lag(cap=lag_cap)
        return {
            "workers": {w.consumer: vars(w.stats) for w in self.workers},
            "stream_length": length,
            "pending": pending,
            "undelivered": undelivered,
            "undelivered_at_least": undelivered >= lag_cap,  # counted up to lag_cap on Redis 6.2
            "backlog": pending + undelivered,  # entries not yet in their sequences
            "max_backlog": self.stream.max_backlog,
            "trimmed": self.stream.trimmed,
            "dropped": {"malformed": self.stream.malformed, "deleted_while_pending": self.stream.deleted_pending},
        }

    def app(self) -> FastAPI:
        app = FastAPI(title="iat sequencer", version="1")
        install_error_handlers(app)
        install_store_error_handler(app, retry_after_s=self.settings.retry_after_s)
        app.include_router(health_router({}, self.liveness, store=self.store_guard))
        app.add_middleware(RequestGuard, token=self.settings.token, max_body_bytes=self.settings.max_body_bytes)

        @app.get("/v1/stats")
        def stats() -> dict:  # sync: FastAPI runs it in a thread, the event loop stays free
            return self.stats()

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
