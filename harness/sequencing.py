"""Waiting for the sequencer to catch up, over EVERY partition of the instance stream.

With IAT_STREAM_PARTITIONS > 1 the source writes each user's instances to that user's partition
(storage/stream.py); watching partition 0 alone would return while the others still hold work.
The services the harness starts inherit its environment, so ``Settings()`` here names the same
partitions and key prefix as theirs.
"""
from __future__ import annotations

import time

from services.config import Settings
from services.stores import instance_stream
from storage.stream import PartitionedStream


def service_stream(client, settings: Settings | None = None) -> PartitionedStream:
    """The instance stream as the services see it: all its partitions."""
    return instance_stream(client, settings or Settings())


def backlog(stream: PartitionedStream) -> int:
    """Entries not in their sequences yet, summed over partitions: not delivered to the
    sequencers' group, or delivered and not acknowledged (the sequencer's ``/v1/stats`` backlog)."""
    return stream.lag() + stream.pending_count()


def wait_sequenced(stream: PartitionedStream, at_most: int = 0, timeout_s: float | None = None,
                   poll_s: float = 0.05) -> bool:
    """Until the backlog is at most ``at_most`` (True), or ``timeout_s`` passed first (False)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while backlog(stream) > at_most:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True
