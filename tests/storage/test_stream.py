"""The instance stream on a real server and cluster: publish, group read, ack, claim from a dead consumer."""
from __future__ import annotations

import time

import numpy as np
import pytest

from storage.instance_store import InstanceStore
from storage.records import InstanceRecord, InvalidRecord
from storage.stream import InstanceEvent, InstanceStream, StreamBacklogFull


@pytest.fixture(params=["single", "cluster"])
def client(request):
    return request.getfixturevalue("redis_client" if request.param == "single" else "cluster_client")


def events(n, user="u", start=0):
    return [InstanceEvent(user, 1000 + i, 10 * i, labels={"like": i % 2}, item_hash=-i) for i in range(start, start + n)]


def test_publish_read_ack(client):
    stream = InstanceStream(client)
    assert stream.ensure_group() is True
    assert stream.ensure_group() is False
    ids = stream.publish(events(5))
    assert len(ids) == 5 and stream.length() == 5
    got = stream.read("c1", count=3)
    assert [(e.user_id, e.ins_id, e.timestamp_ms, e.labels, e.item_hash) for e in got] == [
        ("u", 1000 + i, 10 * i, {"like": i % 2}, -i) for i in range(3)
    ]
    assert [e.entry_id for e in got] == ids[:3]
    assert stream.pending_count() == 3
    assert stream.ack([e.entry_id for e in got]) == 3
    assert stream.pending_count() == 0
    assert [e.ins_id for e in stream.read("c1", count=10)] == [1003, 1004]
    assert stream.read("c1", count=10, block_ms=20) == []


def test_entries_published_before_the_group_are_delivered(client):
    stream = InstanceStream(client)
    stream.publish(events(2))
    stream.ensure_group()
    assert len(stream.read("c", count=10)) == 2


def test_records_can_be_published(client):
    stream = InstanceStream(client)
    stream.ensure_group()
    rec = InstanceRecord(7, "alice", 123, np.zeros(4, np.float32), labels={"like": 1}, item_hash=9)
    stream.publish([rec])
    [event] = stream.read("c")
    assert (event.user_id, event.ins_id, event.timestamp_ms, event.labels, event.item_hash) == ("alice", 7, 123, {"like": 1}, 9)


@pytest.mark.parametrize(
    "bad, field",
    [(InstanceEvent("", 1, 1), "user_id"), (InstanceEvent("u", -1, 1), "ins_id"),
     (InstanceEvent("u", 1, -1), "timestamp_ms"), (InstanceEvent("u", 1, 1, labels={"like": 3}), "labels")],
)
def test_invalid_event_publishes_nothing(client, bad, field):
    stream = InstanceStream(client)
    with pytest.raises(InvalidRecord) as info:
        stream.publish([*events(2), bad])
    assert info.value.field == field and info.value.index == 2
    assert client.exists(stream.key) == 0


def test_trim_removes_only_what_every_group_acknowledged(client):
    """XTRIM MINID stops at the oldest entry some group has not delivered or not acked."""
    stream = InstanceStream(client)
    assert stream.trim_acknowledged().trimmed == 0  # no stream yet
    stream.publish(events(10))
    assert stream.trim_acknowledged().trimmed == 0  # no group: everything is still to deliver
    stream.ensure_group()
    other = InstanceStream(client, group="audit")
    other.ensure_group()
    assert stream.lag() == 10
    first = stream.read("c", count=6)
    assert stream.lag() == 4 and stream.lag(cap=3) == 3
    stream.ack([e.entry_id for e in first[:2]] + [first[4].entry_id])  # entries 2, 3, 5 stay pending
    assert stream.trim_acknowledged().trimmed == 0  # "audit" has read nothing yet
    audit = other.read("a", count=10)
    other.ack([e.entry_id for e in audit])
    assert stream.trim_acknowledged().trimmed == 2  # up to the oldest pending of "sequencer"
    assert stream.length() == 8 and stream.pending_count() == 3
    stream.ack([e.entry_id for e in first])
    assert stream.trim_acknowledged().trimmed == 4  # up to the first undelivered entry
    assert [e.ins_id for e in stream.read("c", count=10)] == [1006, 1007, 1008, 1009]


def test_backlog_bound_refuses_and_never_trims(client):
    stream = InstanceStream(client, max_backlog=5)
    stream.publish(events(4))
    assert stream.check_backlog() == 4
    stream.publish(events(3, start=4))  # a batch may overshoot by itself: the check comes before it
    with pytest.raises(StreamBacklogFull) as info:
        stream.check_backlog()
    assert (info.value.length, info.value.max_backlog) == (7, 5)
    assert stream.length() == 7  # nothing dropped


