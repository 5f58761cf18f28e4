"""The instance store on a real Redis server and a real 3-master cluster.

The central property: for random sequences, request times T and limits L, the fused read returns
exactly the instances with timestamp < T, newest first (ties by InsID descending), at most L,
each with its own record; the two-round-trip and pipelined reads agree; re-delivery leaves one entry.
"""
from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.two_trips import aread_history_two_trips, read_history_two_trips
from storage.connection import connect_async
from redis.crc import key_slot

from storage.instance_store import AsyncInstanceStore, InstanceStore
from storage.records import InstanceRecord

DIM = 4
TASKS = ("like", "love")
_prefixes = itertools.count()


@pytest.fixture(params=["single", "cluster"])
def backend(request):
    """(client, url): each test runs against one server and against the cluster."""
    if request.param == "single":
        return request.getfixturevalue("redis_client"), request.getfixturevalue("redis_server")
    return request.getfixturevalue("cluster_client"), request.getfixturevalue("redis_cluster")


def record(user: str, ins_id: int, ts: int, version: str = "src-1") -> InstanceRecord:
    # The embedding and side info are functions of the instance, so a mix-up shows.
    return InstanceRecord(
        ins_id=ins_id, user_id=user, timestamp_ms=ts,
        embedding=np.array([ts, ins_id % 1009, (ins_id >> 32) % 1013, 1.5], np.float32),
        labels={"like": ins_id % 2} if ins_id % 3 else {"like": 1, "love": ins_id % 2},
        item_hash=(ins_id * 7) % 2**63, source_version=version,
    )


def expected_order(instances, before, limit):
    kept = [(ts, i) for i, ts in instances if ts < before]
    kept.sort(reverse=True)
    return [(i, ts) for ts, i in kept[:limit]]


def check_history(history, instances, before, limit, user):
    want = expected_order(instances, before, limit)
    assert [(int(i), int(t)) for i, t in zip(history.ins_ids, history.timestamps_ms)] == want
    assert history.ins_ids.dtype == np.uint64 and history.timestamps_ms.dtype == np.int64
    assert history.embeddings.dtype == np.float32 and history.embeddings.shape == (len(want), DIM)
    assert history.labels.shape == (len(want), len(TASKS)) and history.labels.dtype == np.int8
    for row, (ins_id, ts) in enumerate(want):
        rec = record(user, ins_id, ts)
        np.testing.assert_array_equal(history.embeddings[row], rec.embedding)
        assert history.labels[row, 0] == rec.labels["like"]
        assert history.labels[row, 1] == rec.labels.get("love", -1)
        assert history.item_hashes[row] == rec.item_hash
    assert history.missing == 0 and history.version_mismatch == 0


user_ids = st.text(min_size=1, max_size=8)  # braces and non-ASCII included: the tag still holds
instance_lists = st.lists(
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 60)), unique_by=lambda t: t[0], max_size=40
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=user_ids, instances=instance_lists, before=st.integers(0, 70), limit=st.integers(0, 45),
       redelivered=st.integers(0, 40))
@example(user="}", instances=[(1, 5), (2, 6)], before=70, limit=45, redelivered=2)  # empty tag (CI found it)
def test_fused_read_property(backend, user, instances, before, limit, redelivered):
    client, _ = backend
    store = InstanceStore(client, prefix=f"p{next(_prefixes)}", dim=DIM, tasks=TASKS, max_sequence_length=1000)
    records = [record(user, i, ts) for i, ts in instances]
    store.write_records(records)
    store.append_to_sequences([(user, i, ts) for i, ts in instances])
    again = records[:redelivered]  # at-least-once delivery: the same instances again
    store.write_and_append(again)
    assert store.sequence_length(user) == len(instances)

    check_history(store.read_history(user, before, limit), instances, before, limit, user)
    check_history(read_history_two_trips(store, user, before, limit), instances, before, limit, user)
    other = user + "x"
    [mine, nobody] = store.read_histories([user, other], [before, before], limit)
    check_history(mine, instances, before, limit, user)
    assert len(nobody) == 0 and nobody.embeddings.shape == (0, DIM)


