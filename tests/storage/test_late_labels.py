"""Late labels on a real Redis server (and the 3-master cluster): joined in place by
storage/update_labels.lua, idempotent, first label wins, refused past the window, and read as of
when they arrived ("a label that arrived after T is unknown at T")."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from storage.instance_store import InstanceStore
from storage.late_labels import LABELS_STREAM, LabelUpdate, LateLabels
from storage.records import HEADER_BYTES, InstanceRecord, InvalidRecord
from storage.stream import InstanceStream

TASKS = ("click", "like")
WINDOW_MS = 60_000
T0 = 1_700_000_000_000
_prefixes = itertools.count()


@pytest.fixture(params=["single", "cluster"])
def client(request):
    return request.getfixturevalue("redis_client" if request.param == "single" else "cluster_client")


def make(client, n=3, user="u1", labels=None):
    prefix = f"late{next(_prefixes)}"
    store = InstanceStore(client, prefix=prefix, dim=2, tasks=TASKS)
    store.write_and_append([InstanceRecord(ins_id=10 + k, user_id=user, timestamp_ms=T0 + 1000 * k,
                                           embedding=np.ones(2, np.float32), labels=dict(labels or {}))
                            for k in range(n)])
    stream = InstanceStream(client, prefix=prefix, name=LABELS_STREAM, group="trainer")
    return store, LateLabels(store, WINDOW_MS, stream), stream


def labels_at(store, before_ms, user="u1"):
    h = store.read_history(user, before_ms, 10)
    return {int(i): dict(zip(TASKS, row.tolist())) for i, row in zip(h.ins_ids, h.labels)}


def test_a_label_is_unknown_before_it_arrived_and_known_after(client):
    store, late, stream = make(client)
    arrival = T0 + 5_000
    [result] = late.apply([LabelUpdate("u1", 10, {"click": 1}, arrival)])
    assert result.tasks == {"click": "stored"} and result.timestamp_ms == T0
    assert labels_at(store, arrival)[10] == {"click": -1, "like": -1}  # arrived AT T: unknown at T
    assert labels_at(store, arrival + 1)[10] == {"click": 1, "like": -1}
    assert labels_at(store, arrival + 1)[11] == {"click": -1, "like": -1}
    [entry] = stream.client.xrange(stream.key)
    assert entry[1][b"ins_id"] == b"10" and entry[1][b"label:click"] == b"1"


def test_the_same_update_twice_stores_once_and_a_different_one_is_refused(client):
    store, late, _ = make(client)
    update = LabelUpdate("u1", 11, {"click": 0, "like": 1}, T0 + 3_000)
    assert late.apply([update])[0].tasks == {"click": "stored", "like": "stored"}
    stored = client.get(store.record_key("u1", 11))
    assert late.apply([update, update])[0].tasks == {"click": "duplicate", "like": "duplicate"}
    later = LabelUpdate("u1", 11, {"click": 1}, T0 + 4_000)
    assert late.apply([later])[0].tasks == {"click": "conflict"}
    assert client.get(store.record_key("u1", 11)) == stored  # byte for byte: first wins
    assert labels_at(store, T0 + 10_000)[11] == {"click": 0, "like": 1}
    assert client.pttl(store.record_key("u1", 11)) > 0  # the record keeps its TTL


def test_window_early_and_unknown_are_per_item_outcomes(client):
    store, late, _ = make(client)
    before = [client.get(store.record_key("u1", i)) for i in (10, 11, 12)]
    results = late.apply([
        LabelUpdate("u1", 10, {"click": 1}, T0 + WINDOW_MS + 1),      # one ms past the window
        LabelUpdate("u1", 11, {"click": 1}, T0 + 1000 - 1),          # before its instance
        LabelUpdate("u1", 999, {"click": 1}, T0 + 5_000),            # never stored
        LabelUpdate("u1", 12, {"like": 1}, T0 + 2000 + WINDOW_MS),   # exactly at the window: joined
    ])
    assert [r.tasks for r in results] == [{"click": "window_closed"}, {"click": "early"}, {"click": "unknown"},
                                          {"like": "stored"}]
    after = [client.get(store.record_key("u1", i)) for i in (10, 11, 12)]
    assert after[:2] == before[:2] and after[2] != before[2]


def test_a_bad_batch_stores_nothing_and_names_the_field(client):
    store, late, stream = make(client)
    before = client.get(store.record_key("u1", 10))
    good = LabelUpdate("u1", 10, {"click": 1}, T0 + 1)
    for bad, field in ((LabelUpdate("u1", 11, {"watch": 1}, T0 + 1), "labels[watch]"),
                       (LabelUpdate("u1", 11, {"click": 2}, T0 + 1), "labels[click]"),
                       (LabelUpdate("u1", 11, {"click": 1}, -5), "arrival_ms"),
                       (LabelUpdate("", 11, {"click": 1}, T0), "user_id")):
        with pytest.raises(InvalidRecord, match=rf"^{re.escape(field)}: .*\(item 1\)"):
            late.apply([good, bad])
    assert client.get(store.record_key("u1", 10)) == before
    assert stream.client.xlen(stream.key) == 0


def test_version_1_records_still_read_and_take_late_labels(redis_client):
    store, late, _ = make(redis_client, n=1, labels={"like": 1})
    key = store.record_key("u1", 10)
    v2 = redis_client.get(key)
    v1 = b"\x01" + v2[1:HEADER_BYTES] + v2[HEADER_BYTES + 4 * len(TASKS):]  # as the old code wrote it
    redis_client.set(key, v1)
    assert labels_at(store, T0 + 1)[10] == {"click": -1, "like": 1}  # its labels came with it
    assert late.apply([LabelUpdate("u1", 10, {"click": 1}, T0 + 700)])[0].tasks == {"click": "stored"}
    assert redis_client.get(key)[0] == 2 and len(redis_client.get(key)) == len(v2)
    assert labels_at(store, T0 + 700)[10] == {"click": -1, "like": 1}
    assert labels_at(store, T0 + 701)[10] == {"click": 1, "like": 1}


def test_labels_of_gives_the_decoded_labels_alone_or_none_for_another_layout(redis_client):
    """What the ranking service's history cache keys on (``RecordFormat.labels_of``): the labels
    ``decode`` gives as of any time, without decoding the rest; None when a record of another
    layout is among them (``decode`` then drops it, and the caller decodes in full)."""
    store, late, _ = make(redis_client, n=3, labels={"like": 1})
    late.apply([LabelUpdate("u1", 10, {"click": 1}, T0 + 500), LabelUpdate("u1", 12, {"click": 0}, T0 + 2_300)])
    records = [redis_client.get(store.record_key("u1", i)) for i in (12, 11, 10)]
    blob, layout = b"".join(records), store.layout
    for as_of in (None, T0, T0 + 500, T0 + 501, T0 + 1_001, T0 + 2_300, T0 + 2_301, T0 + 10**9):
        want = layout.decode(blob, 3, as_of).labels
        got = layout.labels_of(blob, 3, as_of)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), as_of
    assert np.array_equal(layout.labels_of(blob, 3, T0 + 1_001), [[-1, -1], [-1, 1], [1, 1]])
    assert layout.labels_of(b"", 0, T0).shape == (0, len(TASKS))
    v1 = b"\x01" + records[2][1:HEADER_BYTES] + records[2][HEADER_BYTES + 4 * len(TASKS):]
    assert layout.labels_of(records[0] + v1, 2, T0 + 501) is None
    assert layout.decode(records[0] + v1, 2, T0 + 501).labels.shape == (2, len(TASKS))  # the full path reads it
    assert layout.labels_of(blob[:-1], 3, T0) is None
