"""The instance stream, the sequencer and ingest under store faults, against real processes: a real
redis-server made to answer OOM (``maxmemory`` + ``noeviction``), real `iat serve sequencer` and
`iat serve source` processes (issue 14, items 1, 2 and 6).

- Workers survive any store error and carry on once it clears; `/healthz` fails while a worker is
  stalled or dead, `/readyz` stays about the store.
- Nothing leaves the stream before the consumer group acknowledged it; a full backlog answers 503
  + Retry-After; an entry deleted while pending is counted and resolved, never pending for ever.
- A store failure during ingest answers JSON 503 and leaves no record without its stream entry;
  the client's retry then puts every accepted instance in its sequence exactly once.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.hashing import ins_id
from services.config import Settings
from services.sequencer.main import Sequencer
from storage.connection import EmbeddedRedis, connect
from storage.stream import InstanceStream
from tests.reliability.test_faults import _post_with_retries
from tests.services.test_sequencer import LMAX, _assert_sequences, _events
from tests.services.test_source_e2e import (
    _assert_store_holds_exactly,
    _env,
    _post,
    _wait_sequenced,
    servable_ids,
)

pytestmark = pytest.mark.slow
RAW = "iat:raw-instances"
STALL_S = 2  # IAT_WORKER_STALL_S in these tests: a stall shows within seconds


@pytest.fixture
def own_redis(tmp_path):
    """A server of this test alone: the tests change its maxmemory."""
    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    client = connect(server.url, cluster=False)
    yield server, client
    client.close()
    server.stop()


@pytest.fixture(scope="module")
def instances(movielens_models):
    return raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)[:1000]


def _entry(event) -> dict[str, str]:
    """The stream fields of an InstanceEvent (storage/stream.py's format), for raw XADDs."""
    fields = {"user_id": event.user_id, "ins_id": str(event.ins_id), "timestamp_ms": str(event.timestamp_ms),
              "item_hash": str(event.item_hash)}
    fields.update({f"label:{task}": str(value) for task, value in event.labels.items()})
    return fields


def _queue_oom(pipe) -> None:
    """Every write that may grow memory is refused from now on (reads, XACK, XTRIM still work)."""
    pipe.config_set("maxmemory-policy", "noeviction")
    pipe.config_set("maxmemory", 1)


def _wait_for(what: str, predicate, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"not seen within {timeout_s}s: {what}")


def _healthz(service, status: int):
    """The /healthz body once it answers ``status`` (else None)."""
    response = httpx.get(service.base_url + "/healthz", timeout=10)
    return response.json() if response.status_code == status else None


def _metric(service, name: str, labels: str) -> float:
    text = httpx.get(service.base_url + "/metrics", timeout=10).text
    match = re.search(re.escape(name) + r"\{" + re.escape(labels) + r"\} ([0-9.e+]+)", text)
    return float(match.group(1)) if match else 0.0


# ---- item 1: workers survive any store error; /healthz tells dead or stalled ones ---------------

def test_sequencer_survives_oom_and_healthz_reports_the_stall(own_redis, start_service):
    server, client = own_redis
    stream = InstanceStream(client)
    stream.ensure_group()
    seq = start_service(["serve", "sequencer"], env={
        "REDIS_URL": server.url, "IAT_MAX_SEQUENCE_LENGTH": str(LMAX), "IAT_SEQUENCER_BATCH_SIZE": "50",
        "IAT_WORKER_STALL_S": str(STALL_S)})
    warm = _events(10, 5, seed=1)
    for event in warm:  # plain XADDs, as any producer's
        client.xadd(stream.key, _entry(event))
    _wait_sequenced(client)

    # The burst and the OOM in one transaction: the sequencer is served the burst only after
    # EXEC, so its first sequence write for it is refused (ZADD is a memory-growing command).
    burst = _events(20, 30, seed=2)
    for e in burst:
        e.ins_id += 10_000_000  # distinct from the warm-up's
    pipe = client.pipeline(transaction=True)
    for event in burst:
        pipe.xadd(stream.key, _entry(event))
    _queue_oom(pipe)
    pipe.execute()

    body = _wait_for("/healthz 503 while the sequencer cannot write", lambda: _healthz(seq, 503))
    # OOM reaches the worker as OutOfMemoryError, or wrapped in a script error (the sequence write is a script)
    assert body["status"] == "failing" and "stalled" in body["message"] and "OOM" in body["message"].replace("OutOfMemory", "OOM")
    assert httpx.get(seq.base_url + "/readyz", timeout=10).status_code == 200  # the store answers PING
    assert (_metric(seq, "iat_worker_errors_total", 'error="OutOfMemoryError",worker="sequencer"')
            + _metric(seq, "iat_worker_errors_total", 'error="ResponseError",worker="sequencer"')) >= 1
    stats = httpx.get(seq.base_url + "/v1/stats", timeout=10).json()
    assert stats["pending"] + stats["undelivered"] == stats["backlog"] == len(burst)  # nothing lost from view

    client.config_set("maxmemory", 0)  # the fault clears: the same process carries on
    _wait_sequenced(client)
    _assert_sequences(client, warm + burst, LMAX)
    _wait_for("/healthz 200 again", lambda: _healthz(seq, 200))
    # acknowledged entries leave the stream (trimmed behind the group), nothing else did
    _wait_for("stream trimmed", lambda: stream.length() == 0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_healthz_fails_when_a_worker_thread_dies(redis_client):
    sequencer = Sequencer(Settings(worker_stall_s=60), client=redis_client)
    stream = sequencer.stream
    stream.ensure_group()
    sequencer.start()
    try:
        with TestClient(sequencer.app()) as http:
            assert http.get("/healthz").status_code == 200

            def crash(entries):
                # A BaseException (as sys.exit deep in a library would raise) is the one thing a
                # supervised loop does not catch: the thread ends, as a crashed one would.
                raise SystemExit("simulated crash of the worker thread")

            sequencer.store.append_to_sequences = crash
            redis_client.xadd(stream.key, _entry(_events(1, 1)[0]))
            _wait_for("the worker thread ended", lambda: not any(
                t.is_alive() for t in sequencer.threads if t.name == sequencer.workers[0].consumer), 30)
            response = http.get("/healthz")
            assert response.status_code == 503
            body = response.json()
            assert "dead" in body["message"] and sequencer.workers[0].consumer in body["message"]
            assert http.get("/readyz").status_code == 200  # readiness is about the store
    finally:
        sequencer.shutdown()


def test_raw_stream_consumer_survives_oom(movielens_models, instances, own_redis, start_service):
    server, client = own_redis

    raws = instances[:200]
    for inst in raws[:100]:
        client.xadd(RAW, {"instance": json.dumps(inst)})
    source = start_service(["serve", "source"], env=_env(
        server.url, movielens_models.model_dir, IAT_RAW_STREAM=RAW, IAT_WORKER_STALL_S=str(STALL_S)))
    records = lambda: sum(1 for _ in client.scan_iter(match="iat:ins:*", count=5000))
    _wait_for("the first 100 ingested", lambda: records() == len(servable_ids(raws[:100])))

    pipe = client.pipeline(transaction=True)  # the next raw entries and the OOM at once
    for inst in raws[100:]:
        pipe.xadd(RAW, {"instance": json.dumps(inst)})
    _queue_oom(pipe)
    pipe.execute()
    body = _wait_for("/healthz 503 while the consumer cannot write", lambda: _healthz(source, 503))
    assert "raw-stream" in body["message"] and "OutOfMemoryError" in body["message"]
    assert records() == len(servable_ids(raws[:100]))

    client.config_set("maxmemory", 0)
    _wait_for("the rest ingested", lambda: records() == len(servable_ids(raws)) and client.xpending(RAW, "source")["pending"] == 0)
    _wait_for("/healthz 200 again", lambda: _healthz(source, 200))
    start_service(["serve", "sequencer"], env=_env(server.url, movielens_models.model_dir))
    _wait_sequenced(client)
    _assert_store_holds_exactly(client, raws)


# ---- item 2: no silent loss on the stream -------------------------------------------------------

def test_sequencer_resolves_entries_deleted_while_pending_and_trims_behind_the_group(own_redis, start_service):
    server, client = own_redis
    stream = InstanceStream(client)
    stream.ensure_group()
    events = _events(10, 20, seed=3)
    for event in events:
        client.xadd(stream.key, _entry(event))
    stream.read("dead", count=50)  # a consumer takes 50 entries and dies
    # Another writer trims by count (as XADD MAXLEN did): the 50 pending entries are deleted.
    client.xtrim(stream.key, maxlen=len(events) - 50, approximate=False)
    seq = start_service(["serve", "sequencer"], env={
        "REDIS_URL": server.url, "IAT_MAX_SEQUENCE_LENGTH": str(LMAX), "IAT_CLAIM_IDLE_MS": "0"})
    _wait_sequenced(client, timeout_s=60)  # nothing pending for ever
    assert _metric(seq, "iat_stream_dropped_total", 'reason="deleted_while_pending"') == 50
    stats = httpx.get(seq.base_url + "/v1/stats", timeout=10).json()
    assert stats["dropped"]["deleted_while_pending"] == 50 and stats["pending"] == 0
    _assert_sequences(client, events[50:], LMAX)  # the rest, each once
    _wait_for("stream trimmed", lambda: stream.length() == 0)
    assert httpx.get(seq.base_url + "/v1/stats", timeout=10).json()["stream_length"] == 0


def test_full_backlog_answers_503_and_every_accepted_instance_is_sequenced(
        movielens_models, instances, own_redis, start_service):
    server, client = own_redis
    bound = 300
    env = _env(server.url, movielens_models.model_dir, IAT_STREAM_MAX_BACKLOG=str(bound))
    source = start_service(["serve", "source"], env=env)
    batches = [instances[i:i + 100] for i in range(0, len(instances), 100)]
    accepted, refused = [], []
    for batch in batches:  # the sequencer is not running: nothing drains the stream
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": batch}, timeout=120)
        if response.status_code == 200:
            accepted.extend(batch)
            continue
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 0
        body = response.json()
        assert set(body) >= {"error", "field", "message"} and body["error"] == "UNAVAILABLE"
        assert str(bound) in body["message"]
        refused.append(batch)
    assert len(accepted) == bound and len(refused) == len(batches) - bound // 100
    stream = InstanceStream(client)
    assert stream.length() == bound  # every accepted instance has its entry; no more
    assert sum(1 for _ in client.scan_iter(match="iat:ins:*", count=5000)) == len(servable_ids(accepted))  # refused: nothing written
    assert _metric(source, "iat_source_instances_total", 'outcome="backpressure"') == len(instances) - bound

    seq = start_service(["serve", "sequencer"], env=env)
    _wait_sequenced(client)
    _assert_store_holds_exactly(client, accepted)
    _wait_for("stream trimmed behind the group", lambda: stream.length() == 0)
    stats = httpx.get(seq.base_url + "/v1/stats", timeout=10).json()
    assert (stats["backlog"], stats["pending"], stats["max_backlog"]) == (0, 0, bound)

    for batch in refused:  # the client retries what was refused
        _post_with_retries(source.base_url, batch)
    _wait_sequenced(client)
    _assert_store_holds_exactly(client, instances)


# ---- item 6: ingest under store errors ----------------------------------------------------------

def test_ingest_under_oom_answers_json_503_and_writes_all_or_nothing(
        movielens_models, instances, own_redis, start_service):
    server, client = own_redis
    env = _env(server.url, movielens_models.model_dir)
    source = start_service(["serve", "source"], env=env)
    warm, batch = instances[:100], instances[100:400]
    _post(source.base_url, warm)
    stream = InstanceStream(client)

    def stored_ids():
        records = {int(k.rsplit(b":", 1)[1]) for k in client.scan_iter(match="iat:ins:*", count=5000)}
        entries = {int(fields[b"ins_id"]) for _, fields in client.xrange(stream.key)}
        return records, entries

    warm_ids = {ins_id(i["request_id"], i["item_id"], i["timestamp_ms"]) for i in warm}
    client.config_set("maxmemory-policy", "noeviction")
    # Room for a part of the batch only: written one by one, the first records would fit and
    # the rest (and every stream entry after them) be refused.
    for room in (32 * 1024, 0):
        client.config_set("maxmemory", client.info("memory")["used_memory"] + room)
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": batch}, timeout=120)
        assert response.status_code == 503, (room, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert int(response.headers["Retry-After"]) >= 0
        body = response.json()
        assert set(body) >= {"error", "field", "message"} and body["error"] == "UNAVAILABLE"
        # No record without its entry, no entry without its record (the oldest beyond LMAX have none).
        assert stored_ids() == (servable_ids(warm), warm_ids), room
    assert _metric(source, "iat_source_instances_total", 'outcome="unavailable"') == 2 * len(batch)

    client.config_set("maxmemory", 0)
    result, _ = _post_with_retries(source.base_url, batch)  # the client's retry
    assert result["accepted"] == len(batch)
    start_service(["serve", "sequencer"], env=env)
    _wait_sequenced(client)
    _assert_store_holds_exactly(client, warm + batch)  # each in its sequence exactly once
