"""The ingest path: featurize -> (history for streaming user-order) -> source model -> stream -> store.

What an InsEmb depends on (DESIGN.md section 4; README "Stored instances and history reads"): the
instance and the user's earlier STORED instances only, never how far a stream consumer lags.
The store writes a record and its sequence membership together (one script per user,
storage/write_instances.lua), so the sequence read here holds every instance stored so far.

Out-of-order arrival: an InsEmb is computed once, at ingest, from the user's stored instances
strictly before its timestamp as they are at that moment (plus the same user's earlier
instances of the same batch). An instance that arrives later with an earlier timestamp is
stored and used by instances ingested after it, but never rewrites the InsEmbs stored before
it; a retried instance keeps the record first stored for it (same source-model version).
So replaying the same instances in the same order gives byte-identical records.

Writes: a batch is refused whole (``StreamBacklogFull``, a 503) before any work when the
backlog of a stream partition it touches has reached its bound. On one server the per-user
record + sequence scripts and the stream entries (in every partition the batch touches) are ONE
MULTI/EXEC transaction: a store failure (connection lost, timeout, OOM) leaves all of them or
none. On a cluster a transaction holds one slot only and each partition is a key of its own, so
the stream entries go first (per partition, in the batch's order), then the per-user scripts: a
failure in between leaves entries whose records are not stored, which the sequencer may add as
members that no read uses (a record must be present) and the next read removes; the client's
retry stores them. Every write is idempotent by InsID.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import redis.cluster

from contract.history import History
from models.runtime.featurizer import pack_features
from models.runtime.hashing import ins_id as make_ins_id
from models.runtime.loader import SourceModel
from services.source.protocol import Instance
from storage.instance_store import InstanceStore
from storage.records import InstanceRecord
from storage.stream import InstanceEvent, PartitionedStream

log = logging.getLogger(__name__)


@dataclass
class IngestTimings:
    """Seconds spent per part, summed over batches (for `iat bench ingest`)."""

    featurize: float = 0.0
    history: float = 0.0
    model: float = 0.0
    store: float = 0.0
    batches: int = 0
    instances: int = 0
    by_part: dict = field(default_factory=dict)


class Ingestor:
    """``model`` may be replaced at any time by a compatible version (services/source/reload.py):
    ``ingest`` reads the reference once, so one batch runs on one model from start to end."""

    def __init__(self, model: SourceModel, store: InstanceStore, stream: PartitionedStream) -> None:
        self.model = model
        self.store = store
        self.stream = stream
        self.timings = IngestTimings()

    @staticmethod
    def featurize(model: SourceModel, instances: list[Instance]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encode = model.featurizer.encode
        parts = [
            encode(i.user_id, i.timestamp_ms, [i.item_id], i.features.categorical, i.features.numeric, [{}], [{}])
            for i in instances
        ]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))

    def histories(self, model: SourceModel, instances: list[Instance], ids: list[int],
                  item_hashes: np.ndarray) -> list[History] | None:
        """Streaming user-order (IAT Eq. 7-8): each instance's previous instances.

        The store's sequence holds every stored instance (written with its record), read here
        with no version filter (the source model reads only item hashes and timestamps). The
        same user's EARLIER instances in this very batch are not stored yet: they are merged in
        here, so a replay that sends a user's instances together embeds them as training did.
        """
        if not model.history_length:
            return None
        limit = model.history_length
        found = self.store.read_histories([i.user_id for i in instances], [i.timestamp_ms for i in instances], limit)
        by_user: dict[str, list[int]] = {}
        for k, inst in enumerate(instances):
            by_user.setdefault(inst.user_id, []).append(k)
        out = []
        for k, (inst, h) in enumerate(zip(instances, found)):
            ts, items = h.timestamps_ms, h.item_hashes
            earlier = [j for j in by_user[inst.user_id] if instances[j].timestamp_ms < inst.timestamp_ms]
            if earlier:
                known = set(h.ins_ids.tolist())
                fresh = [j for j in earlier if ids[j] not in known]
                ts = np.concatenate([ts, np.array([instances[j].timestamp_ms for j in fresh], dtype=np.int64)])
                items = np.concatenate([items, item_hashes[fresh]])
                found_ids = np.concatenate([h.ins_ids, np.array([ids[j] for j in fresh], dtype=np.uint64)])
                # newest first, ties by InsID descending: the store's (and the loader's) order
                order = np.lexsort((found_ids, ts))[::-1][:limit]
                ts, items = ts[order], items[order]
            out.append(History.items_only(ts, items))
        return out

    def write(self, records: list[InstanceRecord], events: list[InstanceEvent]) -> None:
        """Records, their sequence membership and their stream entries (see the module docstring)."""
        client = self.stream.client
        if isinstance(client, redis.cluster.RedisCluster):
            self.stream.publish(events)  # first: a failure before the store leaves nothing a read uses
            self.store.write_and_append(records, keep_stored=True)
            return
        pipe = client.pipeline(transaction=True)
        self.store.write_and_append(records, keep_stored=True, pipe=pipe)  # a stored record stays as it is
        self.stream.publish(events, pipe=pipe)
        pipe.execute()  # raises the first error reply

    def ingest(self, instances: list[Instance]) -> list[int]:
        """Embed, store and publish a batch; returns the InsIDs in input order."""
        # raises StreamBacklogFull: nothing is computed or written
        self.stream.check_backlog(i.user_id for i in instances)
        model = self.model  # one read: a reload between batches, never inside one
        t0 = time.perf_counter()
        ids = [make_ins_id(i.request_id, i.item_id, i.timestamp_ms) for i in instances]
        cat, multi, num = self.featurize(model, instances)
        ts = np.array([i.timestamp_ms for i in instances], dtype=np.int64)
        spec = model.feature_spec
        item_hashes = cat[:, spec.cat_fields.index(spec.item_field)].copy()
        t1 = time.perf_counter()
        history = self.histories(model, instances, ids, item_hashes)
        t2 = time.perf_counter()
        embeddings, codes = model.embed(cat, multi, num, item_hashes, ts, history)
        t3 = time.perf_counter()
        records = [
            InstanceRecord(
                ins_id=ids[k], user_id=inst.user_id, timestamp_ms=inst.timestamp_ms,
                embedding=embeddings[k], codes=None if codes is None else codes[k],
                labels=dict(inst.labels), item_hash=int(item_hashes[k]),
                source_version=model.version, source_lineage=model.manifest.lineage,
                source_ordinal=model.manifest.ordinal or 0,
            )
            for k, inst in enumerate(instances)
        ]
        # The stream entry carries the encoded features too: the trainer trains on exactly what
        # the source model embedded (services/trainer).
        events = [
            InstanceEvent(user_id=r.user_id, ins_id=r.ins_id, timestamp_ms=r.timestamp_ms, labels=r.labels,
                          item_hash=r.item_hash, features=pack_features(cat[k], multi[k], num[k]))
            for k, r in enumerate(records)
        ]
        self.write(records, events)
        t4 = time.perf_counter()
        tm = self.timings
        tm.featurize += t1 - t0
        tm.history += t2 - t1
        tm.model += t3 - t2
        tm.store += t4 - t3
        tm.batches += 1
        tm.instances += len(instances)
        return ids