@pytest.mark.parametrize("user", ["}", "}x", "{}", "a}b", "{", "\x00}", "\x00", "u"])
def test_a_users_keys_share_one_slot_whatever_braces_the_id_holds(user):
    """Redis ignores an empty tag ("{}...") and hashes the whole key; the store's tag is never empty."""
    store = InstanceStore(None, prefix="iat", dim=DIM, tasks=TASKS)
    slots = {key_slot(store.sequence_key(user).encode()), key_slot(store.record_key(user, 1).encode()),
             key_slot(store.record_key(user, 2**64 - 1).encode())}
    assert len(slots) == 1
    others = {"}", "}x", "{}", "a}b", "{", "\x00}", "\x00", "u", "\x00\x00}"} - {user}
    assert store.sequence_key(user) not in {store.sequence_key(o) for o in others}  # one-to-one


def test_strictly_before_excludes_the_request_instance(backend):
    client, _ = backend
    store = InstanceStore(client, dim=DIM, tasks=TASKS)
    store.write_and_append([record("u", 1, 100), record("u", 2, 200), record("u", 3, 300)])
    assert list(store.read_history("u", 200, 10).ins_ids) == [1]
    assert list(store.read_history("u", 201, 10).ins_ids) == [2, 1]
    assert list(store.read_history("u", 10_000, 2).ins_ids) == [3, 2]


def test_trimmed_to_lmax_newest(backend):
    client, _ = backend
    store = InstanceStore(client, dim=DIM, tasks=TASKS, max_sequence_length=10)
    store.write_and_append([record("u", i, 1000 + i) for i in range(50)])
    store.append_to_sequences([("u", 7, 1007)])  # an old one re-delivered is trimmed again
    assert store.sequence_length("u") == 10
    assert list(store.read_history("u", 10**6, 100).ins_ids) == list(range(49, 39, -1))


def test_ttl_set_and_expired_records_counted_missing(backend):
    client, _ = backend
    store = InstanceStore(client, dim=DIM, tasks=TASKS, retention_days=30)
    store.write_and_append([record("u", i, i) for i in range(5)])
    ttl_ms = client.pttl(store.record_key("u", 3))
    assert 29 * 86_400_000 < ttl_ms <= 30 * 86_400_000
    assert 29 * 86_400_000 < client.pttl(store.sequence_key("u")) <= 30 * 86_400_000
    short = InstanceStore(client, prefix="short", dim=DIM, tasks=TASKS, retention_days=0.3 / 86_400)
    short.write_records([record("u", i, i) for i in range(3)])
    store_seq_only = InstanceStore(client, prefix="short", dim=DIM, tasks=TASKS, retention_days=None)
    store_seq_only.append_to_sequences([("u", i, i) for i in range(3)])
    time.sleep(0.45)  # records expire, the sequence (no TTL here) keeps their ids
    # The two-trip baseline only reads; the fused read also removes the dangling members.
    for read in (lambda *a: read_history_two_trips(short, *a), short.read_history):
        history = read("u", 100, 10)
        assert len(history) == 0 and history.missing == 3
    assert short.sequence_length("u") == 0 and short.read_history("u", 100, 10).missing == 0
    client.delete(store.record_key("u", 2))
    history = store.read_history("u", 100, 10)
    assert list(history.ins_ids) == [4, 3, 1, 0] and history.missing == 1


def test_source_version_filter(backend):
    client, _ = backend
    writer = InstanceStore(client, dim=DIM, tasks=TASKS)
    writer.write_and_append([record("u", 1, 10, "v1"), record("u", 2, 20, "v2"), record("u", 3, 30, "v1")])
    reader = InstanceStore(client, dim=DIM, tasks=TASKS, source_version="v1")
    history = reader.read_history("u", 100, 10)
    assert list(history.ins_ids) == [3, 1] and history.version_mismatch == 1
    assert reader.read_history("u", 100, 10, expected_source_version="v2").ins_ids.tolist() == [2]
    assert len(writer.read_history("u", 100, 10)) == 3  # no expectation: everything, versions reported
    assert len(set(writer.read_history("u", 100, 10).source_versions.tolist())) == 2


