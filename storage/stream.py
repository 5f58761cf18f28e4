"""The instance stream: source service -> sequencer, at least once, never trimmed ahead of its readers.

A Redis Stream ``{prefix}:stream:{name}``. Each entry carries what the sequencer needs to append
to the user's sequence, plus side info:
  user_id, ins_id (decimal), timestamp_ms, item_hash, one ``label:<task>`` field per label, and
  ``features`` (base64 of the encoded features) for the trainer (services/trainer).
The sequencer reads through a consumer group, writes the sequence, and only then ACKs; a crashed
consumer's pending entries are taken over with XAUTOCLAIM. With idempotent sequence writes this
gives exactly one sequence entry per instance.

Entries leave the stream only once every consumer group has acknowledged them
(:meth:`InstanceStream.trim_acknowledged`, ``XTRIM MINID`` up to the oldest entry still
undelivered or pending in any group). There is no ``MAXLEN``: it trims by count whatever the
groups have read, so a lagging sequencer silently lost entries. The stream is bounded instead by
backpressure: :meth:`InstanceStream.check_backlog` refuses new entries once ``max_backlog`` are
waiting, and the source answers 503 until the sequencer catches up.

An entry deleted while still pending (trimmed by some other writer, e.g. a source of an older
release still using MAXLEN) can no longer be sequenced: it is acked, counted in
``deleted_pending`` and logged, never left pending for ever.

Partitions (:class:`PartitionedStream`, ``IAT_STREAM_PARTITIONS``): the stream is N streams,
one per partition, and a user's instances all go to partition ``stable_hash64(user_id) % N``
(contract/ids.py: the same in every process, unlike Python's ``hash``), so one user's entries
keep their order inside one partition. Each partition is its own key with its own hash tag,
``{prefix}:stream:{name:<p>}``, so on a cluster the partitions spread over the slots and shards;
partition 0 keeps the single stream's key ``{prefix}:stream:{name}``, so N = 1 is exactly the
stream as it was, and a deployment that grows from 1 to N partitions keeps its entries (the
owner of partition 0 reads them). Shrinking N, or changing N > 1, leaves the entries of
partitions no longer read behind: drain the stream first (source stopped, backlog 0).

Each partition has its own consumer group (a group belongs to a key) and everything above holds
per partition: the backlog bound (a lagging partition refuses only the batches that touch it),
the trim behind the group, the metrics. Consumers own partitions by configuration; two
processes that read the same partition are two consumers of the same group, so each entry is
still delivered to one of them only (and the sequence writes are idempotent anyway).

Writes: on one server a batch's XADDs to all its partitions can sit in ONE MULTI/EXEC (with the
records' scripts, services/source/ingest.py). On a cluster a transaction holds one slot, so
the XADDs go out as one pipeline split per node: ordered (each partition receives its entries
in the batch's order, before the records are written), not atomic across partitions; a failure
part way leaves some partitions with the batch's entries and others without, and the client's
retry publishes the batch again (duplicates are harmless: sequence writes are idempotent).
"""
from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import redis
import redis.exceptions

from contract.ids import stable_hash64
from storage.records import (
    InvalidRecord,
    validate_ins_id,
    validate_timestamp,
    validate_user_id,
)

log = logging.getLogger(__name__)
LABEL_PREFIX = "label:"
FEATURES_FIELD = "features"
# How many entries follow an id (exclusive "(id" syntax), at most ARGV[2].
COUNT_AFTER_LUA = "return #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])"


class StreamBacklogFull(Exception):
    """The stream (a partition of it) holds ``max_backlog`` entries or more: the consumers are
    behind, retry later."""

    def __init__(self, length: int, max_backlog: int, partition: int | None = None) -> None:
        where = "the instance stream" if partition is None else f"partition {partition} of the instance stream"
        super().__init__(
            f"{where} holds {length} entries, its bound is {max_backlog}: "
            "the sequencer is behind or stopped; retry later")
        self.length = length
        self.max_backlog = max_backlog
        self.partition = partition


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of a user's instances: a stable hash of the user id, mod ``partitions``."""
    return stable_hash64(user_id) % partitions


