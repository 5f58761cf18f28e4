"""The one way a service builds its Redis client and stores: from the settings, and for the
instance store from the record layout of the source model whose records it reads or writes."""
from __future__ import annotations

import numpy as np

from contract.layout import RecordLayout
from services import metrics
from services.config import Settings
from storage.connection import connect, connect_async
from storage.instance_store import AsyncInstanceStore, InstanceStore
from storage.stream import PartitionedStream


def _client_options(settings: Settings) -> dict:
    # Every client times out: a hung store becomes an error the caller classifies
    # (storage.errors), never a request or a worker that waits forever.
    return {"socket_timeout": settings.redis_timeout_s, "socket_connect_timeout": settings.redis_timeout_s}


def redis_client(settings: Settings):
    return connect(settings.redis_url, **_client_options(settings))


async def async_redis_client(settings: Settings):
    return await connect_async(settings.redis_url, **_client_options(settings))


def _store_options(settings: Settings, layout: RecordLayout | None) -> dict:
    options = {"prefix": settings.key_prefix, "retention_days": settings.retention_days,
               "max_sequence_length": settings.max_sequence_length, "scan_factor": settings.history_scan_factor}
    if layout is not None:
        options.update(dim=layout.dim, codec=layout.codec, tasks=layout.tasks, code_length=layout.code_length,
                       code_dtype=np.dtype(layout.code_dtype))
    return options


def instance_store(client, settings: Settings, layout: RecordLayout | None = None) -> InstanceStore:
    """``layout`` None: a store that only maintains sequences (the sequencer)."""
    return InstanceStore(client, **_store_options(settings, layout))


def async_instance_store(client, settings: Settings, layout: RecordLayout) -> AsyncInstanceStore:
    return AsyncInstanceStore(client, **_store_options(settings, layout))


def instance_stream(client, settings: Settings) -> PartitionedStream:
    """The instance stream in its ``IAT_STREAM_PARTITIONS`` partitions by user, each bounded by
    its backlog (503 past it) and never trimmed past its groups."""
    return PartitionedStream(client, partitions=settings.stream_partitions, prefix=settings.key_prefix,
                             max_backlog=settings.stream_max_backlog,
                             on_dropped=lambda reason, n: metrics.STREAM_DROPPED.labels(reason).inc(n))
