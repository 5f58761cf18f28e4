"""One classification of store errors, shared by every service and worker.

- ``STORE_ERRORS``: anything the store (or the way to it) can raise. A service answers these
  with 503 + Retry-After / gRPC UNAVAILABLE, a worker backs off and tries again.
- ``is_transient(exc)``: worth retrying as is: the store is unreachable, loading, out of memory
  under ``noeviction``, read-only after a failover, busy with a script, or a cluster slot moves.
  Anything else (a wrong type, a script bug) is a defect: retried by workers too, but logged as
  an error, never hidden.
"""
from __future__ import annotations

import re

import redis.exceptions

STORE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, ConnectionError, OSError)
UNREACHABLE: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                                ConnectionError, OSError)
# Error replies a healthy server gives while it cannot take writes or is moving data.
_TRANSIENT_REPLIES = ("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
                      "NOREPLICAS", "MOVED", "ASK")
_TRANSIENT = re.compile(r"(?:^|[\s-])(?:" + "|".join(_TRANSIENT_REPLIES) + r")\b")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, UNREACHABLE):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        # the reply's first word, also when a script wraps it ("Error running script ... -OOM ...")
        return bool(_TRANSIENT.search(str(exc)))
    return False


def describe(exc: BaseException) -> str:
    """A one-line reason for logs and error bodies."""
    return f"{type(exc).__name__}: {exc}"
