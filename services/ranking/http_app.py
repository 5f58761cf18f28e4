"""REST router for the ranking service: the same Score path as gRPC, plus a history view."""
from __future__ import annotations

import os
import time

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from contract.validation import MAX_ID_LENGTH, MAX_TIMESTAMP_MS, InvalidField, check_id
from services import metrics
from services.health import health_router
from services.http_errors import error_body, install_error_handlers
from services.ranking.errors import InvalidRequest, ScoreError
from services.ranking.protocol import (
    ScoreRequestModel,
    ScoreResponseModel,
    query_from_model,
    result_to_model,
)
from services.security import RequestGuard


# Which of several worker processes on the port answered (IAT_RANKING_WORKERS).
WORKER_PID_HEADER = "x-iat-worker-pid"


def error_response(err: ScoreError) -> JSONResponse:
    return JSONResponse(error_body(err.grpc_code.name, err.field, err.message), status_code=err.http_status)


def create_app(serving) -> FastAPI:
    app = FastAPI(
        title="iat ranking",
        description="Score candidates with sequence-aware IAT/SIF models (REST twin of gRPC Score).",
        version="1",
    )
    if serving.settings.ranking_workers > 1 and serving.settings.prometheus_multiproc_dir is not None:
        app.add_api_route("/metrics", _all_workers_metrics(serving), methods=["GET"], tags=["health"],
                          summary="Prometheus metrics of all the workers on this port")
    app.include_router(health_router(serving.readiness_checks(), store=serving.store_guard))
    app.add_middleware(RequestGuard, token=serving.settings.token, max_body_bytes=serving.settings.max_body_bytes)
    install_error_handlers(app)

    @app.exception_handler(ScoreError)
    async def _score_error(_: Request, err: ScoreError) -> JSONResponse:
        return error_response(err)

    @app.post("/v1/score", response_model=ScoreResponseModel)
    async def score(body: ScoreRequestModel, response: Response) -> ScoreResponseModel:
        start = time.perf_counter()
        status = "OK"
        try:
            result = await serving.score(query_from_model(body), timeout_s=None)
            response.headers[WORKER_PID_HEADER] = str(os.getpid())
            return result_to_model(result)
        except ScoreError as err:
            status = err.grpc_code.name
            raise
        finally:
            metrics.SCORE_LATENCY.labels("rest", status).observe(time.perf_counter() - start)

    @app.get("/v1/users/{user_id}/history")
    async def history(
        user_id: str = Path(..., min_length=1, max_length=MAX_ID_LENGTH),
        before_ms: int = Query(..., gt=0, le=MAX_TIMESTAMP_MS, description="only instances strictly before this time"),
        limit: int | None = Query(None, gt=0, le=4096, description="default and cap: the model's max_history"),
        model: str = Query("", max_length=MAX_ID_LENGTH, description="default: the default model"),
    ) -> dict:
        """Exactly the history Score with ``model`` uses for a request whose history bound is
        ``before_ms`` (request_time_ms - IAT_HISTORY_DELAY_MS), and, in ``skipped``, what the
        read examined and did not use, with the reason."""
        try:
            check_id(user_id, "user_id")
        except InvalidField as err:
            raise InvalidRequest(err.message, err.field) from None
        return await serving.history(user_id, before_ms, limit, model)

    return app


def _all_workers_metrics(serving):
    """/metrics when several workers share the port: whichever worker a scrape reaches answers
    for all of them, from prometheus_client's multiprocess files (counters and histograms summed
    over the workers; gauges per worker, with a ``pid`` label). Registered before the health
    router's /metrics, which would report the one worker the scrape happened to reach."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(serving.settings.prometheus_multiproc_dir))

    async def metrics_endpoint() -> Response:
        await serving.store_guard.refresh_gauges()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics_endpoint
