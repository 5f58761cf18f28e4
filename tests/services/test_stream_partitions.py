"""The instance stream's partitions by user on one real Redis: the key of earlier releases kept
(an upgrade), each user in one partition in order, per-partition backpressure, settings checked.
The real processes (the cluster, SIGKILL) are in tests/reliability/test_stream_partitions.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.config import Settings
from services.sequencer.main import Sequencer
from storage.stream import PartitionedStream, StreamBacklogFull, partition_of
from tests.services.test_sequencer import LMAX, _assert_sequences, _events

OLD_KEY = "iat:stream:{instances}"  # the one stream key of every release before partitions


def _old_entry(event) -> dict[str, str]:
    """An entry as a source of an earlier release XADDed it."""
    fields = {"user_id": event.user_id, "ins_id": str(event.ins_id), "timestamp_ms": str(event.timestamp_ms),
              "item_hash": str(event.item_hash)}
    fields.update({f"label:{task}": str(value) for task, value in event.labels.items()})
    return fields


def _drain(sequencer: Sequencer) -> None:
    while sum(worker.run_once(block=False) for worker in sequencer.workers):
        pass


@pytest.mark.parametrize("partitions", [1, 4])
def test_an_upgraded_sequencer_takes_up_the_stream_of_an_earlier_release(redis_client, partitions):
    """A store written by an earlier release: entries on the old key, some of them pending with
    the old sequencer's consumer. One partition is that very stream; growing to N keeps it as
    partition 0, so nothing written before the upgrade is lost."""
    events = _events(12, 20, seed=4)
    old, new = events[:150], events[150:]
    for event in old:
        redis_client.xadd(OLD_KEY, _old_entry(event))
    redis_client.xgroup_create(OLD_KEY, "sequencer", id="0")
    taken = redis_client.xreadgroup("sequencer", "seq-0", {OLD_KEY: ">"}, count=40)  # then it stopped
    assert len(taken[0][1]) == 40

    settings = Settings(stream_partitions=partitions, consumer_name="seq", max_sequence_length=LMAX)
    sequencer = Sequencer(settings, client=redis_client)
    assert sequencer.stream.partitions[0].key == OLD_KEY
    assert len({part.key for part in sequencer.stream.partitions}) == partitions
    sequencer.stream.publish(new)
    if partitions == 1:  # the new release writes where the old one did
        assert redis_client.xlen(OLD_KEY) == len(events)
    _drain(sequencer)
    _assert_sequences(redis_client, events, LMAX)
    assert sequencer.stream.pending_count() == 0 and sequencer.stream.lag() == 0
    # the same consumer name on the old key: its 40 pending entries were resumed, not waited out
    assert sequencer.workers[0].consumer == "seq-0"
    assert sum(w.stats.redelivered for w in sequencer.workers) == 40


def test_each_user_goes_to_one_partition_in_the_order_published(redis_client):
    stream = PartitionedStream(redis_client, partitions=4)
    events = _events(40, 10, seed=5)
    stream.publish(events)
    seen: dict[str, list[int]] = {}
    for p, part in enumerate(stream.partitions):
        for _, fields in redis_client.xrange(part.key):
            user = fields[b"user_id"].decode()
            assert partition_of(user, 4) == p, user
            seen.setdefault(user, []).append(int(fields[b"ins_id"]))
    assert sum(map(len, seen.values())) == len(events)
    for user, ids in seen.items():
        assert ids == [e.ins_id for e in events if e.user_id == user]  # the user's order kept
    assert len(seen) == 40 and len({partition_of(u, 4) for u in seen}) == 4
    # A stable hash: another interpreter, with another hash seed, puts the users where this one did.
    code = "import sys; from storage.stream import partition_of; print([partition_of(u, 4) for u in sys.argv[1:]])"
    users = sorted(seen)
    out = subprocess.run([sys.executable, "-c", code, *users], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == str([partition_of(u, 4) for u in users])


def test_a_full_partition_refuses_only_the_batches_that_touch_it(redis_client):
    stream = PartitionedStream(redis_client, partitions=2, max_backlog=5)
    users = [f"u{i}" for i in range(20)]
    full = next(u for u in users if partition_of(u, 2) == 1)
    other = next(u for u in users if partition_of(u, 2) == 0)
    burst = _events(1, 5)
    for event in burst:
        event.user_id = full
    stream.publish(burst)
    with pytest.raises(StreamBacklogFull, match="partition 1 .* 5 entries, its bound is 5"):
        stream.check_backlog([other, full])
    assert stream.check_backlog([other]) == {0: 0}


def test_bad_partition_settings_name_the_field():
    with pytest.raises(ValidationError, match="IAT_SEQUENCER_PARTITIONS: partitions \\[4\\] do not exist"):
        Settings(stream_partitions=4, sequencer_partitions="1,4")
    with pytest.raises(ValidationError, match="IAT_SEQUENCER_PARTITIONS: expected"):
        Settings(stream_partitions=4, sequencer_partitions="half")
    with pytest.raises(ValidationError, match="stream_partitions"):
        Settings(stream_partitions=0)
    with pytest.raises(ValueError, match="partitions: must be an int >= 1"):
        PartitionedStream(None, partitions=0)
    assert Settings(stream_partitions=6, sequencer_partitions="1/3").owned_partitions == [1, 4]
    assert Settings(stream_partitions=3).owned_partitions == [0, 1, 2]
