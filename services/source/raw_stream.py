"""Raw instances from a Redis stream, as an alternative to POST /v1/instances.

A producer XADDs one entry per instance with a field ``instance`` holding the same JSON as one
element of the POST body. The source service reads them through a consumer group, validates
each entry alone (a bad entry is rejected, counted, logged and acked: it must not block the
stream), sends the good ones through the same coalesced forward and writes as HTTP ingestion,
and acks only after the writes. Its own unacked entries are read again after a restart.
"""
from __future__ import annotations

import asyncio
import logging

import redis.exceptions
from pydantic import ValidationError

from services import metrics
from services.http_errors import field_path
from services.source.protocol import IngestRejected, Instance, validate_against_model

log = logging.getLogger(__name__)
FIELD = b"instance"


class RawInstanceConsumer:
    def __init__(self, service, stream_key: str, group: str, consumer: str, block_ms: int = 500) -> None:
        self.service = service  # SourceService: model, batcher, settings, client
        self.key = stream_key
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.accepted = 0
        self.rejected = 0

    def ensure_group(self) -> None:
        try:
            self.service.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str) -> list:
        reply = self.service.client.xreadgroup(self.group, self.consumer, {self.key: start},
                                               count=self.service.settings.ingest_max_batch,
                                               block=None if start == "0" else self.block_ms)
        return reply[0][1] if reply else []

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
        entries = [(i, f) for i, f in entries if f is not None]  # trimmed while pending
        if not entries:
            return 0
        good, ids = self.parse(entries)
        if good:
            await self.service.batcher.submit(good)
            self.accepted += len(good)
            metrics.INSTANCES.labels("accepted").inc(len(good))
        await asyncio.to_thread(self.service.client.xack, self.key, self.group, *ids)
        return len(entries)

    async def run(self) -> None:
        await asyncio.to_thread(self.ensure_group)
        while await self.run_once("0"):  # what this consumer held when it last stopped
            pass
        backoff = 0.1
        while True:
            try:
                await self.run_once()
                backoff = 0.1
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                log.warning("raw stream %s: store unavailable (%s); retrying in %.1fs", self.key, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


def _reason(exc: Exception) -> str:
    """The rejected field and why, named as the HTTP API names it (instances[0] is the entry itself)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{field_path(first['loc'])}: {first['msg']}"
    if isinstance(exc, KeyError):
        return f"no field {FIELD.decode()!r}"
    return str(exc)