def partition_key(prefix: str, name: str, partition: int) -> str:
    """Partition 0 is the unpartitioned stream's key (see the module docstring); each other
    partition has a hash tag of its own."""
    tag = name if partition == 0 else f"{name}:{partition}"
    return f"{prefix}:stream:{{{tag}}}"


@dataclass
class InstanceEvent:
    """One published instance. ``entry_id`` is set on events read back from the stream."""

    user_id: str
    ins_id: int
    timestamp_ms: int
    labels: dict[str, int] = field(default_factory=dict)
    item_hash: int = 0
    entry_id: str | None = None
    # The instance's encoded features (models.runtime.featurizer.pack_features), for the
    # trainer; opaque here. Carried base64 in the entry's ``features`` field.
    features: bytes | None = None


@dataclass
class TrimResult:
    """What one :meth:`InstanceStream.trim_acknowledged` did."""

    min_id: str | None  # entries below this id were removed; None: nothing could be trimmed
    trimmed: int


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
    features = getattr(event, "features", None)
    if features is not None:
        if not isinstance(features, (bytes, bytearray)):
            raise InvalidRecord("features", f"must be bytes, got {type(features).__name__}", index)
        out[FEATURES_FIELD] = base64.b64encode(features).decode("ascii")
    for task, value in labels.items():
        if not isinstance(task, str) or not task:
            raise InvalidRecord("labels", f"task names must be non-empty strings, got {task!r}", index)
        if int(value) not in (0, 1) or isinstance(value, float):
            raise InvalidRecord("labels", f"label of {task!r} must be 0 or 1, got {value!r}", index)
        out[LABEL_PREFIX + task] = str(int(value))
    return out


def _xadd_all(client, events: Sequence, key_of: Callable[[dict], str], pipe=None) -> list[str]:
    """XADD every event (all validated first) to ``key_of(payload)``: on ``pipe`` when given
    (queued only, ``[]`` returned: the caller executes it), else in one pipeline of its own,
    returning the entry ids in input order."""
    payloads = [_fields(event, i) for i, event in enumerate(events)]
    if not payloads:
        return []
    own = pipe is None
    if own:
        pipe = client.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(key_of(payload), payload)
    if not own:
        return []
    return [_text(i) for i in pipe.execute()]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event(entry_id: bytes | str, fields: dict) -> InstanceEvent:
    text = {_text(k): _text(v) for k, v in fields.items()}
    # The same checks as publish: an entry another writer XADDed must not reach the sequence
    # write, where it would fail its whole batch on every redelivery.
    return InstanceEvent(
        user_id=validate_user_id(text["user_id"]),
        ins_id=validate_ins_id(int(text["ins_id"])),
        timestamp_ms=validate_timestamp(int(text["timestamp_ms"])),
        item_hash=int(text.get("item_hash", 0)),
        labels={k[len(LABEL_PREFIX):]: int(v) for k, v in text.items() if k.startswith(LABEL_PREFIX)},
        entry_id=_text(entry_id),
        features=base64.b64decode(text[FEATURES_FIELD]) if FEATURES_FIELD in text else None,
    )