def test_codec_change_mid_rollout_decodes_both(backend):
    client, _ = backend
    int8 = InstanceStore(client, dim=DIM, codec="int8", tasks=TASKS)
    fp16 = InstanceStore(client, dim=DIM, codec="fp16", tasks=TASKS)
    fp32 = InstanceStore(client, dim=DIM, codec="fp32", tasks=TASKS)
    int8.write_and_append([record("u", 1, 10)])
    fp16.write_and_append([record("u", 2, 20)])
    history = fp32.read_history("u", 100, 10)
    assert list(history.ins_ids) == [2, 1]
    np.testing.assert_allclose(history.embeddings[0], record("u", 2, 20).embedding, rtol=2**-11)
    np.testing.assert_allclose(history.embeddings[1], record("u", 1, 10).embedding, atol=10 / 254 + 1e-6)
    other_dim = InstanceStore(client, dim=DIM + 1, tasks=TASKS)
    assert len(other_dim.read_history("u", 100, 10)) == 0
    assert other_dim.read_history("u", 100, 10).incompatible == 2


def test_script_reloaded_after_flush(backend):
    client, _ = backend
    store = InstanceStore(client, dim=DIM, tasks=TASKS)
    store.write_and_append([record("u", 1, 10)])
    assert len(store.read_history("u", 100, 10)) == 1
    client.script_flush()
    assert len(store.read_history("u", 100, 10)) == 1
    client.script_flush()
    assert [len(h) for h in store.read_histories(["u", "v"], [100, 100], 10)] == [1, 0]


def test_codes_round_trip(backend):
    client, _ = backend
    store = InstanceStore(client, dim=0, code_length=6, code_dtype=np.uint16, tasks=())
    codes = [np.array([i, 65535, 0, 1, 2, i * 3], np.uint16) for i in range(3)]
    store.write_and_append([InstanceRecord(i, "u", 100 + i, codes=codes[i]) for i in range(3)])
    history = store.read_history("u", 1000, 10)
    assert history.codes.dtype == np.uint16
    np.testing.assert_array_equal(history.codes, np.stack(codes[::-1]))
    assert history.embeddings.shape == (3, 0)


def test_async_store_matches_sync(backend):
    client, url = backend
    sync = InstanceStore(client, dim=DIM, tasks=TASKS)
    instances = [(i, (i * 37) % 50) for i in range(1, 40)]
    sync.write_and_append([record("u", i, ts) for i, ts in instances])

    async def main():
        async_client = await connect_async(url)
        try:
            store = AsyncInstanceStore(async_client, dim=DIM, tasks=TASKS)
            one = await store.read_history("u", 30, 12)
            two = await aread_history_two_trips(store, "u", 30, 12)
            many = await store.read_histories(["u", "nobody"], [30, 30], 12)
            return one, two, many
        finally:
            await async_client.aclose()

    one, two, many = asyncio.run(main())
    for history in (one, two, many[0]):
        check_history(history, instances, 30, 12, "u")
    assert len(many[1]) == 0


def test_users_spread_over_shards(cluster_client):
    store = InstanceStore(cluster_client, dim=DIM, tasks=TASKS)
    users = [f"user-{n}" for n in range(30)]
    store.write_and_append([record(u, n + 1, 5) for n, u in enumerate(users)])
    per_node = [cluster_client.dbsize(target_nodes=node) for node in cluster_client.get_primaries()]
    assert sum(1 for size in per_node if size) == 3  # every master holds some users
    histories = store.read_histories(users, [10] * len(users), 5)
    assert [h.ins_ids.tolist() for h in histories] == [[n + 1] for n in range(30)]
