"""`iat serve sequencer`: consumer-group workers in threads, FastAPI for health and metrics.

A process reads the stream partitions it owns (``IAT_SEQUENCER_PARTITIONS`` of the
``IAT_STREAM_PARTITIONS``; storage/stream.py), with ``IAT_SEQUENCER_WORKERS`` consumer threads
per owned partition. Ownership is configuration, not a lock: several processes scale out by
owning disjoint sets (e.g. "0/2" and "1/2"). Two processes that own the same partition are two
consumers of its group: each entry is still delivered to one of them only, and the sequence
writes are idempotent, so overlap costs nothing but the per-partition order of appends (which
the sequences, sorted by timestamp, do not depend on). A partition no process owns is not read:
its backlog grows until ingest answers 503 for its users.

Besides the consumers, one maintenance thread trims the owned partitions behind their consumer
groups (``XTRIM MINID``, every ``IAT_STREAM_TRIM_INTERVAL_S``) and updates the per-partition
stream gauges. Every thread runs supervised (services/health.py): a store error is retried with
backoff, and `/healthz` fails when a thread is dead, hung or stalled. `/readyz` is about the
store only.
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


def consumer_name(base: str, partition: int, worker: int) -> str:
    """Partition 0 keeps the consumer names of the unpartitioned stream (same key, same group),
    so a sequencer restarted after an upgrade resumes its own pending entries."""
    return f"{base}-{worker}" if partition == 0 else f"{base}-p{partition}-{worker}"


class Sequencer:
    """The workers of one process and what its HTTP port reports about them."""

    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self.client = client if client is not None else redis_client(settings)
        self.store_guard = StoreGuard(self.client, settings.allow_evicting_redis)
        self.store_guard.check_startup()
        self.store = instance_store(self.client, settings)
        self.stream = instance_stream(self.client, settings)
        self.owned = [self.stream.partitions[p] for p in settings.owned_partitions]
        base = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.workers = [
            SequencerWorker(
                partition, self.store, consumer_name(base, partition.partition, i),
                batch_size=settings.sequencer_batch_size, claim_idle_ms=settings.claim_idle_ms,
                backoff=worker_backoff(settings.worker_backoff_base_s, settings.worker_backoff_cap_s),
                stall_s=settings.worker_stall_s,
            )
            for partition in self.owned
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
            for partition in self.owned:
                label = str(partition.partition)
                metrics.STREAM_TRIMMED.inc(partition.trim_acknowledged().trimmed)
                metrics.STREAM_LENGTH.labels(label).set(partition.length())
                metrics.STREAM_PENDING.labels(label).set(partition.pending_count())
                metrics.STREAM_LAG.labels(label).set(partition.lag())

        run_supervised(step, stop, self.maintenance, "stream-maintenance", backoff)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)

    def stats(self) -> dict:
        """What ``/v1/stats`` answers: the workers' counters and the backlog of the owned
        partitions as it is, summed (the top-level keys) and per partition."""
        lag_cap = 100_000  # counted by the server (Redis 6.2): tens of ms at the cap
        partitions = {}
        for partition in self.owned:
            length, pending = partition.length(), partition.pending_count()
            undelivered = partition.lag(cap=lag_cap)
            partitions[str(partition.partition)] = {
                "stream_length": length, "pending": pending, "undelivered": undelivered,
                "undelivered_at_least": undelivered >= lag_cap,  # counted up to lag_cap on Redis 6.2
            }
        total = {k: sum(p[k] for p in partitions.values()) for k in ("stream_length", "pending", "undelivered")}
        return {
            "workers": {w.consumer: vars(w.stats) for w in self.workers},
            **total,
            "undelivered_at_least": any(p["undelivered_at_least"] for p in partitions.values()),
            "backlog": total["pending"] + total["undelivered"],  # entries not yet in their sequences
            "max_backlog": self.stream.max_backlog,  # per partition
            "trimmed": sum(p.trimmed for p in self.owned),
            "dropped": {"malformed": sum(p.malformed for p in self.owned),
                        "deleted_while_pending": sum(p.deleted_pending for p in self.owned)},
            "stream_partitions": self.stream.count,
            "partitions": partitions,
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
    log.info("sequencer: partitions %s of %d, %d workers, HTTP on %s:%d",
             settings.owned_partitions, settings.stream_partitions, len(sequencer.workers), host, port)
    try:
        uvicorn.run(sequencer.app(), host=host, port=port, log_level="warning")
    finally:
        sequencer.shutdown()
    return 0
