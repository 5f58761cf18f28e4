"""`iat serve trainer`: the online learning loop (services/trainer/trainer.py) in a supervised
thread, FastAPI for health, `/v1/stats` (progressive metrics, published versions) and metrics.

A process trains on the stream partitions it owns (``IAT_TRAINER_PARTITIONS`` of the
``IAT_STREAM_PARTITIONS``) through the consumer group ``trainer`` and publishes into
``IAT_MODEL_DIR``, where the ranking and source services pick the versions up (hot reload).
"""
from __future__ import annotations

import logging
import threading

import uvicorn
from fastapi import FastAPI

from services.allocator import keep_freed_memory
from services.config import Settings
from services.cpus import configure_torch_threads
from services.health import StoreGuard, WorkerLiveness, health_router, run_supervised, worker_backoff
from services.http_errors import install_error_handlers, install_store_error_handler
from services.security import RequestGuard
from services.stores import redis_client
from services.trainer.trainer import Trainer

log = logging.getLogger(__name__)
ROLE = "trainer"


class TrainerService:
    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self.client = client if client is not None else redis_client(settings)
        self.store_guard = StoreGuard(self.client, settings.allow_evicting_redis)
        self.store_guard.check_startup()
        self.trainer = Trainer(settings, self.client)
        self.liveness = WorkerLiveness(ROLE, settings.worker_stall_s)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        backoff = worker_backoff(self.settings.worker_backoff_base_s, self.settings.worker_backoff_cap_s)
        self.thread = threading.Thread(
            target=run_supervised, args=(self.trainer.run_once, self.stop, self.liveness, ROLE, backoff),
            kwargs={"on_error": self.trainer.after_error}, name=ROLE, daemon=True)
        self.liveness.is_alive = self.thread.is_alive
        self.thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def app(self) -> FastAPI:
        app = FastAPI(title="iat trainer", version="1")
        install_error_handlers(app)
        install_store_error_handler(app, retry_after_s=self.settings.retry_after_s)
        app.include_router(health_router({}, [self.liveness], store=self.store_guard))
        app.add_middleware(RequestGuard, token=self.settings.token, max_body_bytes=self.settings.max_body_bytes)

        @app.get("/v1/stats")
        def stats() -> dict:  # sync: run in a thread, the event loop stays free
            return self.trainer.stats()

        return app


def serve(settings: Settings, host: str, port: int) -> int:
    keep_freed_memory(settings.malloc_keep_mb)
    configure_torch_threads(settings.torch_threads, workers=1)
    service = TrainerService(settings)
    service.start()
    log.info("trainer: partitions %s of %d, HTTP on %s:%d", settings.trainer_owned_partitions,
             settings.stream_partitions, host, port)
    try:
        uvicorn.run(service.app(), host=host, port=port, log_level="warning")
    finally:
        service.shutdown()
    return 0
