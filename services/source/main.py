"""`iat serve source`: POST /v1/instances on the HTTP port (DESIGN.md section 7)."""
from __future__ import annotations

import asyncio
import gc
import os
import socket
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
import redis.exceptions
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from models.serving import latest_version, load_source_model
from services import metrics
from services.config import Settings
from services.cpus import configure_torch_threads, report_worker_threads
from services.health import health_router
from services.http_errors import error_body, install_error_handlers
from services.security import RequestGuard
from services.source.batcher import MicroBatcher
from services.source.raw_stream import RawInstanceConsumer
from services.source.ingest import Ingestor
from services.source.protocol import IngestRejected, IngestRequest, IngestResponse, validate_against_model
from storage.connection import connect
from storage.instance_store import InstanceStore
from storage.stream import InstanceStream

log = logging.getLogger(__name__)
SOURCE_MODEL_NAME = "source"
# The store is down or too slow (IAT_REDIS_TIMEOUT_S): 503, the client retries; ingest is idempotent.
STORE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, OSError)
# One executor thread runs the model: micro-batches are coalesced, never run side by side.
MODEL_WORKERS = 1


class SourceService:
    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self.client = client if client is not None else connect(
            settings.redis_url, socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s)
        path = latest_version(settings.model_dir, SOURCE_MODEL_NAME)
        if path is None:
            raise FileNotFoundError(f"no source model under {settings.model_dir}/{SOURCE_MODEL_NAME}: run `iat export`")
        self.model = load_source_model(path, runtime=settings.runtime, device=settings.device)
        code_dtype = self.model.code_dtype if self.model.code_length else np.uint8
        self.store = InstanceStore(
            self.client, prefix=settings.key_prefix, dim=self.model.embedding_dim,
            codec=self.model.manifest.get("codec", "fp32"), tasks=self.model.tasks,
            retention_days=settings.retention_days, max_sequence_length=settings.max_sequence_length,
            code_length=self.model.code_length, code_dtype=code_dtype,
        )
        self.stream = InstanceStream(self.client, prefix=settings.key_prefix, maxlen=settings.stream_maxlen)
        self.ingestor = Ingestor(self.model, self.store, self.stream)
        self.executor = ThreadPoolExecutor(max_workers=MODEL_WORKERS, thread_name_prefix="ingest")
        self.batcher = MicroBatcher(
            self.ingestor.ingest, self.executor, max_batch=settings.ingest_max_batch,
            max_wait_s=settings.ingest_max_wait_ms / 1000.0, on_batch=metrics.INGEST_BATCH_SIZE.observe,
        )

    async def ingest(self, request: IngestRequest) -> IngestResponse:
        validate_against_model(request.instances, self.model.featurizer, self.model.tasks,
                               self.settings.ingest_max_request)
        ids = await self.batcher.submit(request.instances)
        return IngestResponse(accepted=len(ids), ins_ids=[str(i) for i in ids])

    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI):
            self.batcher.start()
            await report_worker_threads(self.executor)
            consumer = None
            if self.settings.raw_stream:
                name = self.settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
                self.raw_consumer = RawInstanceConsumer(self, self.settings.raw_stream, "source", name)
                consumer = asyncio.create_task(self.raw_consumer.run())
            gc.collect()
            gc.freeze()  # the loaded model and start-up objects stay out of GC passes
            yield
            if consumer:
                consumer.cancel()
            await self.batcher.stop()
            self.executor.shutdown(wait=False)

        async def store_ok() -> tuple[bool, str]:
            self.client.ping()
            return True, "ping ok"

        async def model_ok() -> tuple[bool, str]:
            return True, f"{self.model.name} {self.model.version} ({self.model.runtime} on {self.model.device})"

        app = FastAPI(title="iat source", version="1", lifespan=lifespan,
                      description="Turns instances into InsEmbs and SIF codes, stores them, streams them.")
        install_error_handlers(app)
        app.include_router(health_router({"store": store_ok, "model": model_ok}))
        app.add_middleware(RequestGuard, token=self.settings.token, max_body_bytes=self.settings.max_body_bytes)

        @app.post("/v1/instances", response_model=IngestResponse)
        async def post_instances(body: IngestRequest):
            start = time.perf_counter()
            try:
                response = await self.ingest(body)
            except IngestRejected as err:
                metrics.INSTANCES.labels("rejected").inc(len(body.instances))
                return JSONResponse(error_body("INVALID_ARGUMENT", err.field, err.message), status_code=422)
            except STORE_ERRORS as exc:
                metrics.INSTANCES.labels("unavailable").inc(len(body.instances))
                log.warning("ingest: store unavailable: %s: %s", type(exc).__name__, exc)
                return JSONResponse(error_body("UNAVAILABLE", None, f"the store cannot be reached: {type(exc).__name__}"),
                                    status_code=503, headers={"Retry-After": "1"})
            metrics.INSTANCES.labels("accepted").inc(response.accepted)
            metrics.INGEST_LATENCY.observe(time.perf_counter() - start)
            return response

        return app


def serve(settings: Settings, host: str, port: int) -> int:
    configure_torch_threads(settings.torch_threads, workers=MODEL_WORKERS)
    service = SourceService(settings)
    log.info("source: model %s %s, HTTP on %s:%d", service.model.name, service.model.version, host, port)
    uvicorn.run(service.app(), host=host, port=port, log_level="warning", access_log=False)
    return 0
