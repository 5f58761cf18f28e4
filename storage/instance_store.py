"""The instance store: per-instance records and per-user sequences, and the fused history read.

Keys (DESIGN.md section 4); the user id is the Redis Cluster hash tag, so one user's sequence
and records sit on one shard and one server-side script reads or writes them together:
  {prefix}:seq:{<uid>}            sorted set, score = timestamp ms, member = InsID as 20 digits
  {prefix}:ins:{<uid>}:<insid20>  one record (storage.records binary format), TTL = retention
where <uid> is the user id as is, except that an id starting with "}" (or NUL) gets a NUL in
front (``user_tag``): Redis takes the text between the first "{" and the next "}" as the tag,
so "{}x}" would have an empty tag, which Redis ignores, hashing the whole key instead and
putting a user's sequence and records on different slots. Valid user ids hold no NUL
(contract.validation), so the escape never meets a real id and keeps keys one-to-one.

Ordering: newest first; equal timestamps by InsID descending (members are zero-padded decimal,
so Redis' lexicographic tie order is the numeric order). Trimming to ``max_sequence_length``
drops the oldest in the same order.

Writes (``write_and_append``, storage/write_instances.lua): one script call per user stores the
user's records AND adds them to the user's sequence (trimmed to Lmax), atomically, so the
sequence holds every stored instance the moment it is stored, however far a stream consumer
lags. With ``keep_stored`` (ingest: an InsEmb is computed once) a record already stored by the
same source-model version is kept, never recomputed; ZADD of a member already present leaves one
entry. So at-least-once delivery and client retries give exactly one entry and the first record.
The sequence's TTL only grows (it outlives the records it names).

Memory follows what is servable: the same script deletes the record of every member its trim
removes, so a user holds at most Lmax records and one sequence: records of the user == members
of the sequence (tests/storage/test_store_memory.py). An instance older than the newest Lmax
(out-of-order arrival, or a re-delivery after its trim) is added and trimmed again in that call
and its record is never written (``write_and_append`` counts it neither written nor kept): no
history read could return it. Members without a record arise only from an expired TTL or a
sequence-only append of an instance never stored; the history read removes them. ``write_records``
alone (tools and tests) writes records outside any sequence and so outside this invariant.

Full history is not kept here. Offline training and backfill (a new source model recomputing
InsEmbs) need every instance with its features, servable or not: they read the instance log
upstream of Redis (the raw instances as POSTed or put on ``IAT_RAW_STREAM``, archived by the
system that produces them, e.g. a Kafka topic or files in object storage), never this store.
The instance stream (storage/stream.py) is no archive either: it carries ids, timestamps and
labels only, and entries leave it once acknowledged. Redis holds what a history read can return;
its size is users x Lmax x bytes per record (``iat storage-cost --users U``, measured per codec).

Reads (``read_history``, storage/read_history.lua), ONE round trip: the newest at most L *usable*
instances strictly before T. Usable = record present, and written by a source-model version that
``compatible_source_versions`` accepts for the reader (its source lineage from an oldest
ordinal on, or an exact version for artifacts without lineage). Members that are not usable are skipped
and counted (``History.missing``, ``History.version_mismatch``) and the read reaches further back
for usable ones, examining at most ``scan_factor * L`` members; members whose record is gone
(expired) are removed from the sequence by the same script. A ranking model must never read
embeddings of a source model it was not trained with, and must not get a shorter history than
the store can give it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import redis
import redis.cluster
import redis.exceptions

from contract.history import History  # noqa: E402  (re-exported: the store returns it)
from contract.lineage import SourceLineage
from storage.codecs import Codec
from storage.records import (
    HEADER_DTYPE,
    InstanceRecord,
    InvalidRecord,
    RecordFormat,
    lineage_id,
    source_version_id,
    split_version_id,
    validate_ins_id,
    validate_timestamp,
    validate_user_id,
)

READ_HISTORY_LUA = (Path(__file__).with_name("read_history.lua")).read_text()
WRITE_INSTANCES_LUA = (Path(__file__).with_name("write_instances.lua")).read_text()
MS_PER_DAY = 86_400_000
DEFAULT_SCAN_FACTOR = 4

# What a reader accepts (``compatible_source_versions``): None, a version string or a lineage.
Accepted = str | SourceLineage | None

# Reasons a history read skips a sequence member (History.skipped, metrics, the history endpoint).
MISSING = "missing"  # the record is gone (TTL): the member is removed from the sequence
VERSION_MISMATCH = "version_mismatch"  # written by a source-model version the reader does not accept
INCOMPATIBLE = "incompatible"  # another embedding dim or code length than the reader decodes


def compatible_source_versions(expected: str | SourceLineage | None) -> SourceLineage | tuple[str, ...] | None:
    """The source-model records a reader that expects ``expected`` may use.

    None: every record (a reader with no expectation, e.g. the source reading item hashes and
    timestamps). A ``SourceLineage`` (a downstream whose manifest declares one): the records of
    that lineage written by ordinal >= its ``min_ordinal``. A version string (an artifact without
    lineage fields): exactly the records of that version, as before lineages
    (docs/source-versions.md).
    """
    if expected is None or isinstance(expected, SourceLineage):
        return expected
    return (expected,)


def _accepted_arg(expected: str | SourceLineage | None) -> bytes:
    """The script's ARGV form of ``compatible_source_versions`` (storage/read_history.lua)."""
    accepted = compatible_source_versions(expected)
    if accepted is None:
        return b""
    if isinstance(accepted, SourceLineage):
        return (b"L" + lineage_id(accepted.lineage).to_bytes(4, "little")
                + accepted.min_ordinal.to_bytes(4, "little"))
    return b"X" + b"".join(source_version_id(v).to_bytes(8, "little") for v in accepted)


