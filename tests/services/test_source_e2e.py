"""The write path end to end: real source and sequencer processes, a real Redis, the source
model trained on MovieLens-100K. Nothing lost, nothing doubled, bad input rejected whole."""
from __future__ import annotations

import concurrent.futures
import json
import math
import time

import httpx
import pytest

from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.hashing import ins_id
from storage.connection import EmbeddedRedis, connect
from storage.instance_store import InstanceStore
from storage.stream import InstanceStream

pytestmark = pytest.mark.slow
LMAX = 50
N = 10_000


@pytest.fixture(scope="module")
def instances(movielens_models):
    return raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)[:N]


@pytest.fixture
def redis_url(tmp_path):
    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    yield server.url
    server.stop()


def _env(redis_url, model_dir, **extra):
    return {"REDIS_URL": redis_url, "IAT_MODEL_DIR": str(model_dir), "IAT_MAX_SEQUENCE_LENGTH": str(LMAX),
            "IAT_CLAIM_IDLE_MS": "500", "IAT_SEQUENCER_BATCH_SIZE": "100", **extra}


def _post(url, batch):
    response = httpx.post(url + "/v1/instances", json={"instances": batch}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _post_concurrently(url, items, batch=250, threads=8):
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(r["accepted"] for r in pool.map(lambda b: _post(url, b), batches))


def _wait_sequenced(client, timeout_s=120.0):
    stream = InstanceStream(client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stream.lag() == 0 and stream.pending_count() == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"sequencer did not catch up: lag {stream.lag()}, pending {stream.pending_count()}")


def servable_ids(items) -> set[int]:
    """The InsIDs the store keeps records of: each user's newest LMAX (a trimmed member's record
    leaves with it, storage/write_instances.lua)."""
    by_user: dict = {}
    for i in items:
        by_user.setdefault(i["user_id"], set()).add((i["timestamp_ms"], ins_id(i["request_id"], i["item_id"], i["timestamp_ms"])))
    return {ins for entries in by_user.values() for _, ins in sorted(entries)[-LMAX:]}


def _assert_store_holds_exactly(client, items):
    expected_ids = servable_ids(items)
    keys = list(client.scan_iter(match="iat:ins:*", count=5000))
    assert len(keys) == len(expected_ids)
    assert {int(k.rsplit(b":", 1)[1]) for k in keys} == expected_ids
    by_user = {}
    for i in items:
        by_user.setdefault(i["user_id"], []).append((i["timestamp_ms"], ins_id(i["request_id"], i["item_id"], i["timestamp_ms"])))
    store = InstanceStore(client, max_sequence_length=LMAX)
    for user, entries in by_user.items():
        got = [(int(s), int(m)) for m, s in client.zrange(store.sequence_key(user), 0, -1, withscores=True)]
        assert got == sorted(entries)[-LMAX:], user  # time order, trimmed to the newest Lmax


def test_ten_thousand_instances_in_concurrent_batches(movielens_models, instances, redis_url, start_service):
    env = _env(redis_url, movielens_models.model_dir)
    start_service(["serve", "sequencer"], env=env)
    source = start_service(["serve", "source"], env=env)
    assert _post_concurrently(source.base_url, instances) == N
    client = connect(redis_url, cluster=False)
    _wait_sequenced(client)
    _assert_store_holds_exactly(client, instances)
    metrics = httpx.get(source.base_url + "/metrics").text
    assert f'iat_source_instances_total{{outcome="accepted"}} {float(N)}' in metrics


def test_sequencer_killed_midway_loses_and_doubles_nothing(movielens_models, instances, redis_url, start_service):
    env = _env(redis_url, movielens_models.model_dir)
    first = start_service(["serve", "sequencer"], env={**env, "IAT_CONSUMER_NAME": "first"})
    source = start_service(["serve", "source"], env=env)
    client = connect(redis_url, cluster=False)
    stream = InstanceStream(client)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        posting = pool.submit(_post_concurrently, source.base_url, instances)
        deadline = time.monotonic() + 120
        # Progress by keys written (records, mostly): the stream itself is trimmed behind the
        # sequencer, so its length says how far behind it is, not how much was posted.
        while client.dbsize() < N // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.kill(9)
        killed_at = client.dbsize()
        assert posting.result() == N
    assert killed_at < N, "the kill came after all was posted"
    assert stream.lag() + stream.pending_count() > 0
    start_service(["serve", "sequencer"], env={**env, "IAT_CONSUMER_NAME": "second"})
    _wait_sequenced(client)
    _assert_store_holds_exactly(client, instances)


def test_posting_the_same_batch_twice_changes_nothing(movielens_models, instances, redis_url, start_service):
    env = _env(redis_url, movielens_models.model_dir)
    start_service(["serve", "sequencer"], env=env)
    source = start_service(["serve", "source"], env=env)
    client = connect(redis_url, cluster=False)
    batch = instances[:500]

    def snapshot():
        _wait_sequenced(client)
        records = {k: client.get(k) for k in client.scan_iter(match="iat:ins:*", count=5000)}
        sequences = {k: client.zrange(k, 0, -1, withscores=True) for k in client.scan_iter(match="iat:seq:*", count=5000)}
        return records, sequences

    first = _post(source.base_url, batch)
    before = snapshot()
    second = _post(source.base_url, batch)
    assert first == second  # same InsIDs
    after = snapshot()
    assert len(before[0]) == len(servable_ids(batch))
    assert after == before  # byte-identical records, identical sequences
    _assert_store_holds_exactly(client, batch)


VALID = {"request_id": "r1", "user_id": "7", "item_id": "50", "timestamp_ms": 880000000000,
         "features": {"categorical": {"age": "30", "gender": "M", "occupation": "writer", "zip_code": "12345",
                                      "release_year": "1995", "class": "Drama|Comedy"}, "numeric": {}},
         "labels": {"like": 1, "love": 0}}


def _set(path, value):
    def mutate(inst):
        target = inst
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
    return mutate


BAD = [
    (_set(["request_id"], ""), "instances[3].request_id"),
    (_set(["user_id"], ""), "instances[3].user_id"),
    (_set(["item_id"], ""), "instances[3].item_id"),
    (_set(["user_id"], "x" * 600), "instances[3].user_id"),
    (_set(["timestamp_ms"], -1), "instances[3].timestamp_ms"),
    (_set(["timestamp_ms"], 2**62), "instances[3].timestamp_ms"),
    (_set(["timestamp_ms"], "soon"), "instances[3].timestamp_ms"),
    (_set(["labels", "like"], 2), "instances[3].labels"),
    (_set(["labels", "nope"], 1), "instances[3].labels[nope]"),
    (_set(["features", "categorical", "nope"], "x"), "instances[3].features.categorical[nope]"),
    (_set(["features", "categorical", "hour"], "3"), "instances[3].features.categorical[hour]"),
    (_set(["features", "numeric", "age"], math.nan), "instances[3].features.numeric"),
    (_set(["features", "numeric", "age"], math.inf), "instances[3].features.numeric"),
    (_set(["surprise"], 1), "instances[3].surprise"),
]


@pytest.fixture(scope="module")
def bad_input_source(movielens_models, tmp_path_factory, start_module_service):
    server = EmbeddedRedis(directory=tmp_path_factory.mktemp("redis-bad")).start()
    env = _env(server.url, movielens_models.model_dir, IAT_INGEST_MAX_REQUEST="8")
    source = start_module_service(["serve", "source"], env=env)
    yield source, connect(server.url, cluster=False)
    server.stop()


@pytest.mark.parametrize("mutate, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_rejected_whole_naming_the_field(bad_input_source, mutate, field):
    source, client = bad_input_source
    batch = [json.loads(json.dumps({**VALID, "request_id": f"r{i}"})) for i in range(6)]
    mutate(batch[3])  # one bad instance among good ones: the whole batch is refused
    before = client.dbsize()
    response = httpx.post(source.base_url + "/v1/instances", content=json.dumps({"instances": batch}),
                          headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == field and field in body["message"]
    assert client.dbsize() == before == 0  # nothing written, no stream entry either


@pytest.mark.parametrize("batch, field", [([], "instances"), ([VALID] * 9, "instances")])
def test_empty_and_oversized_batches_are_rejected(bad_input_source, batch, field):
    source, client = bad_input_source
    response = httpx.post(source.base_url + "/v1/instances", json={"instances": batch})
    assert response.status_code == 422 and response.json()["field"] == field
    assert client.dbsize() == 0
