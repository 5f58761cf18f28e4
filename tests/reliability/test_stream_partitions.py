"""The instance stream partitioned by user, against real processes (issue 17, "scale out"):

- on the 3-master cluster, 6 partitions land on more than one shard, and a source with two
  sequencer processes that own half the partitions each deliver every instance exactly once;
- a sequencer SIGKILLed and restarted on its partitions loses nothing and doubles nothing.
"""
from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.hashing import ins_id
from storage.connection import EmbeddedRedis, connect
from storage.instance_store import InstanceStore
from storage.stream import PartitionedStream, partition_of
from tests.services.test_sequencer import LMAX, _assert_sequences, _events

pytestmark = pytest.mark.slow


def _wait_drained(stream: PartitionedStream, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stream.lag() == 0 and stream.pending_count() == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"not drained within {timeout_s}s: lag {stream.lag()}, pending {stream.pending_count()}")


def _consumers(client, stream: PartitionedStream, partition: int) -> set[str]:
    """Names of the consumers that ever read a partition (its group's consumer list)."""
    part = stream.partitions[partition]
    return {c["name"] if isinstance(c["name"], str) else c["name"].decode()
            for c in client.xinfo_consumers(part.key, part.group)}


def _appended_by_partition(stats: dict) -> dict[int, int]:
    """Entries each partition's workers appended, from a sequencer's /v1/stats (consumer names:
    "<base>-<i>" reads partition 0, "<base>-p<p>-<i>" partition p)."""
    out: dict[int, int] = {}
    for consumer, counters in stats["workers"].items():
        middle = consumer.split("-")[-2]
        partition = int(middle[1:]) if middle.startswith("p") and middle[1:].isdigit() else 0
        out[partition] = out.get(partition, 0) + counters["appended"]
    return out


def _few_per_user(instances: list[dict], per_user: int, total: int) -> list[dict]:
    """Many users with a few instances each, so that every partition gets some."""
    taken: dict[str, int] = {}
    out = []
    for inst in instances:
        if taken.get(inst["user_id"], 0) < per_user:
            taken[inst["user_id"]] = taken.get(inst["user_id"], 0) + 1
            out.append(inst)
    return out[:total]


def test_partitions_spread_over_the_cluster_and_two_sequencers_deliver_each_instance_once(
        movielens_models, redis_cluster, cluster_client, start_service):
    partitions = 6
    instances = _few_per_user(raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)[:5000],
                              per_user=25, total=800)
    stream = PartitionedStream(cluster_client, partitions=partitions)
    shards = {cluster_client.get_node_from_key(part.key).name for part in stream.partitions}
    assert len(shards) > 1, "every partition on one shard: the hash tags do not spread them"

    env = {"REDIS_URL": redis_cluster, "IAT_MODEL_DIR": str(movielens_models.model_dir),
           "IAT_STREAM_PARTITIONS": str(partitions), "IAT_MAX_SEQUENCE_LENGTH": "100000",
           "IAT_SEQUENCER_BATCH_SIZE": "100", "IAT_STREAM_TRIM_INTERVAL_S": "0.2"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three start-ups at once
        starting = [pool.submit(start_service, ["serve", "sequencer"], env={
            **env, "IAT_SEQUENCER_PARTITIONS": f"{k}/2", "IAT_CONSUMER_NAME": f"half{k}"}) for k in (0, 1)]
        starting.append(pool.submit(start_service, ["serve", "source"], env=env))
        *sequencers, source = [f.result() for f in starting]
    for start in range(0, len(instances), 200):
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": instances[start:start + 200]},
                              timeout=120)
        assert response.status_code == 200, response.text
    _wait_drained(stream)

    expected: dict[int, int] = {}
    for inst in instances:
        p = partition_of(inst["user_id"], partitions)
        expected[p] = expected.get(p, 0) + 1
    assert len(expected) == partitions  # the batch touched every partition
    appended: dict[int, int] = {}
    for k, seq in enumerate(sequencers):
        stats = httpx.get(seq.base_url + "/v1/stats", timeout=10).json()
        assert sorted(int(p) for p in stats["partitions"]) == [p for p in range(partitions) if p % 2 == k]
        mine = _appended_by_partition(stats)
        assert set(mine) <= set(range(k, partitions, 2)), (k, mine)
        appended.update(mine)
        for p in range(k, partitions, 2):  # nobody else read this process's partitions
            assert all(name.startswith(f"half{k}-") for name in _consumers(cluster_client, stream, p))
    # each stream entry delivered and sequenced once, by its partition's owner
    assert appended == expected

    # ... and the store holds each instance once: its record, and one member of its user's sequence
    store = InstanceStore(cluster_client, max_sequence_length=100_000)
    by_user: dict[str, set[int]] = {}
    for inst in instances:
        by_user.setdefault(inst["user_id"], set()).add(ins_id(inst["request_id"], inst["item_id"], inst["timestamp_ms"]))
    members = 0
    for user, ids in by_user.items():
        got = [int(m) for m in cluster_client.zrange(store.sequence_key(user), 0, -1)]
        assert sorted(got) == sorted(ids), user
        members += len(got)
    records = sum(1 for node in cluster_client.get_primaries()
                  for _ in cluster_client.get_redis_connection(node).scan_iter(match="iat:ins:*", count=5000))
    assert members == records == len({i for ids in by_user.values() for i in ids})