def accepted_mask(expected: str | SourceLineage | None, version_ids: np.ndarray) -> np.ndarray:
    """Which header version ids ``compatible_source_versions(expected)`` accepts: the script's
    rule in numpy (two-round-trip reads and tests)."""
    ids = np.asarray(version_ids, dtype=np.uint64)
    accepted = compatible_source_versions(expected)
    if accepted is None:
        return np.ones(len(ids), dtype=bool)
    if isinstance(accepted, SourceLineage):
        lineage, ordinal = split_version_id(ids)
        return (lineage == np.uint64(lineage_id(accepted.lineage))) & (ordinal >= np.uint64(accepted.min_ordinal))
    return np.isin(ids, np.array([source_version_id(v) for v in accepted], np.uint64))


def user_tag(user_id: str) -> str:
    """The user's Redis Cluster hash tag: never empty, one-to-one (see the module docstring)."""
    return "\x00" + user_id if user_id[:1] in ("}", "\x00") else user_id


@dataclass(frozen=True)
class SkippedInstance:
    """A sequence member a history read examined and did not use (the history endpoint)."""

    ins_id: int
    timestamp_ms: int
    reason: str  # MISSING, VERSION_MISMATCH or INCOMPATIBLE
    source_version_id: int | None = None  # from the record header; None when the record is gone


