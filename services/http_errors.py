"""One error shape for every HTTP service: {"error", "field", "message"}.

FastAPI's own 422 lists pydantic locations such as ("body", "instances", 3, "timestamp_ms");
clients read one field path instead: ``instances[3].timestamp_ms``. Its other errors (malformed
JSON, unknown path, wrong method) would answer ``{"detail": ...}``; every app installs these
handlers so that no 4xx has another shape.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.errors import STORE_ERRORS, describe

# Codes as gRPC names them (ScoreError uses the same), for the HTTP errors FastAPI raises itself.
_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
          422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def field_path(loc) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def error_body(code: str, field: str | None, message: str, **extra) -> dict:
    body = {"error": code, "field": field, "message": f"{field}: {message}" if field else message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def _malformed_json(error: dict) -> JSONResponse:
    """The body is not JSON at all: 400, the field is the body, the message says where."""
    loc = error.get("loc", ())
    position = loc[-1] if loc and isinstance(loc[-1], int) else None
    reason = (error.get("ctx") or {}).get("error") or error.get("msg", "JSON decode error")
    where = f" at position {position}" if position is not None else ""
    return JSONResponse(error_body("INVALID_ARGUMENT", "body", f"malformed JSON: {reason}{where}"), status_code=400)


log = logging.getLogger(__name__)


def unavailable(message: str, retry_after_s: int, field: str | None = None) -> JSONResponse:
    """503 + Retry-After in the one error shape: what clients retry on (ingest is idempotent)."""
    return JSONResponse(error_body("UNAVAILABLE", field, message), status_code=503,
                        headers={"Retry-After": str(retry_after_s)})


def install_store_error_handler(app: FastAPI, retry_after_s: int) -> None:
    """Any store error a route lets through (connection, timeout, OOM, READONLY, ...): JSON 503."""

    async def _store(_: Request, exc: Exception) -> JSONResponse:
        log.warning("store error: %s", describe(exc))
        return unavailable(f"the store failed: {type(exc).__name__}", retry_after_s)

    for error in STORE_ERRORS:  # one classification (storage.errors) for every service
        app.add_exception_handler(error, _store)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _malformed_json(first)
        body = error_body("INVALID_ARGUMENT", field_path(first.get("loc", ())), first.get("msg", "invalid"))
        body["errors"] = [{"field": field_path(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        known = status in HTTPStatus._value2member_map_
        code = _CODES.get(status) or (HTTPStatus(status).name if known else "ERROR")
        detail = exc.detail if isinstance(exc.detail, str) else (HTTPStatus(status).phrase if known else str(exc.detail))
        return JSONResponse(error_body(code, None, detail), status_code=status, headers=exc.headers)