def _next_id(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id`` (XTRIM MINID keeps ids >= its argument)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _info(group: dict, name: str):
    """A field of an XINFO GROUPS reply (str keys with RESP2, bytes with some parsers)."""
    value = group.get(name, group.get(name.encode()))
    return _text(value) if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class ConsumerGroup:
    """One consumer group of one stream, entries as they are stored ((id, fields) pairs): the
    reads and acks every stream consumer of this project makes (the instance stream below, the
    source service's raw-instance stream)."""

    def __init__(self, client, key: str, group: str) -> None:
        self.client, self.key, self.group = client, key, group

    def ensure(self, start_id: str = "0") -> bool:
        """Create the group (and the stream) if absent; True when it was created.
        ``start_id="0"``: entries published before the group existed are delivered too."""
        try:
            self.client.xgroup_create(self.key, self.group, id=start_id, mkstream=True)
            return True
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise

    def read(self, consumer: str, start: str = ">", count: int = 100, block_ms: int | None = None) -> list:
        """``start=">"``: new entries (they stay pending until acked); ``"0"`` or an id: this
        consumer's own pending entries after it (deleted ones come back with empty fields)."""
        reply = self.client.xreadgroup(self.group, consumer, {self.key: start}, count=count,
                                       block=block_ms if start == ">" else None)
        return reply[0][1] if reply else []

    def ack(self, entry_ids: Iterable) -> int:
        ids = list(entry_ids)
        return int(self.client.xack(self.key, self.group, *ids)) if ids else 0


class InstanceStream:
    def __init__(
        self,
        client,
        prefix: str = "iat",
        name: str = "instances",
        group: str = "sequencer",
        max_backlog: int = 1_000_000,
        on_dropped: Callable[[str, int], None] | None = None,
        partition: int = 0,
    ) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog: must be >= 1, got {max_backlog}")
        if partition < 0:
            raise ValueError(f"partition: must be >= 0, got {partition}")
        self.client = client
        self.partition = partition
        self.key = partition_key(prefix, name, partition)
        self.group = group
        self.max_backlog = int(max_backlog)
        self.malformed = 0  # entries acked and dropped because they could not be parsed
        self.deleted_pending = 0  # entries acked because they were deleted while pending
        self.trimmed = 0  # acknowledged entries removed by trim_acknowledged
        # on_dropped(reason, n): entries acked without being sequenced, reason "malformed" or
        # "deleted_while_pending" (the services count them in a metric; storage knows none).
        self.on_dropped = on_dropped
        self._count_after = None  # redis-py Script: EVALSHA, loaded again after NOSCRIPT
        self.consumers = ConsumerGroup(client, self.key, group)

    def publish(self, events: Sequence, pipe=None) -> list[str]:
        """XADD each event (InstanceEvent, InstanceRecord or alike); all validated first. Entry ids.

        With ``pipe`` the XADDs are only queued on it (e.g. a MULTI/EXEC transaction that also
        writes the records) and ``[]`` is returned: the caller executes the pipeline.
        """
        return _xadd_all(self.client, events, lambda payload: self.key, pipe)

    def check_backlog(self) -> int:
        """The stream's length; raises :class:`StreamBacklogFull` once it reaches ``max_backlog``.

        The check and the following XADDs are not atomic, so concurrent writers may overshoot
        the bound by one batch each: a soft bound on memory, never a reason to drop an entry.
        """
        length = self.length()
        if length >= self.max_backlog:
            raise StreamBacklogFull(length, self.max_backlog, self.partition or None)
        return length

    def ensure_group(self, start_id: str = "0") -> bool:
        """Create the consumer group (and the stream) if absent. True when it was created."""
        return self.consumers.ensure(start_id)

    def read(self, consumer: str, count: int = 100, block_ms: int | None = None) -> list[InstanceEvent]:
        """New entries for ``consumer`` (they stay pending until acked). ``block_ms=None``: no wait."""
        return self._events(self.consumers.read(consumer, ">", count, block_ms))

    def read_own_pending(self, consumer: str, count: int = 100, after: str = "0") -> list[InstanceEvent]:
        """Entries delivered to ``consumer`` and not yet acked (a restarted consumer resumes here),
        the first ``count`` with ids above ``after``: a reader that keeps entries pending while it
        works (the trainer, until its checkpoint) pages with ``after`` = the last id it got.

        Entries deleted while pending come back without fields: they are acked and counted here
        (so they no longer fill the page), and the next page is read until one holds live entries.
        """
        start = after
        while True:
            entries = self.consumers.read(consumer, start, count)
            if not entries:
                return []
            events = self._events(entries)
            if events:
                return events
            start = _text(entries[-1][0])

    def ack(self, entry_ids: Iterable[str]) -> int:
        return self.consumers.ack(entry_ids)

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[InstanceEvent]:
        """Take over up to ``count`` entries pending longer than ``min_idle_ms`` with other consumers."""
        events: list[InstanceEvent] = []
        cursor = "0-0"
        while len(events) < count:
            reply = self.client.xautoclaim(
                self.key, self.group, consumer, min_idle_time=min_idle_ms, start_id=cursor, count=count - len(events)
            )
            cursor = _text(reply[0])
            claimed = reply[1]
            if len(reply) > 2 and reply[2]:
                # Redis >= 7 reports the claimed ids whose entries were deleted, and has already
                # removed them from the pending list: only count them.
                self._count_deleted(len(reply[2]), [_text(i) for i in reply[2]])
            if any(entry_id is None for entry_id, _ in claimed):
                # Redis 6.2 claims a deleted entry without naming it (a nil reply): it is now
                # pending with this consumer, whose own pending list names and resolves it.
                self._resolve_own_deleted(consumer)
            events.extend(self._events([(i, f) for i, f in claimed if i is not None]))
            if cursor == "0-0":
                break
        return events

    def pending_count(self) -> int:
        """Entries delivered to the group and not acked; 0 while the stream or group does not exist."""
        try:
            return int(self.client.xpending(self.key, self.group)["pending"])
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise

    def length(self) -> int:
        return int(self.client.xlen(self.key))

    def lag(self, cap: int = 10_000) -> int:
        """Entries not yet delivered to the group, counted up to ``cap``.

        Redis 7 reports the group's ``lag`` itself; Redis 6.2 has no such field, so a script
        counts the entries after the group's last-delivered id with one bounded XRANGE on the
        server (only the count crosses the network); a value of ``cap`` means "at least cap".
        """
        group = self._group_info()
        if group is None:
            return self.length()
        lag = _info(group, "lag")
        if lag is not None:
            return int(lag)
        last = _info(group, "last-delivered-id")
        if self._count_after is None:
            self._count_after = self.client.register_script(COUNT_AFTER_LUA)
        return int(self._count_after(keys=[self.key], args=[f"({last}", int(cap)]))

    def trim_acknowledged(self) -> TrimResult:
        """XTRIM MINID up to the oldest entry that some group still needs (undelivered or pending).

        Every group counts: one that lags (or was abandoned) holds the stream, and the backlog
        bound then turns that into backpressure rather than loss. No group at all: nothing is
        trimmed (entries published before the group exists are delivered to it).

        The groups' last-delivered ids are read BEFORE their pending lists, so an entry
        delivered in between has an id above the last-delivered id read, and the bound cannot
        pass it; an entry pending when read either stays pending (and holds the bound) or has
        been acked.
        """
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return TrimResult(None, 0)
            raise
        if not groups:
            return TrimResult(None, 0)
        bound: tuple[int, int] | None = None
        for group in groups:
            keep = _next_id(_info(group, "last-delivered-id"))
            if int(_info(group, "pending") or 0):
                lowest = self.client.xpending(self.key, _info(group, "name"))["min"]
                if lowest is not None:
                    keep = _text(lowest)
            if bound is None or _id_key(keep) < bound:
                bound = _id_key(keep)
        min_id = f"{bound[0]}-{bound[1]}"
        trimmed = int(self.client.xtrim(self.key, minid=min_id, approximate=False))
        self.trimmed += trimmed
        return TrimResult(min_id, trimmed)

    def _group_info(self) -> dict | None:
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.exceptions.ResponseError:  # no stream yet
            return None
        for group in groups:
            if _info(group, "name") == self.group:
                return group
        return None

    def _resolve_own_deleted(self, consumer: str, page: int = 1000) -> None:
        """Ack the entries pending with ``consumer`` whose content was deleted (6.2's nil claims)."""
        start = "0"
        while True:
            reply = self.client.xreadgroup(self.group, consumer, {self.key: start}, count=page)
            entries = reply[0][1] if reply else []
            if not entries:
                return
            gone = [_text(i) for i, fields in entries if not fields]
            if gone:
                self.client.xack(self.key, self.group, *gone)
                self._count_deleted(len(gone), gone)
            start = _text(entries[-1][0])

    def _count_deleted(self, n: int, ids: list[str]) -> None:
        self.deleted_pending += n
        if self.on_dropped:
            self.on_dropped("deleted_while_pending", n)
        log.error("stream %s: %d entries were deleted while pending (trimmed by another writer?); "
                  "their instances cannot be sequenced: %s", self.key, n, ids[:5])

    def _events(self, entries) -> list[InstanceEvent]:
        events = []
        bad = []
        gone = []
        for entry_id, fields in entries:
            if entry_id is None:
                continue  # a nil claim (Redis 6.2): resolved through the own pending list
            if not fields:  # deleted while pending: its content is gone, it can only be acked
                gone.append(_text(entry_id))
                continue
            try:
                events.append(_event(entry_id, fields))
            except (KeyError, ValueError):
                bad.append(entry_id)
        if gone:
            self.client.xack(self.key, self.group, *gone)
            self._count_deleted(len(gone), gone)
        if bad:  # a poison entry would be redelivered forever: drop it, count it
            self.client.xack(self.key, self.group, *bad)
            self.malformed += len(bad)
            if self.on_dropped:
                self.on_dropped("malformed", len(bad))
        return events


class PartitionedStream:
    """The instance stream as ``partitions`` streams by user (see the module docstring).

    Writers publish through it (each event to its user's partition); a consumer reads the
    partitions it owns, each an :class:`InstanceStream` of its own (``partitions[p]``).
    """

    def __init__(
        self,
        client,
        partitions: int = 1,
        prefix: str = "iat",
        name: str = "instances",
        group: str = "sequencer",
        max_backlog: int = 1_000_000,
        on_dropped: Callable[[str, int], None] | None = None,
    ) -> None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions: must be an int >= 1, got {partitions!r}")
        self.client = client
        self.max_backlog = int(max_backlog)
        self.partitions = [
            InstanceStream(client, prefix=prefix, name=name, group=group, max_backlog=max_backlog,
                           on_dropped=on_dropped, partition=p)
            for p in range(partitions)
        ]

    @property
    def count(self) -> int:
        return len(self.partitions)

    @property
    def key(self) -> str:
        """The stream's one key; only an unpartitioned stream has one."""
        if self.count != 1:
            raise ValueError(f"a stream of {self.count} partitions has no single key: use partitions[p].key")
        return self.partitions[0].key

    def partition_of(self, user_id: str) -> int:
        return partition_of(user_id, self.count)

    def publish(self, events: Sequence, pipe=None) -> list[str]:
        """XADD each event to its user's partition, all validated first; entry ids in input order.

        With ``pipe`` the XADDs are only queued on it (one MULTI/EXEC on one server holds every
        partition's) and ``[]`` is returned: the caller executes the pipeline.
        """
        return _xadd_all(self.client, events,
                         lambda payload: self.partitions[self.partition_of(payload["user_id"])].key, pipe)

    def lengths(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Entries per partition (all, or those named), in one pipeline."""
        chosen = sorted(set(range(self.count) if partitions is None else partitions))
        pipe = self.client.pipeline(transaction=False)
        for p in chosen:
            pipe.xlen(self.partitions[p].key)
        return {p: int(n) for p, n in zip(chosen, pipe.execute())}

    def check_backlog(self, user_ids: Iterable[str] | None = None) -> dict[int, int]:
        """Lengths of the partitions these users' instances go to (all partitions when None);
        raises :class:`StreamBacklogFull` when one of them holds ``max_backlog`` entries or more.
        A soft bound, as :meth:`InstanceStream.check_backlog`."""
        touched = None if user_ids is None else {self.partition_of(u) for u in user_ids}
        lengths = self.lengths(touched)
        for p, length in lengths.items():
            if length >= self.max_backlog:
                raise StreamBacklogFull(length, self.max_backlog, p if self.count > 1 else None)
        return lengths

    def ensure_group(self, start_id: str = "0") -> bool:
        """Every partition's consumer group (and stream); True when one was created."""
        created = [part.ensure_group(start_id) for part in self.partitions]
        return any(created)

    def length(self) -> int:
        return sum(self.lengths().values())

    def pending_count(self) -> int:
        return sum(part.pending_count() for part in self.partitions)

    def lag(self, cap: int = 10_000) -> int:
        return sum(part.lag(cap) for part in self.partitions)
