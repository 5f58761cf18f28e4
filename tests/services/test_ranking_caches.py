"""The ranking service's two caches on real parts.

- Item encodings: candidates looked up by their content key give the arrays every candidate
  encoded from scratch gives; the LRU holds at most its size, a bad candidate is never cached.
- Histories: real source, sequencer and ranking processes, a real Redis, the MovieLens quick
  models. A second Score of a user whose stored history did not change hits the cache (metric)
  and returns identical scores; ingesting one more instance before the request time changes
  the stored history, so the next Score misses and reads it; so does an older instance arriving
  late, which leaves the newest instance before the request time as it was.
"""
from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from contract.validation import InvalidField
from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.featurizer import FeatureError, ItemEncodings
from models.runtime.loader import latest_version, load_ranking_model
from services.ranking.protocol import (
    candidate_from_key,
    check_candidate,
    query_from_proto,
)
from storage.connection import EmbeddedRedis, connect
from storage.stream import InstanceStream
from tests.conftest import free_port

USER_SIDE = ("age", "gender", "occupation", "zip_code")


@pytest.fixture(scope="module")
def raw(movielens_models):
    return raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)


def _proto_request(instance: dict, candidates: list[dict], request_time_ms: int | None = None, model: str = "iat"):
    user_side = {k: v for k, v in instance["features"]["categorical"].items() if k in USER_SIDE}
    return ranking_pb2.ScoreRequest(
        request_id="r", user_id=instance["user_id"],
        request_time_ms=request_time_ms or instance["timestamp_ms"],
        context=ranking_pb2.Features(categorical=user_side),
        candidates=[ranking_pb2.Candidate(
            item_id=c["item_id"],
            features=ranking_pb2.Features(categorical={k: v for k, v in c["features"]["categorical"].items()
                                                       if k not in USER_SIDE}))
            for c in candidates], model=model)


# ------------------------------------------------------------------------ item encodings

def test_item_encodings_equal_encoding_every_candidate_and_stay_bounded(movielens_models, raw):
    model = load_ranking_model(latest_version(movielens_models.model_dir, "iat"), "eager", "cpu")
    featurizer = model.featurizer
    items = ItemEncodings(featurizer, 64, decode=candidate_from_key, check=check_candidate)

    def both(query):
        reference = featurizer.encode(query.user_id, query.request_time_ms, query.item_ids,
                                      query.context.categorical, query.context.numeric,
                                      [f.categorical for f in query.candidate_features],
                                      [f.numeric for f in query.candidate_features])
        cached = featurizer.assemble(query.user_id, query.request_time_ms, query.context.categorical,
                                     query.context.numeric, items.rows(query.candidate_keys))
        return reference, cached

    for start in (0, 300, 0):  # 500 real candidates (more than the LRU holds), twice the same
        query = query_from_proto(_proto_request(raw[start], raw[start + 1:start + 501]))
        for ref, got in zip(*both(query)):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)
        assert items.info().currsize == 64

    hits_before = items.info().hits
    again = query_from_proto(_proto_request(raw[0], raw[500:501] * 10))  # one candidate, ten times
    for ref, got in zip(*both(again)):
        np.testing.assert_array_equal(got, ref)
    assert items.info().hits - hits_before >= 9

    # A bad candidate fails on its miss, every time, and is never cached.
    bad = query_from_proto(_proto_request(raw[0], [{"item_id": "\x01", "features": {"categorical": {}}}]))
    size = items.info().currsize
    for _ in range(2):
        with pytest.raises(InvalidField):
            items.rows(bad.candidate_keys)
    unknown = query_from_proto(_proto_request(raw[0], [{"item_id": "1", "features": {"categorical": {"nope": "x"}}}]))
    with pytest.raises(FeatureError, match=r"features\.categorical\[nope\]"):
        items.rows(unknown.candidate_keys)
    assert items.info().currsize == size


# ------------------------------------------------------------------------ history cache

def test_history_cache_stays_within_its_bytes_least_recently_used_first_out():
    from models.runtime.loader import PreparedHistory
    from services.ranking.history_cache import (
        ENTRY_OVERHEAD_BYTES,
        CachedHistory,
        HistoryCache,
    )

    def entry():
        return CachedHistory(PreparedHistory((np.zeros(1000, np.uint8),), 1, 0), incompatible=0)

    records = b"r" * 24
    size = len(records) + 1 + 1000 + ENTRY_OVERHEAD_BYTES  # key bytes (records, labels), arrays, overhead
    cache = HistoryCache(3 * size)
    keys = [("iat", "v1", 256, 1, records, bytes([i])) for i in range(4)]
    for key in keys[:3]:
        cache.put(key, entry())
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(keys[3], entry())  # over the bound: the least recently used (keys[1]) goes
    assert cache.get(keys[1]) is None and all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.nbytes <= cache.max_bytes
    big = CachedHistory(PreparedHistory((np.zeros(10 * size, np.uint8),), 1, 0), incompatible=0)
    cache.put(("iat", "v1", 256, 1, b"big", b""), big)  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 3 and cache.get(("iat", "v1", 256, 1, b"big", b"")) is None
    assert not HistoryCache(0).enabled


