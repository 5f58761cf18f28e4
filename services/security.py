"""Access control and request size limits shared by every HTTP port and the gRPC port.

One rule: when ``IAT_API_TOKEN`` is set, everything under ``/v1/`` (ingestion, scoring, the
history view, sequencer stats) and the gRPC ``RankingService`` need ``Authorization: Bearer
<token>``; liveness, readiness, metrics, the OpenAPI document and gRPC health/reflection stay
open so that probes and scrapers work without a secret. Tokens are compared in constant time.

Bodies are limited before anything parses them: a ``Content-Length`` over the limit is refused
at once, and a body without one (chunked) is read only up to the limit, so an oversized request
costs at most ``max_body_bytes`` of memory and never reaches pydantic.
"""
from __future__ import annotations

import hmac
import json

import grpc

PROTECTED_HTTP_PREFIX = "/v1/"
# gRPC methods that stay open: load balancers and grpcurl must work without a token.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def bearer_matches(header_value: str | bytes | None, token: str) -> bool:
    """True when ``header_value`` is ``Bearer <token>``; constant time in the token's content."""
    if header_value is None:
        return False
    if isinstance(header_value, str):
        header_value = header_value.encode("latin-1", errors="replace")
    scheme, _, presented = header_value.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(presented.strip(), token.encode())


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "field": None, "message": message}).encode()


class RequestGuard:
    """Pure ASGI middleware: bearer token on /v1/ (when configured), then the body size limit.

    Authentication comes first, so an anonymous client cannot make the service read a body.
    """

    def __init__(self, app, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token and scope["path"].startswith(PROTECTED_HTTP_PREFIX):
            if not bearer_matches(headers.get(b"authorization"), self.token):
                return await _respond(send, 401, _error("UNAUTHENTICATED", "a valid bearer token is required"),
                                      [(b"www-authenticate", b'Bearer realm="iat"')])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_body_bytes
            except ValueError:
                return await _respond(send, 400, _error("INVALID_ARGUMENT", "bad Content-Length header"))
            if too_large:
                return await _respond(send, 413, _too_large(self.max_body_bytes))
            return await self.app(scope, receive, send)  # the server enforces the declared length
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        # No length declared (chunked): buffer at most the limit, then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _respond(send, 413, _too_large(self.max_body_bytes))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> bytes:
    return _error("PAYLOAD_TOO_LARGE", f"request body larger than {limit} bytes (IAT_MAX_BODY_BYTES)")


async def _respond(send, status: int, body: bytes, extra_headers=()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """gRPC twin of RequestGuard's token check: metadata ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self.token = token

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required "
                                "(metadata 'authorization: Bearer <token>')")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and bearer_matches(value, self.token):
                return await continuation(handler_call_details)
        return self._deny