def test_entries_deleted_while_pending_are_acked_and_counted(client):
    """An entry trimmed by another writer while pending is resolved, never left pending for ever."""
    dropped = []
    stream = InstanceStream(client, on_dropped=lambda reason, n: dropped.append((reason, n)))
    stream.ensure_group()
    stream.publish(events(6))
    stream.read("dead", count=3)  # dies holding 3 entries
    stream.read("alive", count=1)  # holds 1 and restarts
    client.xtrim(stream.key, maxlen=2, approximate=False)  # e.g. a writer still using MAXLEN
    assert stream.pending_count() == 4
    assert stream.read_own_pending("alive") == []  # its entry is gone: acked, counted
    claimed = stream.claim_stale("alive", min_idle_ms=0)
    assert claimed == [] and stream.pending_count() == 0
    assert stream.deleted_pending == 4 and sum(n for _, n in dropped) == 4
    assert {reason for reason, _ in dropped} == {"deleted_while_pending"}
    assert [e.ins_id for e in stream.read("alive", count=10)] == [1004, 1005]


def test_dead_consumer_entries_claimed_and_sequenced_once(client):
    """At least once + idempotent writes = exactly one sequence entry per instance."""
    stream = InstanceStream(client)
    store = InstanceStore(client, dim=0)
    stream.ensure_group()
    stream.publish(events(6, user="a") + events(4, user="b"))

    crashed = stream.read("worker-1", count=7)  # reads, writes the sequence, dies before XACK
    store.append_to_sequences([(e.user_id, e.ins_id, e.timestamp_ms) for e in crashed])
    assert stream.pending_count() == 7

    assert stream.claim_stale("worker-2", min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.06)
    claimed = stream.claim_stale("worker-2", min_idle_ms=50)
    assert sorted(e.entry_id for e in claimed) == sorted(e.entry_id for e in crashed)
    rest = stream.read("worker-2", count=100)
    for batch in (claimed, rest):
        store.append_to_sequences([(e.user_id, e.ins_id, e.timestamp_ms) for e in batch])
        stream.ack([e.entry_id for e in batch])
    assert stream.pending_count() == 0
    assert store.sequence_length("a") == 6 and store.sequence_length("b") == 4


def test_claim_respects_count_and_restarted_consumer_resumes(client):
    stream = InstanceStream(client)
    stream.ensure_group()
    stream.publish(events(10))
    stream.read("w1", count=10)
    assert len(stream.read_own_pending("w1", count=100)) == 10
    first = stream.claim_stale("w2", min_idle_ms=0, count=4)
    assert len(first) == 4
    assert len(stream.read_own_pending("w2")) == 4 and len(stream.read_own_pending("w1")) == 6


def test_malformed_entry_is_acked_and_counted(client):
    stream = InstanceStream(client)
    stream.ensure_group()
    client.xadd(stream.key, {"user_id": "u", "ins_id": "not-a-number", "timestamp_ms": "1"})
    stream.publish(events(1))
    got = stream.read("c", count=10)
    assert [e.ins_id for e in got] == [1000]
    assert stream.malformed == 1 and stream.pending_count() == 1


def test_own_pending_entries_page_by_id_and_carry_the_features(client):
    """A consumer that keeps entries pending while it works (the trainer, until its checkpoint)
    reads them back page by page after a restart; the encoded features come back as sent."""
    stream = InstanceStream(client)
    stream.ensure_group()
    sent = [InstanceEvent("u", 1000 + i, 10 * i, item_hash=i, features=bytes([i, 0, 255, i])) for i in range(7)]
    stream.publish(sent)
    assert len(stream.read("trainer", count=10)) == 7  # all pending, none acked
    pages, after = [], "0"
    while page := stream.read_own_pending("trainer", count=3, after=after):
        pages.append([e.ins_id for e in page])
        after = page[-1].entry_id
    assert pages == [[1000, 1001, 1002], [1003, 1004, 1005], [1006]]
    again = stream.read_own_pending("trainer", count=10)
    assert [e.features for e in again] == [e.features for e in sent]
    with pytest.raises(InvalidRecord, match="features"):
        stream.publish([InstanceEvent("u", 1, 1, features="not bytes")])