def _wait_sequenced(client, timeout_s=120.0):
    stream = InstanceStream(client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stream.lag() == 0 and stream.pending_count() == 0:
            return
        time.sleep(0.05)
    raise TimeoutError("sequencer did not catch up")


def _lookups(ranking) -> dict[str, float]:
    text = httpx.get(ranking.base_url + "/metrics", timeout=30).text
    out = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "iat_ranking_history_cache_lookups_total":
                out[sample.labels["outcome"]] = sample.value
    return out


@pytest.fixture(scope="module")
def history_stack(movielens_models, start_module_service, tmp_path_factory, raw):
    """Redis, source, sequencer and one ranking process per runtime; a user with a stored
    history of 7 instances (the first 8 of the timeline but the 4th) and more to come."""
    redis_server = EmbeddedRedis(directory=tmp_path_factory.mktemp("redis-history-cache")).start()
    client = connect(redis_server.url, cluster=False)
    env = {"REDIS_URL": redis_server.url, "IAT_MODEL_DIR": str(movielens_models.model_dir),
           "IAT_RELOAD_INTERVAL_S": "0"}
    start_module_service(["serve", "sequencer"], env=env)
    source = start_module_service(["serve", "source"], env=env)
    rankings = {}
    for runtime in ("torchscript", "eager"):
        port = free_port()
        ranking = start_module_service(["serve", "ranking", "--grpc-port", str(port)],
                                       env={**env, "IAT_RUNTIME": runtime})
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        rankings[runtime] = (ranking, ranking_pb2_grpc.RankingServiceStub(channel), channel)
    by_user: dict[str, list[dict]] = {}
    for instance in raw:
        by_user.setdefault(instance["user_id"], []).append(instance)
    # a trained user (quick models: the first 300 ids) with distinct, increasing timestamps
    user = next(u for u, rows in by_user.items() if len(rows) >= 12 and len({r["timestamp_ms"] for r in rows[:11]}) == 11)
    timeline = by_user[user]
    response = httpx.post(source.base_url + "/v1/instances", json={"instances": timeline[:3] + timeline[4:8]}, timeout=120)
    assert response.status_code == 200, response.text
    _wait_sequenced(client)
    yield {"source": source, "client": client, "timeline": timeline, "rankings": rankings}
    for _, _, channel in rankings.values():
        channel.close()
    client.close()
    redis_server.stop()


def test_same_stored_history_hits_the_cache_and_a_new_instance_misses(history_stack):
    timeline = history_stack["timeline"]
    request = _proto_request(timeline[0], timeline[:100], request_time_ms=timeline[10]["timestamp_ms"])
    previous = {}
    for runtime, (ranking, stub, _) in history_stack["rankings"].items():
        before = _lookups(ranking)
        first = stub.Score(request, timeout=60)
        assert first.history_length == 7
        previous[runtime] = list(first.scores)
        after_first = _lookups(ranking)
        assert after_first["miss"] == before["miss"] + 1, runtime

        second = stub.Score(request, timeout=60)
        after_second = _lookups(ranking)
        assert after_second["hit"] == after_first["hit"] + 1, runtime
        assert after_second["miss"] == after_first["miss"], runtime
        assert list(second.scores) == list(first.scores), runtime  # identical, not close

        # REST reads the same stored history: a hit too, the same scores
        body = {"request_id": "r", "user_id": request.user_id, "model": "iat", "request_time_ms": request.request_time_ms,
                "context": {"categorical": dict(request.context.categorical)},
                "candidates": [{"item_id": c.item_id, "features": {"categorical": dict(c.features.categorical)}}
                               for c in request.candidates]}
        rest = httpx.post(ranking.base_url + "/v1/score", json=body, timeout=60)
        assert rest.status_code == 200, rest.text
        assert rest.json()["scores"] == pytest.approx(list(first.scores), abs=0)
        assert _lookups(ranking)["hit"] == after_second["hit"] + 1, runtime

    # One more instance before the request time (the newest), then an older one arriving late
    # (the newest stays the same): each changes the stored history, every process misses once
    # and then hits again, and scores move.
    for arriving, length in ((timeline[8], 8), (timeline[3], 9)):
        response = httpx.post(history_stack["source"].base_url + "/v1/instances",
                              json={"instances": [arriving]}, timeout=120)
        assert response.status_code == 200, response.text
        _wait_sequenced(history_stack["client"])
        for runtime, (ranking, stub, _) in history_stack["rankings"].items():
            before = _lookups(ranking)
            third = stub.Score(request, timeout=60)
            after = _lookups(ranking)
            assert third.history_length == length, runtime
            assert after["miss"] == before["miss"] + 1 and after["hit"] == before["hit"], runtime
            assert list(third.scores) != previous[runtime], runtime
            fourth = stub.Score(request, timeout=60)
            assert _lookups(ranking)["hit"] == after["hit"] + 1, runtime
            assert list(fourth.scores) == list(third.scores), runtime
            previous[runtime] = list(third.scores)


def test_bad_candidates_are_named_as_before_whether_cached_or_not(history_stack):
    """A candidate error names the field the checks-in-order name, also after the same
    candidates were cached by a good request."""
    timeline = history_stack["timeline"]
    _, stub, _ = history_stack["rankings"]["torchscript"]
    good = timeline[:5]
    stub.Score(_proto_request(timeline[0], good), timeout=60)  # cached now
    cases = [
        ({"item_id": "", "features": {"categorical": {}}}, "candidates[5].item_id"),
        ({"item_id": "7", "features": {"categorical": {"nope": "x"}}}, "candidates[5].features.categorical[nope]"),
        ({"item_id": "7", "features": {"categorical": {"hour": "3"}}}, "candidates[5].features.categorical[hour]"),
    ]
    for bad, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_proto_request(timeline[0], good + [bad] + good), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field + ":"), err.value.details()
    # a value error of a later candidate comes before a name error of an earlier one, as before
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(_proto_request(timeline[0], [cases[1][0], cases[0][0]]), timeout=60)
    assert err.value.details().startswith("candidates[1].item_id:"), err.value.details()