def _member(ins_id: int) -> str:
    return f"{ins_id:020d}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        source_version: Accepted = None,
        scan_factor: int = DEFAULT_SCAN_FACTOR,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix: must be non-empty and without braces, got {prefix!r}")
        if retention_days is not None and not retention_days > 0:
            raise ValueError(f"retention_days: must be > 0 or None, got {retention_days}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be >= 1, got {max_sequence_length}")
        if isinstance(scan_factor, bool) or not isinstance(scan_factor, int) or scan_factor < 1:
            raise ValueError(f"scan_factor: must be an int >= 1, got {scan_factor!r}")
        self.client = client
        self.prefix = prefix
        self.layout = RecordFormat(
            dim=dim, codec=codec if isinstance(codec, Codec) else Codec(codec),
            code_length=code_length, code_dtype=np.dtype(code_dtype), tasks=tuple(tasks),
        )
        # A record TTL that rounds to 0 ms would mean "no TTL" to the write script.
        self.retention_ms = max(int(retention_days * MS_PER_DAY), 1) if retention_days is not None else None
        self.max_sequence_length = int(max_sequence_length)
        self.source_version = source_version
        self.scan_factor = scan_factor
        self._shas: dict[str, str] = {}

    # ---- keys ------------------------------------------------------------------------------

    def sequence_key(self, user_id: str) -> str:
        return f"{self.prefix}:seq:{{{user_tag(user_id)}}}"

    def record_key_prefix(self, user_id: str) -> str:
        return f"{self.prefix}:ins:{{{user_tag(user_id)}}}:"

    def record_key(self, user_id: str, ins_id: int) -> str:
        return self.record_key_prefix(user_id) + _member(int(ins_id))

    # ---- validation and script arguments ---------------------------------------------------

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

    def _write_calls(self, groups: dict[str, dict[str, int]], values: dict[str, dict[str, bytes]],
                     keep_stored: bool = False) -> list[tuple]:
        """One write_instances.lua call per user: (numkeys, keys..., ttl, lmax, keep, record key
        prefix, triples...)."""
        calls = []
        ttl = self.retention_ms or 0
        for user_id, members in groups.items():
            user_values = values.get(user_id, {})
            prefix = self.record_key_prefix(user_id)
            keys = [self.sequence_key(user_id)] + [prefix + m for m in members if m in user_values]
            args: list = [ttl, self.max_sequence_length, "1" if keep_stored else "0", prefix]
            for member, timestamp_ms in members.items():
                args += [member, timestamp_ms, user_values.get(member, b"")]
            calls.append((len(keys), *keys, *args))
        return calls

    def _record_calls(self, records: Sequence[InstanceRecord], keep_stored: bool) -> list[tuple]:
        encoded = self.layout.encode(records)  # raises InvalidRecord before anything is written
        groups = self._sequence_groups([(r.user_id, r.ins_id, r.timestamp_ms) for r in records])
        values: dict[str, dict[str, bytes]] = defaultdict(dict)
        for record, value in zip(records, encoded):
            values[record.user_id].setdefault(_member(int(record.ins_id)), value)  # first one wins
        return self._write_calls(groups, values, keep_stored)

    def _read_args(self, user_id: str, before_ms: int, limit: int, expected_version: Accepted = None,
                   explain: bool = False) -> tuple:
        validate_user_id(user_id)
        before_ms = validate_timestamp(before_ms, name="before_ms")
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise InvalidRecord("limit", f"must be an int >= 0, got {limit!r}")
        limit = int(limit)
        expected = expected_version if expected_version is not None else self.source_version
        return (1, self.sequence_key(user_id), before_ms, limit, self.record_key_prefix(user_id),
                limit * self.scan_factor, _accepted_arg(expected), "1" if explain else "0")

    # ---- decoding --------------------------------------------------------------------------

    def _history(self, reply: list, labels_as_of_ms: int | None = None) -> History:
        """The script's reply decoded; a label that arrived at or after ``labels_as_of_ms`` (a read's
        ``before_ms``: "a label that arrived after T is unknown at T") reads as unknown (-1)."""
        found, missing, mismatch, blob = reply[:4]
        history = self.layout.decode(blob, int(found), labels_as_of_ms) if found else self._empty()
        history.missing, history.version_mismatch = int(missing), int(mismatch)
        if len(reply) > 4:
            history.skipped = self._skipped(reply[4], history)
        return history

    @staticmethod
    def _skipped(detail: list, history: History) -> list[SkippedInstance]:
        split = next(i for i, x in enumerate(detail) if not x)  # the "" after the usable pairs
        usable, rest = detail[:split], detail[split + 1:]
        skipped = []
        for k in range(0, len(rest), 4):
            member, score, reason, header = rest[k:k + 4]
            version = None
            if header:
                version = int(np.frombuffer(header, dtype=HEADER_DTYPE, count=1)[0]["source_version"])
            skipped.append(SkippedInstance(int(member), int(float(score)),
                                           MISSING if _text(reason) == "missing" else VERSION_MISMATCH, version))
        if history.incompatible:  # present and accepted, but not decodable by this reader
            kept = set(history.ins_ids.tolist())
            skipped += [SkippedInstance(int(m), int(float(t)), INCOMPATIBLE)
                        for m, t in zip(usable[::2], usable[1::2]) if int(m) not in kept]
        skipped.sort(key=lambda s: (s.timestamp_ms, s.ins_id), reverse=True)
        return skipped

    def _empty(self) -> History:
        layout = self.layout
        return History(
            ins_ids=np.zeros(0, np.uint64), timestamps_ms=np.zeros(0, np.int64),
            embeddings=np.zeros((0, layout.dim), np.float32),
            codes=np.zeros((0, layout.code_length), layout.code_dtype) if layout.code_length else None,
            labels=np.zeros((0, len(layout.tasks)), np.int8), item_hashes=np.zeros(0, np.int64),
            source_versions=np.zeros(0, np.uint64),
        )

    def history_from_records(self, members: list[bytes], values: list[bytes | None],
                             expected_version: Accepted = None, labels_as_of_ms: int | None = None) -> History:
        """A history from sequence members and their record values as MGET returns them (None:
        record gone), filtered by source version: how a two-round-trip read (harness/two_trips.py,
        the latency baseline of the fused read) decodes what it fetched."""
        found = [v for v in values if v is not None]
        history = self._history([len(found), len(members) - len(found), 0, b"".join(found)], labels_as_of_ms)
        expected = expected_version if expected_version is not None else self.source_version
        if expected is None or not len(history):
            return history
        keep = accepted_mask(expected, history.source_versions)
        if keep.all():
            return history
        return history.select(keep, version_mismatch=int((~keep).sum()))

    @staticmethod
    def _raise_first_error(replies: list) -> None:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply


class InstanceStore(_StoreBase):
    """Sync store over ``redis.Redis`` or ``redis.cluster.RedisCluster`` (same API)."""

    def _sha(self, script: str = READ_HISTORY_LUA) -> str:
        sha = self._shas.get(script)
        if sha is None:
            # On a cluster, SCRIPT LOAD goes to every primary.
            sha = self._shas[script] = self.client.script_load(script)
        return sha

    def _evalsha(self, script: str, args: tuple):
        try:
            return self.client.evalsha(self._sha(script), *args)
        except redis.exceptions.NoScriptError:  # server restarted or SCRIPT FLUSH: load again
            self._shas.pop(script, None)
            return self.client.evalsha(self._sha(script), *args)

    def _evalsha_many(self, script: str, calls: list[tuple]) -> list:
        """Every call in pipelines, the script loaded again once if the server lost it."""
        for attempt in range(2):
            replies = self._evalsha_pipelined(self._sha(script), calls)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies) or attempt:
                return replies
            self._shas.pop(script, None)
        return replies

    # ---- writes ----------------------------------------------------------------------------

    def write_records(self, records: Sequence[InstanceRecord], pipe=None) -> None:
        """Validate and encode all, then SET each (with TTL) in one pipeline, sequences untouched.

        Overwrites (tools and tests that set up records alone); ingest uses ``write_and_append``.
        With ``pipe`` the SETs are only queued on it; the caller executes it.
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
        if groups:
            self._raise_first_error(self._evalsha_many(WRITE_INSTANCES_LUA, self._write_calls(groups, {})))

    def write_and_append(self, records: Sequence[InstanceRecord], *, keep_stored: bool = False,
                         pipe=None) -> tuple[int, int]:
        """Store records AND their sequence membership: one atomic script call per user.

        All records are validated before anything is written. ``keep_stored`` (ingest: an InsEmb
        is computed once): a record that the same source-model version stored already is kept as
        it is; else every record is (re)written (streaming training replaces its InsEmbs).
        Returns (records written, records kept); with ``pipe`` (single server) the script calls
        are only queued on it and (calls queued, 0) is returned: the caller executes it.
        """
        calls = self._record_calls(records, keep_stored)
        if not calls:
            return 0, 0
        if pipe is not None:
            # Queued on the caller's transaction (with the stream entries); the full script, not
            # its sha: a restarted server has lost its script cache, and inside MULTI a NOSCRIPT
            # would fail this command alone while the others ran.
            for call in calls:
                pipe.eval(WRITE_INSTANCES_LUA, *call)
            return len(calls), 0
        replies = self._evalsha_many(WRITE_INSTANCES_LUA, calls)
        self._raise_first_error(replies)
        return sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies)

    def sequence_length(self, user_id: str) -> int:
        return int(self.client.zcard(self.sequence_key(user_id)))

    # ---- reads -----------------------------------------------------------------------------

    def read_history_raw(self, user_id: str, before_ms: int, limit: int,
                         expected_source_version: Accepted = None) -> list:
        """The script's reply ``[found, missing, version mismatches, joined records]`` (no decoding)."""
        return self._evalsha(READ_HISTORY_LUA, self._read_args(user_id, before_ms, limit, expected_source_version))

    def read_history(self, user_id: str, before_ms: int, limit: int, expected_source_version: Accepted = None,
                     explain: bool = False) -> History:
        """Newest at most ``limit`` usable instances with timestamp < ``before_ms``: ONE round trip.

        A label that arrived at or after ``before_ms`` reads as unknown (-1).
        ``expected_source_version`` (else the store's ``source_version``; None: any version; a
        ``SourceLineage``: that lineage from its oldest ordinal on) selects the records usable
        through ``compatible_source_versions``. ``explain``: also list what was
        skipped and why in ``History.skipped``.
        """
        args = self._read_args(user_id, before_ms, limit, expected_source_version, explain)
        return self._history(self._evalsha(READ_HISTORY_LUA, args), before_ms)

    def _evalsha_pipelined(self, sha: str, calls: list[tuple]) -> list:
        """EVALSHA per call in pipelines; replies (or exceptions) in call order.

        redis-py's cluster pipeline refuses EVALSHA, so on a cluster the calls are grouped by the
        primary that owns each user's slot and sent as one plain pipeline per node; a call that
        hits a redirection (resharding under way) is retried alone through the cluster client.
        Every script call here is idempotent, so a retry is safe.
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
        self, user_ids: Sequence[str], befores_ms: Sequence[int], limit: int, expected_source_version: Accepted = None
    ) -> list[History]:
        """Many users' histories in one pipeline (one script call per user; per shard on a cluster)."""
        if len(user_ids) != len(befores_ms):
            raise InvalidRecord("befores_ms", f"{len(befores_ms)} times for {len(user_ids)} users")
        calls = []
        for i, (user_id, before_ms) in enumerate(zip(user_ids, befores_ms)):
            try:
                calls.append(self._read_args(user_id, before_ms, limit, expected_source_version))
            except InvalidRecord as exc:
                raise InvalidRecord(exc.field, str(exc).split(": ", 1)[1], i) from None
        if not calls:
            return []
        replies = self._evalsha_many(READ_HISTORY_LUA, calls)
        self._raise_first_error(replies)
        return [self._history(reply, before_ms) for reply, before_ms in zip(replies, befores_ms)]


