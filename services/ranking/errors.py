"""Errors of a Score call, each with its gRPC status and HTTP status (DESIGN.md section 7)."""
from __future__ import annotations

import grpc


class ScoreError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class InvalidRequest(ScoreError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422


class TooManyCandidates(ScoreError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class ModelNotFound(ScoreError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class StoreUnavailable(ScoreError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(ScoreError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
