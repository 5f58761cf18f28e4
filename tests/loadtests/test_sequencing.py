"""The harness waits for the sequencer over every stream partition, not partition 0 alone."""
from __future__ import annotations

from harness.sequencing import backlog, wait_sequenced
from storage.stream import InstanceEvent, PartitionedStream


def drain(partition) -> int:
    events = partition.read("test", count=1000)
    partition.ack([e.entry_id for e in events])
    return len(events)


def test_wait_sequenced_waits_for_every_partition(redis_client):
    stream = PartitionedStream(redis_client, partitions=3)
    stream.ensure_group()
    users = [f"u{k}" for k in range(40)]
    stream.publish([InstanceEvent(user_id=u, ins_id=k + 1, timestamp_ms=1_000 + k) for k, u in enumerate(users)])
    per_partition = [sum(stream.partition_of(u) == p for u in users) for p in range(3)]
    assert all(per_partition), per_partition  # the test needs work in every partition
    assert backlog(stream) == len(users)

    drain(stream.partitions[0])
    assert stream.partitions[0].lag() == 0 and stream.partitions[0].pending_count() == 0
    assert not wait_sequenced(stream, timeout_s=0.1, poll_s=0.01)  # partitions 1 and 2 still hold work
    assert backlog(stream) == per_partition[1] + per_partition[2]
    assert wait_sequenced(stream, at_most=per_partition[1] + per_partition[2], timeout_s=0.1)

    delivered = stream.partitions[1].read("test", count=1000)  # delivered, not acknowledged: still backlog
    assert backlog(stream) == per_partition[1] + per_partition[2]
    stream.partitions[1].ack([e.entry_id for e in delivered])
    drain(stream.partitions[2])
    assert wait_sequenced(stream, timeout_s=5) and backlog(stream) == 0