class AsyncInstanceStore(_StoreBase):
    """asyncio twin for the ranking service: same keys, script and decoding; reads are awaitable."""

    async def _sha(self, script: str = READ_HISTORY_LUA) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = await self.client.script_load(script)
        return sha

    async def _evalsha(self, script: str, args: tuple):
        try:
            return await self.client.evalsha(await self._sha(script), *args)
        except redis.exceptions.NoScriptError:
            self._shas.pop(script, None)
            return await self.client.evalsha(await self._sha(script), *args)

    async def read_history_raw(self, user_id: str, before_ms: int, limit: int,
                               expected_source_version: Accepted = None) -> list:
        return await self._evalsha(READ_HISTORY_LUA, self._read_args(user_id, before_ms, limit, expected_source_version))

    async def read_history(self, user_id: str, before_ms: int, limit: int, expected_source_version: Accepted = None,
                           explain: bool = False) -> History:
        args = self._read_args(user_id, before_ms, limit, expected_source_version, explain)
        return self._history(await self._evalsha(READ_HISTORY_LUA, args), before_ms)

    async def read_histories(
        self, user_ids: Sequence[str], befores_ms: Sequence[int], limit: int, expected_source_version: Accepted = None
    ) -> list[History]:
        import asyncio

        if len(user_ids) != len(befores_ms):
            raise InvalidRecord("befores_ms", f"{len(befores_ms)} times for {len(user_ids)} users")
        for user_id, before_ms in zip(user_ids, befores_ms):
            self._read_args(user_id, before_ms, limit)
        return list(await asyncio.gather(*(
            self.read_history(u, b, limit, expected_source_version) for u, b in zip(user_ids, befores_ms)
        )))