def test_sequencer_killed_and_restarted_on_its_partitions_loses_nothing(redis_server, redis_client, start_service):
    partitions = 4
    stream = PartitionedStream(redis_client, partitions=partitions)
    events = _events(100, 100, seed=7)  # 10,000 entries over 100 users
    stream.ensure_group()
    stream.publish(events[: len(events) // 2])
    env = {"REDIS_URL": redis_server, "IAT_STREAM_PARTITIONS": str(partitions),
           "IAT_MAX_SEQUENCE_LENGTH": str(LMAX), "IAT_SEQUENCER_BATCH_SIZE": "50"}
    mine = [stream.partitions[p] for p in (0, 2)]
    first = start_service(["serve", "sequencer"], env={**env, "IAT_SEQUENCER_PARTITIONS": "0/2",
                                                        "IAT_CONSUMER_NAME": "even"})
    untouched = sum(p.length() for p in mine)
    deadline = time.monotonic() + 120
    while sum(p.lag() for p in mine) == untouched and time.monotonic() < deadline:
        time.sleep(0.01)
    # Frozen mid-work, then the second half published: at the kill the process has read part of
    # the stream (some of it maybe still pending) and has not read the rest, however fast it was.
    first.proc.send_signal(signal.SIGSTOP)
    stream.publish(events[len(events) // 2:])
    first.kill(9)  # SIGKILL: what it read and did not ack stays pending with its consumers
    pending_at_kill = sum(p.pending_count() for p in mine)
    assert sum(p.lag() for p in mine) > 0, "the kill came too late to test anything"

    other = start_service(["serve", "sequencer"], env={**env, "IAT_SEQUENCER_PARTITIONS": "1/2",
                                                        "IAT_CONSUMER_NAME": "odd"})
    again = start_service(["serve", "sequencer"], env={**env, "IAT_SEQUENCER_PARTITIONS": "0/2",
                                                        "IAT_CONSUMER_NAME": "even"})
    _wait_drained(stream)
    _assert_sequences(redis_client, events, LMAX)  # every instance, each once, in time order
    stats = httpx.get(again.base_url + "/v1/stats", timeout=10).json()
    # the restarted process took up exactly what it had left pending (its own pending list first)
    assert sum(w["redelivered"] for w in stats["workers"].values()) == pending_at_kill
    assert sorted(stats["partitions"]) == ["0", "2"] and stats["backlog"] == 0
    odd = httpx.get(other.base_url + "/v1/stats", timeout=10).json()
    assert sum(w["redelivered"] for w in odd["workers"].values()) == 0
    for p in range(partitions):
        owner = "even" if p % 2 == 0 else "odd"
        assert all(name.startswith(owner + "-") for name in _consumers(redis_client, stream, p)), p


def test_ingest_on_one_server_writes_every_partition_or_none(movielens_models, tmp_path, start_service):
    """One MULTI/EXEC holds the records' scripts and the XADDs to every partition a batch
    touches: a store failure (OOM here) leaves none of them; the retry writes each partition."""
    partitions = 4
    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    client = connect(server.url, cluster=False)
    try:
        source = start_service(["serve", "source"], env={
            "REDIS_URL": server.url, "IAT_MODEL_DIR": str(movielens_models.model_dir),
            "IAT_STREAM_PARTITIONS": str(partitions)})
        batch = _few_per_user(raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)[:5000],
                              per_user=5, total=200)
        stream = PartitionedStream(client, partitions=partitions)
        touched = {partition_of(i["user_id"], partitions) for i in batch}
        assert touched == set(range(partitions))
        records = lambda: sum(1 for _ in client.scan_iter(match="iat:ins:*", count=5000))

        client.config_set("maxmemory-policy", "noeviction")
        # Room for a part of the batch only: written outside one transaction, the first
        # partitions' entries and records would fit and the rest be refused.
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 32 * 1024)
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": batch}, timeout=120)
        assert response.status_code == 503, response.text
        assert stream.lengths() == {p: 0 for p in range(partitions)} and records() == 0

        client.config_set("maxmemory", 0)
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": batch}, timeout=120)
        assert response.status_code == 200, response.text
        expected = {p: sum(1 for i in batch if partition_of(i["user_id"], partitions) == p) for p in range(partitions)}
        assert stream.lengths() == expected and records() == len(batch)
    finally:
        client.close()
        server.stop()
