"""`iat serve source`: POST /v1/instances (DESIGN.md section 7) and POST /v1/labels (labels that
arrive late, storage/late_labels.py) on the HTTP port."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from contract.layout import RecordLayout
from models.runtime.loader import latest_version, load_source_model
from services import metrics
from services.allocator import keep_freed_memory
from services.config import Settings
from services.cpus import configure_torch_threads, report_worker_threads
from services.health import StoreGuard, WorkerLiveness, health_router
from services.http_errors import (
    error_body,
    install_error_handlers,
    install_store_error_handler,
    unavailable,
)
from services.security import RequestGuard
from services.source.batcher import MicroBatcher
from services.source.ingest import Ingestor
from services.source.protocol import (
    IngestRejected,
    IngestRequest,
    IngestResponse,
    LabelItemResult,
    LabelsRequest,
    LabelsResponse,
    ModelInfo,
    distinct_instances,
    validate_against_model,
    validate_label_updates,
)
from services.source.raw_stream import RawInstanceConsumer
from services.source.reload import SOURCE_MODEL_NAME, SourceReloader, publish_info
from services.stores import instance_store, instance_stream, redis_client
from storage.errors import STORE_ERRORS
from storage.late_labels import (
    DUPLICATE,
    LABELS_GROUP,
    LABELS_STREAM,
    STORED,
    UNKNOWN,
    LabelUpdate,
    LateLabels,
)
from storage.records import InvalidRecord
from storage.stream import InstanceStream, StreamBacklogFull

log = logging.getLogger(__name__)
# One executor thread runs the model: micro-batches are coalesced, never run side by side.
MODEL_WORKERS = 1


class SourceService:
    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self.client = client if client is not None else redis_client(settings)
        self.store_guard = StoreGuard(self.client, settings.allow_evicting_redis)
        self.store_guard.check_startup()
        path = latest_version(settings.model_dir, SOURCE_MODEL_NAME)
        if path is None:
            raise FileNotFoundError(f"no source model under {settings.model_dir}/{SOURCE_MODEL_NAME}: run `iat export`")
        self.model = load_source_model(path, runtime=settings.runtime, device=settings.device)
        metrics.MODEL_RELOADS.labels(SOURCE_MODEL_NAME, "loaded").inc()
        publish_info(self.model)
        self.reloader = SourceReloader(settings.model_dir, self.model, self.use_model, runtime=settings.runtime,
                                       device=settings.device)
        self.store = instance_store(self.client, settings, RecordLayout.from_manifest(self.model.manifest))
        self.stream = instance_stream(self.client, settings)
        self.ingestor = Ingestor(self.model, self.store, self.stream)
        labels_stream = InstanceStream(self.client, prefix=settings.key_prefix, name=LABELS_STREAM, group=LABELS_GROUP)
        self.late_labels = LateLabels(self.store, round(settings.label_window_s * 1000), labels_stream)
        self.executor = ThreadPoolExecutor(max_workers=MODEL_WORKERS, thread_name_prefix="ingest")
        self.batcher = MicroBatcher(
            self.ingestor.ingest, self.executor, max_batch=settings.ingest_max_batch,
            max_wait_s=settings.ingest_max_wait_ms / 1000.0, on_batch=metrics.INGEST_BATCH_SIZE.observe,
        )
        # What /healthz watches: the batcher's task (it has no passes while idle: dead check
        # only) and, when configured, the raw-stream consumer (added at start-up).
        self.liveness = [WorkerLiveness("ingest-batcher", None, lambda: self.batcher.running)]

    def use_model(self, model) -> None:
        """Serve ``model`` from the next micro-batch on (a checked, warmed-up compatible version):
        two reference assignments; the batch in flight keeps the model it read. The ingest path's
        first, so once /v1/model names the new version every batch started after runs it."""
        self.ingestor.model = model
        self.model = model

    def model_info(self) -> ModelInfo:
        model = self.model  # one read: a consistent answer during a swap
        return ModelInfo(name=model.name, version=model.version, lineage=model.manifest.lineage,
                         ordinal=model.manifest.ordinal, runtime=model.runtime, device=str(model.device))

    async def watch_model(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reloader.refresh)
            except Exception:  # a reload must never take the service down
                log.exception("source model refresh failed")

    async def ingest(self, request: IngestRequest) -> IngestResponse:
        validate_against_model(request.instances, self.model.featurizer, self.model.tasks,
                               self.settings.ingest_max_request)
        distinct, positions = distinct_instances(request.instances)
        ids = await self.batcher.submit(distinct)
        return IngestResponse(accepted=len(ids), ins_ids=[str(ids[k]) for k in positions])

    async def update_labels(self, request: LabelsRequest) -> LabelsResponse:
        """Join late labels (refused whole on a bad batch); per-label outcomes are counted."""
        validate_label_updates(request.updates, self.model.tasks, self.settings.ingest_max_request)
        updates = [LabelUpdate(u.user_id, int(u.ins_id), dict(u.labels), u.arrival_ms) for u in request.updates]
        try:
            results = await asyncio.to_thread(self.late_labels.apply, updates)
        except InvalidRecord as err:  # the wire types check the same: a safety net
            raise IngestRejected(f"updates[{err.index}].{err.field}", str(err)) from None
        counts: dict[str, int] = {}
        for result in results:
            for outcome in result.tasks.values():
                counts[outcome] = counts.get(outcome, 0) + 1
        for outcome, n in counts.items():
            metrics.LABEL_UPDATES.labels(outcome).inc(n)
        return LabelsResponse(
            stored=counts.get(STORED, 0), unknown=counts.get(UNKNOWN, 0),
            refused=sum(n for o, n in counts.items() if o not in (STORED, DUPLICATE, UNKNOWN)),
            results=[LabelItemResult(ins_id=str(r.ins_id), labels=r.tasks) for r in results],
        )

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
                self.raw_consumer.liveness.is_alive = lambda: not consumer.done()
                self.liveness.append(self.raw_consumer.liveness)
            interval = self.settings.reload_interval_s
            watcher = asyncio.create_task(self.watch_model(interval)) if interval else None
            gc.collect()
            gc.freeze()  # the loaded model and start-up objects stay out of GC passes
            yield
            if watcher:
                watcher.cancel()
            if consumer:
                consumer.cancel()
            await self.batcher.stop()
            self.executor.shutdown(wait=False)

        async def model_ok() -> tuple[bool, str]:
            model = self.model
            return True, f"{model.name} {model.version} ({model.runtime} on {model.device})"

        app = FastAPI(title="iat source", version="1", lifespan=lifespan,
                      description="Turns instances into InsEmbs and SIF codes, stores them, streams them.")
        install_error_handlers(app)
        install_store_error_handler(app, retry_after_s=self.settings.retry_after_s)
        app.include_router(health_router({"model": model_ok}, self.liveness, store=self.store_guard))
        app.add_middleware(RequestGuard, token=self.settings.token, max_body_bytes=self.settings.max_body_bytes)

        @app.post("/v1/instances", response_model=IngestResponse)
        async def post_instances(body: IngestRequest):
            start = time.perf_counter()
            try:
                response = await self.ingest(body)
            except IngestRejected as err:
                metrics.INSTANCES.labels("rejected").inc(len(body.instances))
                return JSONResponse(error_body("INVALID_ARGUMENT", err.field, err.message, indices=err.indices),
                                    status_code=422)
            except StreamBacklogFull as exc:
                metrics.INSTANCES.labels("backpressure").inc(len(body.instances))
                log.warning("ingest: %s", exc)
                return unavailable(str(exc), self.settings.retry_after_s)
            except STORE_ERRORS as exc:
                # Any store failure -- down, too slow (IAT_REDIS_TIMEOUT_S), out of memory, a
                # read-only replica: the client retries; ingest is idempotent and its
                # transactional write left nothing half done.
                metrics.INSTANCES.labels("unavailable").inc(len(body.instances))
                log.warning("ingest: store failed: %s: %s", type(exc).__name__, exc)
                return unavailable(f"the store failed: {type(exc).__name__}; retry (ingest is idempotent)",
                                   self.settings.retry_after_s)
            metrics.INSTANCES.labels("accepted").inc(response.accepted)
            metrics.INGEST_LATENCY.observe(time.perf_counter() - start)
            return response

        @app.get("/v1/model", response_model=ModelInfo)
        async def get_model():
            """The source model serving now (it changes on a hot reload)."""
            return self.model_info()

        @app.post("/v1/labels", response_model=LabelsResponse)
        async def post_labels(body: LabelsRequest):
            try:
                return await self.update_labels(body)
            except IngestRejected as err:
                metrics.LABEL_UPDATES.labels("rejected").inc(sum(len(u.labels) for u in body.updates))
                return JSONResponse(error_body("INVALID_ARGUMENT", err.field, err.message), status_code=422)

        return app


def serve(settings: Settings, host: str, port: int) -> int:
    keep_freed_memory(settings.malloc_keep_mb)
    configure_torch_threads(settings.torch_threads, workers=MODEL_WORKERS)
    service = SourceService(settings)
    log.info("source: model %s %s, HTTP on %s:%d", service.model.name, service.model.version, host, port)
    uvicorn.run(service.app(), host=host, port=port, log_level="warning", access_log=False)
    return 0
