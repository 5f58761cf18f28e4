"""Raw instances from a Redis stream, as an alternative to POST /v1/instances.

A producer XADDs one entry per instance with a field ``instance`` holding the same JSON as one
element of the POST body. The source service reads them through a consumer group, validates
each entry alone (a bad entry is rejected, counted, logged and acked: it must not block the
stream), sends the good ones through the same coalesced forward and writes as HTTP ingestion,
and acks only after the writes.

Any failure of a pass (a store error such as OOM or READONLY, the instance stream's backlog
being full, ...) is retried with a bounded backoff (services.health.run_supervised_async); the
entries that pass had read stay pending with this consumer, and the next pass reads them again
before new ones (as after a restart). `/healthz` reports the consumer dead or stalled.
"""
from __future__ import annotations

import asyncio
import logging

import redis.exceptions
from pydantic import ValidationError

from services import metrics
from services.health import WorkerLiveness, run_supervised_async, worker_backoff
from services.http_errors import field_path
from services.source.protocol import IngestRejected, Instance, validate_against_model
from storage.stream import ConsumerGroup

log = logging.getLogger(__name__)
FIELD = b"instance"


class RawInstanceConsumer:
    def __init__(self, service, stream_key: str, group: str, consumer: str, block_ms: int = 500) -> None:
        self.service = service  # SourceService: model, batcher, settings, client
        self.key = stream_key
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.entries = ConsumerGroup(service.client, stream_key, group)
        self.accepted = 0
        self.rejected = 0
        settings = service.settings
        self.liveness = WorkerLiveness(f"raw-stream {stream_key}", settings.worker_stall_s)
        self.backoff = worker_backoff(settings.worker_backoff_base_s, settings.worker_backoff_cap_s)
        self._group_ready = False
        self._own_pending_done = False

    def ensure_group(self) -> None:
        self.entries.ensure("0")

    def _read(self, start: str) -> list:
        return self.entries.read(self.consumer, start, self.service.settings.ingest_max_batch, self.block_ms)

    def parse(self, entries) -> tuple[list[Instance], list]:
        """Valid instances, and the ids of every entry (valid or not) to ack after the writes."""
        model = self.service.model
        good: list[Instance] = []
        for entry_id, fields in entries:
            try:
                instance = Instance.model_validate_json(fields[FIELD])
                validate_against_model([instance], model.featurizer, model.tasks, 1)
                good.append(instance)
            except (KeyError, ValidationError, IngestRejected) as exc:
                self.rejected += 1
                metrics.INSTANCES.labels("rejected").inc()
                log.warning("raw stream %s: entry %s rejected: %s", self.key, entry_id, _reason(exc))
        return good, [entry_id for entry_id, _ in entries]

    async def run_once(self, start: str = ">") -> int:
        entries = await asyncio.to_thread(self._read, start)
        if not entries:
            return 0
        # An entry trimmed while pending comes back without its fields: nothing to ingest, ack it.
        live = [(i, f) for i, f in entries if f]
        good, _ = self.parse(live)
        if good:
            await self.service.batcher.submit(good)
            self.accepted += len(good)
            metrics.INSTANCES.labels("accepted").inc(len(good))
        await asyncio.to_thread(self.entries.ack, [i for i, _ in entries])
        return len(entries)

    async def _pass(self) -> None:
        if not self._group_ready:
            await asyncio.to_thread(self.ensure_group)
            self._group_ready = True
        if not self._own_pending_done:
            # What this consumer held unacked when it stopped or when a pass failed: each page
            # is acked once written, so reading from "0" again gives the next page.
            if await self.run_once("0"):
                return
            self._own_pending_done = True
        await self.run_once()

    def _after_error(self, exc: Exception) -> None:
        self._own_pending_done = False
        if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
            self._group_ready = False

    async def run(self) -> None:
        await run_supervised_async(self._pass, self.liveness, "raw-stream", self.backoff, on_error=self._after_error)


def _reason(exc: Exception) -> str:
    """The rejected field and why, named as the HTTP API names it (instances[0] is the entry itself)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{field_path(first['loc'])}: {first['msg']}"
    if isinstance(exc, KeyError):
        return f"no field {FIELD.decode()!r}"
    return str(exc)
