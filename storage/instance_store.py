"""The instance store: per-instance records and per-user sequences, and the fused history read.

Keys (DESIGN.md section 4); the user id is the Redis Cluster hash tag, so one user's sequence
and records sit on one shard and one server-side script reads them together:
  {prefix}:seq:{<uid>}            sorted set, score = timestamp ms, member = InsID as 20 digits
  {prefix}:ins:{<uid>}:<insid20>  one record (storage.records binary format), TTL = retention

Ordering: newest first; equal timestamps by InsID descending (members are zero-padded decimal,
so Redis' lexicographic tie order is the numeric order). Trimming to ``max_sequence_length``
drops the oldest in the same order.

Idempotency: a record SET of the same InsID overwrites the same bytes, and ZADD of a member
already present leaves one entry, so at-least-once delivery gives exactly one entry.

Version safety: each record carries its source-model version id; a store built with
``source_version=...`` drops records of any other version from reads and counts them in
``History.version_mismatch`` (a ranking model must never read embeddings of a source model it
was not trained with). Records expired by TTL while still in the sequence are counted in
``History.missing``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import redis
import redis.cluster
import redis.exceptions

from contract.history import History  # noqa: E402  (re-exported: the store returns it)
from storage.codecs import Codec
from storage.records import (
    InstanceRecord,
    InvalidRecord,
    RecordFormat,
    source_version_id,
    validate_ins_id,
    validate_timestamp,
    validate_user_id,
)

READ_HISTORY_LUA = (Path(__file__).with_name("read_history.lua")).read_text()
MS_PER_DAY = 86_400_000


def _member(ins_id: int) -> str:
    return f"{ins_id:020d}"


class _StoreBase:
    """Keys, validation and reply decoding shared by the sync and asyncio stores."""

    def __init__(
        self,
        client,
        prefix: str = "iat",
        dim: int = 64,
        codec: str | Codec = "fp32",
        tasks: Sequence[str] = (),
        retention_days: float | None = 30,
        max_sequence_length: int = 1024,
        code_length: int = 0,
        code_dtype=np.uint16,
        source_version: str | None = None,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix: must be non-empty and without braces, got {prefix!r}")
        if retention_days is not None and not retention_days > 0:
            raise ValueError(f"retention_days: must be > 0 or None, got {retention_days}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be >= 1, got {max_sequence_length}")
        self.client = client
        self.prefix = prefix
        self.layout = RecordFormat(
            dim=dim, codec=codec if isinstance(codec, Codec) else Codec(codec),
            code_length=code_length, code_dtype=np.dtype(code_dtype), tasks=tuple(tasks),
        )
        self.retention_ms = int(retention_days * MS_PER_DAY) if retention_days is not None else None
        self.max_sequence_length = int(max_sequence_length)
        self.source_version = source_version
        self._expected_version_id = source_version_id(source_version) if source_version is not None else None
        self._script_sha: str | None = None

    # ---- keys ------------------------------------------------------------------------------

    def sequence_key(self, user_id: str) -> str:
        return f"{self.prefix}:seq:{{{user_id}}}"

    def record_key_prefix(self, user_id: str) -> str:
        return f"{self.prefix}:ins:{{{user_id}}}:"

    def record_key(self, user_id: str, ins_id: int) -> str:
        return self.record_key_prefix(user_id) + _member(int(ins_id))

    # ---- validation ------------------------------------------------------------------------

    def _sequence_groups(self, entries: Sequence[tuple[str, int, int]]) -> dict[str, dict[str, int]]:
        groups: dict[str, dict[str, int]] = defaultdict(dict)
        for i, entry in enumerate(entries):
            try:
                user_id, ins_id, timestamp_ms = entry
            except (TypeError, ValueError):
                raise InvalidRecord("entry", f"expected (user_id, ins_id, timestamp_ms), got {entry!r}", i) from None
            validate_user_id(user_id, i)
            groups[user_id][_member(validate_ins_id(ins_id, i))] = validate_timestamp(timestamp_ms, i)
        return groups

    @staticmethod
    def _read_args(user_id: str, before_ms: int, limit: int) -> tuple[int, int]:
        validate_user_id(user_id)
        before_ms = validate_timestamp(before_ms, name="before_ms")
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise InvalidRecord("limit", f"must be an int >= 0, got {limit!r}")
        return before_ms, int(limit)

    # ---- decoding --------------------------------------------------------------------------

    def _history(self, found: int, missing: int, blob: bytes, expected_version: str | None) -> History:
        history = self.layout.decode(blob, int(found)) if found else self._empty()
        history.missing = int(missing)
        expected_id = source_version_id(expected_version) if expected_version is not None else self._expected_version_id
        if expected_id is not None and len(history):
            keep = history.source_versions == np.uint64(expected_id)
            if not keep.all():
                history = history.select(keep, version_mismatch=int((~keep).sum()))
        return history

    def _empty(self) -> History:
        layout = self.layout
        return History(
            ins_ids=np.zeros(0, np.uint64), timestamps_ms=np.zeros(0, np.int64),
            embeddings=np.zeros((0, layout.dim), np.float32),
            codes=np.zeros((0, layout.code_length), layout.code_dtype) if layout.code_length else None,
            labels=np.zeros((0, len(layout.tasks)), np.int8), item_hashes=np.zeros(0, np.int64),
            source_versions=np.zeros(0, np.uint64),
        )

    def _two_trip_history(self, members: list[bytes], values: list[bytes | None], expected_version: str | None) -> History:
        found = [v for v in values if v is not None]
        return self._history(len(found), len(members) - len(found), b"".join(found), expected_version)


class InstanceStore(_StoreBase):
    """Sync store over ``redis.Redis`` or ``redis.cluster.RedisCluster`` (same API)."""

    def _sha(self) -> str:
        if self._script_sha is None:
            # On a cluster, SCRIPT LOAD goes to every primary.
            self._script_sha = self.client.script_load(READ_HISTORY_LUA)
        return self._script_sha

    # ---- writes ----------------------------------------------------------------------------

    def write_records(self, records: Sequence[InstanceRecord], pipe=None) -> None:
        """Validate and encode all, then SET each (with TTL) in one pipeline. Idempotent.

        With ``pipe`` the SETs are only queued on it (e.g. a MULTI/EXEC transaction that also
        publishes the stream entries); the caller executes it.
        """
        values = self.layout.encode(records)  # raises InvalidRecord before anything is written
        if not values:
            return
        own = pipe is None
        if own:
            pipe = self.client.pipeline(transaction=False)
        for record, value in zip(records, values):
            pipe.set(self.record_key(record.user_id, record.ins_id), value, px=self.retention_ms)
        if own:
            pipe.execute()

    def append_to_sequences(self, entries: Sequence[tuple[str, int, int]]) -> None:
        """ZADD (user_id, ins_id, ts_ms) entries, trim each user to the newest Lmax. Idempotent."""
        groups = self._sequence_groups(entries)  # raises InvalidRecord before anything is written
        if not groups:
            return
        pipe = self.client.pipeline(transaction=False)
        for user_id, members in groups.items():
            self._queue_append(pipe, user_id, members)
        pipe.execute()

    def write_and_append(self, records: Sequence[InstanceRecord]) -> None:
        """Records and their sequence entries in one pipeline (tests, benchmarks, one-process setups)."""
        values = self.layout.encode(records)
        groups = self._sequence_groups([(r.user_id, r.ins_id, r.timestamp_ms) for r in records])
        pipe = self.client.pipeline(transaction=False)
        for record, value in zip(records, values):
            pipe.set(self.record_key(record.user_id, record.ins_id), value, px=self.retention_ms)
        for user_id, members in groups.items():
            self._queue_append(pipe, user_id, members)
        pipe.execute()

    def _queue_append(self, pipe, user_id: str, members: dict[str, int]) -> None:
        key = self.sequence_key(user_id)
        pipe.zadd(key, members)
        pipe.zremrangebyrank(key, 0, -(self.max_sequence_length + 1))
        if self.retention_ms is not None:
            pipe.pexpire(key, self.retention_ms)

    def sequence_length(self, user_id: str) -> int:
        return int(self.client.zcard(self.sequence_key(user_id)))

    # ---- reads -----------------------------------------------------------------------------

    def read_history_raw(self, user_id: str, before_ms: int, limit: int) -> list:
        """The script's reply ``[found, missing, joined records]`` (one round trip, no decoding)."""
        before_ms, limit = self._read_args(user_id, before_ms, limit)
        args = (1, self.sequence_key(user_id), before_ms, limit, self.record_key_prefix(user_id))
        try:
            return self.client.evalsha(self._sha(), *args)
        except redis.exceptions.NoScriptError:  # server restarted or SCRIPT FLUSH: load again
            self._script_sha = None
            return self.client.evalsha(self._sha(), *args)

    def read_history(self, user_id: str, before_ms: int, limit: int, expected_source_version: str | None = None) -> History:
        """Newest at most ``limit`` instances with timestamp < ``before_ms``, with records: ONE round trip."""
        found, missing, blob = self.read_history_raw(user_id, before_ms, limit)
        return self._history(found, missing, blob, expected_source_version)

    def read_history_two_trips(self, user_id: str, before_ms: int, limit: int, expected_source_version: str | None = None) -> History:
        """The same result in two round trips (ZREVRANGEBYSCORE, then MGET): the comparison baseline."""
        before_ms, limit = self._read_args(user_id, before_ms, limit)
        if limit == 0:
            return self._history(0, 0, b"", expected_source_version)
        members = self.client.zrevrangebyscore(self.sequence_key(user_id), f"({before_ms}", "-inf", start=0, num=limit)
        if not members:
            return self._history(0, 0, b"", expected_source_version)
        prefix = self.record_key_prefix(user_id).encode()
        values = self.client.mget([prefix + m for m in members])
        return self._two_trip_history(members, values, expected_source_version)

    def _evalsha_pipelined(self, sha: str, calls: list[tuple]) -> list:
        """EVALSHA per call in pipelines; replies (or exceptions) in call order.

        redis-py's cluster pipeline refuses EVALSHA, so on a cluster the calls are grouped by the
        primary that owns each user's slot and sent as one plain pipeline per node; a call that
        hits a redirection (resharding under way) is retried alone through the cluster client.
        """
        if not isinstance(self.client, redis.cluster.RedisCluster):
            pipe = self.client.pipeline(transaction=False)
            for args in calls:
                pipe.evalsha(sha, *args)
            return pipe.execute(raise_on_error=False)
        by_node: dict[str, list[int]] = defaultdict(list)
        nodes = {}
        for index, args in enumerate(calls):
            node = self.client.get_node_from_key(args[1])
            nodes[node.name] = node
            by_node[node.name].append(index)
        replies: list = [None] * len(calls)
        for name, indices in by_node.items():
            pipe = nodes[name].redis_connection.pipeline(transaction=False)
            for index in indices:
                pipe.evalsha(sha, *calls[index])
            try:
                node_replies = pipe.execute(raise_on_error=False)
            except redis.exceptions.ConnectionError as exc:
                node_replies = [exc] * len(indices)
            for index, reply in zip(indices, node_replies):
                if isinstance(reply, Exception) and not isinstance(reply, redis.exceptions.NoScriptError):
                    try:
                        reply = self.client.evalsha(sha, *calls[index])
                    except redis.exceptions.RedisError as exc:
                        reply = exc
                replies[index] = reply
        return replies

    def read_histories(
        self, user_ids: Sequence[str], befores_ms: Sequence[int], limit: int, expected_source_version: str | None = None
    ) -> list[History]:
        """Many users' histories in one pipeline (one script call per user; per shard on a cluster)."""
        if len(user_ids) != len(befores_ms):
            raise InvalidRecord("befores_ms", f"{len(befores_ms)} times for {len(user_ids)} users")
        calls = []
        for i, (user_id, before_ms) in enumerate(zip(user_ids, befores_ms)):
            try:
                before_ms, checked_limit = self._read_args(user_id, before_ms, limit)
            except InvalidRecord as exc:
                raise InvalidRecord(exc.field, str(exc).split(": ", 1)[1], i) from None
            calls.append((1, self.sequence_key(user_id), before_ms, checked_limit, self.record_key_prefix(user_id)))
        if not calls:
            return []
        for attempt in range(2):
            replies = self._evalsha_pipelined(self._sha(), calls)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies) or attempt:
                break
            self._script_sha = None
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [self._history(found, missing, blob, expected_source_version) for found, missing, blob in replies]


