"""One consumer of the instance stream.

Order of work in each pass: entries this consumer already received but did not ack (it crashed,
was restarted under the same name, or its last pass failed), then entries that another consumer
left pending for longer than ``claim_idle_ms`` (it died), then new entries. Sequence writes are
idempotent (ZADD of the same member and score), and an entry is acked only after its write, so a
crash at any point loses nothing and doubles nothing.

A failed pass (any store error: connection lost, timeout, OOM, READONLY, NOGROUP; or anything
else) never ends the worker: ``run`` hands each pass to ``services.health.run_supervised``, which
logs and counts the error and retries after a bounded exponential backoff. What the failed pass
had read stays pending with this consumer and is read again first.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis.exceptions
from redis.backoff import AbstractBackoff, ExponentialBackoff

from services import metrics
from services.health import WorkerLiveness, run_supervised
from storage.instance_store import InstanceStore
from storage.stream import InstanceEvent, InstanceStream

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    appended: int = 0
    redelivered: int = 0
    passes: int = 0
    errors: int = 0


class SequencerWorker:
    def __init__(
        self,
        stream: InstanceStream,
        store: InstanceStore,
        consumer: str,
        *,
        batch_size: int = 512,
        block_ms: int = 500,
        claim_idle_ms: int = 30_000,
        claim_every_s: float = 5.0,
        backoff: AbstractBackoff | None = None,
        stall_s: float | None = 300.0,
    ) -> None:
        self.stream = stream
        self.store = store
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s
        self.backoff = backoff or ExponentialBackoff(cap=5.0, base=0.05)
        self.liveness = WorkerLiveness(consumer, stall_s)
        self.stats = WorkerStats()
        self._own_pending_done = False
        self._group_ready = False
        self._next_claim = 0.0

    def _apply(self, events: list[InstanceEvent], *, redelivered: bool) -> int:
        if not events:
            return 0
        self.store.append_to_sequences([(e.user_id, e.ins_id, e.timestamp_ms) for e in events])
        self.stream.ack([e.entry_id for e in events])  # only after the write
        n = len(events)
        self.stats.appended += n
        metrics.SEQUENCER_APPENDED.inc(n)
        if redelivered:
            self.stats.redelivered += n
            metrics.SEQUENCER_REDELIVERIES.inc(n)
        return n

    def run_once(self, *, block: bool = True) -> int:
        """One pass; returns the number of entries appended."""
        self.stats.passes += 1
        if not self._group_ready:
            self.stream.ensure_group()
            self._group_ready = True
        done = 0
        if not self._own_pending_done:
            events = self.stream.read_own_pending(self.consumer, self.batch_size)
            if events:
                return self._apply(events, redelivered=True)
            self._own_pending_done = True
        now = time.monotonic()
        if now >= self._next_claim:
            events = self.stream.claim_stale(self.consumer, self.claim_idle_ms, self.batch_size)
            done += self._apply(events, redelivered=True)
            if len(events) < self.batch_size:
                self._next_claim = now + self.claim_every_s
            if done:
                return done
        events = self.stream.read(self.consumer, self.batch_size, self.block_ms if block else None)
        return done + self._apply(events, redelivered=False)

    def _after_error(self, exc: Exception) -> None:
        self.stats.errors += 1
        self._own_pending_done = False  # what the failed pass read is pending with this consumer
        if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
            # The store came back without the group (restarted without persistence, or
            # flushed): recreate it on the next pass.
            self._group_ready = False

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set, whatever the store does (see the module docstring)."""
        run_supervised(self.run_once, stop, self.liveness, "sequencer", self.backoff, on_error=self._after_error)
