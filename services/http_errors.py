"""One error shape for every HTTP service: {"error", "field", "message"}.

FastAPI's own 422 lists pydantic locations such as ("body", "instances", 3, "timestamp_ms");
clients read one field path instead: ``instances[3].timestamp_ms``.
"""
from __future__ import annotations

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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        body = error_body("INVALID_ARGUMENT", field_path(first.get("loc", ())), first.get("msg", "invalid"))
        body["errors"] = [{"field": field_path(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
        return JSONResponse(body, status_code=422)
