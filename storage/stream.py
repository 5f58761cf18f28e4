"""The instance stream: source service -> sequencer, at least once.

A Redis Stream ``{prefix}:stream:{name}`` capped with an approximate MAXLEN (``~``: Redis trims
whole macro nodes, which is much cheaper than an exact cap). Each entry carries what the
sequencer needs to append to the user's sequence, plus side info:
  user_id, ins_id (decimal), timestamp_ms, item_hash, and one ``label:<task>`` field per label.
The sequencer reads through a consumer group, writes the sequence, and only then ACKs; a crashed
consumer's pending entries are taken over with XAUTOCLAIM. With idempotent sequence writes this
gives exactly one sequence entry per instance.

On a cluster the stream is one key, so it lives on one shard (its hash tag is the stream name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import redis
import redis.exceptions

from storage.records import (
    InvalidRecord,
    validate_ins_id,
    validate_timestamp,
    validate_user_id,
)

LABEL_PREFIX = "label:"


@dataclass
class InstanceEvent:
    """One published instance. ``entry_id`` is set on events read back from the stream."""

    user_id: str
    ins_id: int
    timestamp_ms: int
    labels: dict[str, int] = field(default_factory=dict)
    item_hash: int = 0
    entry_id: str | None = None


def _fields(event, index: int) -> dict[str, str]:
    user_id = validate_user_id(getattr(event, "user_id", None), index)
    ins_id = validate_ins_id(getattr(event, "ins_id", None), index)
    timestamp_ms = validate_timestamp(getattr(event, "timestamp_ms", None), index)
    item_hash = getattr(event, "item_hash", 0)
    if isinstance(item_hash, bool) or not isinstance(item_hash, int):
        raise InvalidRecord("item_hash", f"must be an int, got {item_hash!r}", index)
    labels = getattr(event, "labels", {}) or {}
    if not isinstance(labels, dict):
        raise InvalidRecord("labels", f"must be a dict task -> 0/1, got {type(labels).__name__}", index)
    out = {"user_id": user_id, "ins_id": str(ins_id), "timestamp_ms": str(timestamp_ms), "item_hash": str(item_hash)}
    for task, value in labels.items():
        if not isinstance(task, str) or not task:
            raise InvalidRecord("labels", f"task names must be non-empty strings, got {task!r}", index)
        if int(value) not in (0, 1) or isinstance(value, float):
            raise InvalidRecord("labels", f"label of {task!r} must be 0 or 1, got {value!r}", index)
        out[LABEL_PREFIX + task] = str(int(value))
    return out


def _event(entry_id: bytes | str, fields: dict) -> InstanceEvent:
    text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in fields.items()}
    return InstanceEvent(
        user_id=text["user_id"],
        ins_id=int(text["ins_id"]),
        timestamp_ms=int(text["timestamp_ms"]),
        item_hash=int(text.get("item_hash", 0)),
        labels={k[len(LABEL_PREFIX):]: int(v) for k, v in text.items() if k.startswith(LABEL_PREFIX)},
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
    )


class InstanceStream:
    def __init__(
        self,
        client,
        prefix: str = "iat",
        name: str = "instances",
        group: str = "sequencer",
        maxlen: int = 1_000_000,
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen: must be >= 1, got {maxlen}")
        self.client = client
        self.key = f"{prefix}:stream:{{{name}}}"
        self.group = group
        self.maxlen = int(maxlen)
        self.malformed = 0  # entries acked and dropped because they could not be parsed

    def publish(self, events: Sequence) -> list[str]:
        """XADD each event (InstanceEvent, InstanceRecord or alike); all validated first. Entry ids."""
        payloads = [_fields(event, i) for i, event in enumerate(events)]
        if not payloads:
            return []
        pipe = self.client.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.key, payload, maxlen=self.maxlen, approximate=True)
        return [i.decode() if isinstance(i, bytes) else i for i in pipe.execute()]

    def ensure_group(self, start_id: str = "0") -> bool:
        """Create the consumer group (and the stream) if absent. True when it was created.

        ``start_id="0"``: entries published before the group existed are delivered too.
        """
        try:
            self.client.xgroup_create(self.key, self.group, id=start_id, mkstream=True)
            return True
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise

    def read(self, consumer: str, count: int = 100, block_ms: int | None = None) -> list[InstanceEvent]:
        """New entries for ``consumer`` (they stay pending until acked). ``block_ms=None``: no wait."""
        reply = self.client.xreadgroup(self.group, consumer, {self.key: ">"}, count=count, block=block_ms)
        return self._events(reply[0][1] if reply else [])

    def read_own_pending(self, consumer: str, count: int = 100) -> list[InstanceEvent]:
        """Entries delivered to ``consumer`` and not yet acked (a restarted consumer resumes here)."""
        reply = self.client.xreadgroup(self.group, consumer, {self.key: "0"}, count=count)
        return self._events(reply[0][1] if reply else [])

    def ack(self, entry_ids: Iterable[str]) -> int:
        ids = list(entry_ids)
        return int(self.client.xack(self.key, self.group, *ids)) if ids else 0

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[InstanceEvent]:
        """Take over up to ``count`` entries pending longer than ``min_idle_ms`` with other consumers."""
        events: list[InstanceEvent] = []
        cursor = "0-0"
        while len(events) < count:
            reply = self.client.xautoclaim(
                self.key, self.group, consumer, min_idle_time=min_idle_ms, start_id=cursor, count=count - len(events)
            )
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            events.extend(self._events(reply[1]))
            if cursor == "0-0":
                break
        return events

    def pending_count(self) -> int:
        return int(self.client.xpending(self.key, self.group)["pending"])

    def length(self) -> int:
        return int(self.client.xlen(self.key))

    def lag(self, cap: int = 10_000) -> int:
        """Entries not yet delivered to the group, counted up to ``cap``.

        Redis 6.2 has no XINFO ``lag`` field, so this counts the entries after the group's
        last-delivered id with one bounded XRANGE; a value of ``cap`` means "at least cap".
        """
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.exceptions.ResponseError:  # no stream yet
            return 0
        for group in groups:
            name = group.get("name", group.get(b"name"))
            name = name.decode() if isinstance(name, bytes) else name
            if name == self.group:
                last = group.get("last-delivered-id", group.get(b"last-delivered-id"))
                last = last.decode() if isinstance(last, bytes) else last
                return len(self.client.xrange(self.key, f"({last}", "+", count=cap))
        return self.length()

    def _events(self, entries) -> list[InstanceEvent]:
        events = []
        bad = []
        for entry_id, fields in entries:
            if entry_id is None or fields is None:
                continue  # deleted by MAXLEN trimming while pending (Redis 6.2 returns nil)
            try:
                events.append(_event(entry_id, fields))
            except (KeyError, ValueError):
                bad.append(entry_id)
        if bad:  # a poison entry would be redelivered forever: drop it, count it
            self.malformed += len(bad)
            self.client.xack(self.key, self.group, *bad)
        return events
