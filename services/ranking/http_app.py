"""REST router for the ranking service: the same Score path as gRPC, plus a history view."""
from __future__ import annotations

import time

from fastapi import FastAPI, Path, Query, Request
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


def error_response(err: ScoreError) -> JSONResponse:
    return JSONResponse(error_body(err.grpc_code.name, err.field, err.message), status_code=err.http_status)


def create_app(serving) -> FastAPI:
    app = FastAPI(
        title="iat ranking",
        description="Score candidates with sequence-aware IAT/SIF models (REST twin of gRPC Score).",
        version="1",
    )
    app.include_router(health_router(serving.readiness_checks(), store=serving.store_guard))
    app.add_middleware(RequestGuard, token=serving.settings.token, max_body_bytes=serving.settings.max_body_bytes)
    install_error_handlers(app)

    @app.exception_handler(ScoreError)
    async def _score_error(_: Request, err: ScoreError) -> JSONResponse:
        return error_response(err)

    @app.post("/v1/score", response_model=ScoreResponseModel)
    async def score(body: ScoreRequestModel) -> ScoreResponseModel:
        start = time.perf_counter()
        status = "OK"
        try:
            result = await serving.score(query_from_model(body), timeout_s=None)
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