class AsyncInstanceStore(_StoreBase):
    """asyncio twin for the ranking service: same keys, script and decoding; reads are awaitable."""

    async def _sha(self) -> str:
        if self._script_sha is None:
            self._script_sha = await self.client.script_load(READ_HISTORY_LUA)
        return self._script_sha

    async def read_history_raw(self, user_id: str, before_ms: int, limit: int) -> list:
        before_ms, limit = self._read_args(user_id, before_ms, limit)
        args = (1, self.sequence_key(user_id), before_ms, limit, self.record_key_prefix(user_id))
        try:
            return await self.client.evalsha(await self._sha(), *args)
        except redis.exceptions.NoScriptError:
            self._script_sha = None
            return await self.client.evalsha(await self._sha(), *args)

    async def read_history(self, user_id: str, before_ms: int, limit: int, expected_source_version: str | None = None) -> History:
        found, missing, blob = await self.read_history_raw(user_id, before_ms, limit)
        return self._history(found, missing, blob, expected_source_version)

    async def read_history_two_trips(self, user_id: str, before_ms: int, limit: int, expected_source_version: str | None = None) -> History:
        before_ms, limit = self._read_args(user_id, before_ms, limit)
        if limit == 0:
            return self._history(0, 0, b"", expected_source_version)
        members = await self.client.zrevrangebyscore(self.sequence_key(user_id), f"({before_ms}", "-inf", start=0, num=limit)
        if not members:
            return self._history(0, 0, b"", expected_source_version)
        prefix = self.record_key_prefix(user_id).encode()
        values = await self.client.mget([prefix + m for m in members])
        return self._two_trip_history(members, values, expected_source_version)

    async def read_histories(
        self, user_ids: Sequence[str], befores_ms: Sequence[int], limit: int, expected_source_version: str | None = None
    ) -> list[History]:
        import asyncio

        if len(user_ids) != len(befores_ms):
            raise InvalidRecord("befores_ms", f"{len(befores_ms)} times for {len(user_ids)} users")
        for user_id, before_ms in zip(user_ids, befores_ms):
            self._read_args(user_id, before_ms, limit)
        return list(await asyncio.gather(*(
            self.read_history(u, b, limit, expected_source_version) for u, b in zip(user_ids, befores_ms)
        )))
