"""One error shape for every HTTP service: {"error", "field", "message"}.

FastAPI's own 422 lists pydantic locations such as ("body", "instances", 3, "timestamp_ms");
clients read one field path instead: ``instances[3].timestamp_ms``.
"""
from __future__ import annotations

import logging

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def field_path(loc) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def error_body(code: str, field: str | None, message: str) -> dict:
    return {"error": code, "field": field, "message": f"{field}: {message}" if field else message}


log = logging.getLogger(__name__)


def unavailable(message: str, retry_after_s: int, field: str | None = None) -> JSONResponse:
    """503 + Retry-After in the one error shape: what clients retry on (ingest is idempotent)."""
    return JSONResponse(error_body("UNAVAILABLE", field, message), status_code=503,
                        headers={"Retry-After": str(retry_after_s)})


def install_store_error_handler(app: FastAPI, retry_after_s: int) -> None:
    """Any store error a route lets through (connection, timeout, OOM, READONLY, ...): JSON 503."""

    @app.exception_handler(redis.exceptions.RedisError)
    async def _store(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        log.warning("store error: %s: %s", type(exc).__name__, exc)
        return unavailable(f"the store failed: {type(exc).__name__}", retry_after_s)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        body = error_body("INVALID_ARGUMENT", field_path(first.get("loc", ())), first.get("msg", "invalid"))
        body["errors"] = [{"field": field_path(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
        return JSONResponse(body, status_code=422)
