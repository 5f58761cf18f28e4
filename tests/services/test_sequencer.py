"""The sequencer against a real Redis and real processes: nothing lost, nothing doubled."""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from services.sequencer.worker import SequencerWorker
from storage.instance_store import InstanceStore
from storage.stream import InstanceEvent, InstanceStream

LMAX = 50


def _events(n_users: int, per_user: int, seed: int = 0) -> list[InstanceEvent]:
    rng = np.random.default_rng(seed)
    events = []
    for u in range(n_users):
        ts = np.sort(rng.integers(1, 10**12, per_user))
        for j, t in enumerate(ts):
            events.append(InstanceEvent(user_id=f"u{u}", ins_id=u * 100_000 + j, timestamp_ms=int(t), labels={"like": j % 2}))
    rng.shuffle(events)  # arrival order is not time order
    return events


def _expected_sequences(events, lmax):
    by_user = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append((e.timestamp_ms, e.ins_id))
    # newest lmax by (timestamp, ins_id): the store's tie order
    return {u: sorted(v)[-lmax:] for u, v in by_user.items()}


def _assert_sequences(client, events, lmax):
    store = InstanceStore(client, max_sequence_length=lmax)
    for user, expected in _expected_sequences(events, lmax).items():
        got = client.zrange(store.sequence_key(user), 0, -1, withscores=True)
        got = [(int(score), int(member)) for member, score in got]
        assert got == expected, user


def test_worker_appends_in_time_order_and_redelivery_is_idempotent(redis_client):
    stream = InstanceStream(redis_client)
    store = InstanceStore(redis_client, max_sequence_length=LMAX)
    events = _events(20, 80)
    stream.publish(events)
    stream.publish(events[:300])  # the source retried a batch: same instances again
    worker = SequencerWorker(stream, store, "w1", block_ms=10)
    stream.ensure_group()
    while worker.run_once(block=False):
        pass
    _assert_sequences(redis_client, events, LMAX)
    assert stream.pending_count() == 0
    assert worker.stats.appended == len(events) + 300


def test_dead_consumers_entries_are_claimed(redis_client):
    stream = InstanceStream(redis_client)
    store = InstanceStore(redis_client, max_sequence_length=LMAX)
    events = _events(5, 40, seed=1)
    stream.publish(events)
    stream.ensure_group()
    taken = stream.read("dead", count=70)  # delivered to a consumer that then dies, never acked
    assert len(taken) == 70
    worker = SequencerWorker(stream, store, "alive", block_ms=10, claim_idle_ms=0)
    while worker.run_once(block=False):
        pass
    assert worker.stats.redelivered == 70
    assert stream.pending_count() == 0
    _assert_sequences(redis_client, events, LMAX)


@pytest.mark.slow
def test_sequencer_process_killed_midway_loses_nothing(redis_server, redis_client, start_service):
    stream = InstanceStream(redis_client)
    events = _events(200, 100, seed=2)  # 20,000 entries
    stream.ensure_group()
    stream.publish(events)
    env = {"REDIS_URL": redis_server, "IAT_MAX_SEQUENCE_LENGTH": str(LMAX), "IAT_SEQUENCER_BATCH_SIZE": "100",
           "IAT_CONSUMER_NAME": "first", "IAT_CLAIM_IDLE_MS": "200"}
    first = start_service(["serve", "sequencer"], env=env)
    deadline = time.monotonic() + 60
    while stream.pending_count() == 0 and stream.lag() == len(events) and time.monotonic() < deadline:
        time.sleep(0.01)
    first.kill(9)  # SIGKILL: no clean-up, entries left pending with "first-0"
    pending_at_kill, lag_at_kill = stream.pending_count(), stream.lag()
    assert lag_at_kill > 0, "the kill came too late to test anything"
    second = start_service(["serve", "sequencer"], env={**env, "IAT_CONSUMER_NAME": "second"})
    deadline = time.monotonic() + 120
    while (stream.lag() or stream.pending_count()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stream.lag() == 0 and stream.pending_count() == 0
    _assert_sequences(redis_client, events, LMAX)
    stats = httpx.get(second.base_url + "/v1/stats").json()
    # whatever the dead consumer held unacked was taken over, not lost
    assert sum(w["redelivered"] for w in stats["workers"].values()) == pending_at_kill
    assert httpx.get(second.base_url + "/readyz").json()["ready"] is True
    assert "iat_sequencer_appended_total" in httpx.get(second.base_url + "/metrics").text
