"""Hostile ids and values against real processes (issue 14, items 7 and 8).

- Instance ids never collide: the InsID hashes an unambiguous encoding of its parts, and two
  instances of one POST with the same InsID are either the same instance (stored and counted
  once) or a conflict (422 naming both indices, nothing stored).
- One validator: the source (REST and the raw-instance stream) and the ranking service (REST
  and gRPC) reject the same hostile values (a NUL in an id, a multi-MB categorical value,
  ``true`` as a time) with 422 / INVALID_ARGUMENT naming the field, and write nothing.
- One error shape for every 4xx of every HTTP app, parse errors included:
  ``{"error", "field", "message"}``, never FastAPI's ``{"detail": ...}``.
"""
from __future__ import annotations

import copy
import itertools
import json
import sys
import time

import grpc
import httpx
import pytest
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from contract.ids import encode_parts, ins_id
from storage.connection import EmbeddedRedis, connect
from tests.conftest import free_port
from tests.services.test_source_e2e import VALID

pytestmark = pytest.mark.slow
RAW = "iat:raw-instances"
BIG = "9" * (2 * 1024 * 1024)  # a 2 MB categorical value: under the 4 MiB body limit, so validation sees it
CONTEXT = {k: VALID["features"]["categorical"][k] for k in ("age", "gender", "occupation", "zip_code")}


@pytest.fixture(scope="module")
def stack(movielens_models, start_module_service, tmp_path_factory):
    server = EmbeddedRedis(directory=tmp_path_factory.mktemp("redis-ids")).start()
    env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(movielens_models.model_dir), "IAT_RAW_STREAM": RAW,
           "IAT_RELOAD_INTERVAL_S": "0"}
    grpc_port = free_port()
    source = start_module_service(["serve", "source"], env=env)
    ranking = start_module_service(["serve", "ranking", "--grpc-port", str(grpc_port)], env=env)
    sequencer = start_module_service(["serve", "sequencer"], env=env)
    client = connect(server.url, cluster=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                    options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])
    yield {"source": source, "ranking": ranking, "sequencer": sequencer, "client": client,
           "stub": ranking_pb2_grpc.RankingServiceStub(channel)}
    channel.close()
    client.close()
    server.stop()


_users = itertools.count(1)


def _instance(user: str, **changes) -> dict:
    inst = copy.deepcopy(VALID)
    inst["user_id"] = user
    inst.update(changes)
    return inst


def _fresh_user() -> str:
    """A user no other test writes, so each test counts only its own records."""
    return f"ids-{next(_users)}"


def _records(client, user: str) -> list[bytes]:
    return list(client.scan_iter(match=f"iat:ins:{{{user}}}:*", count=1000))


def _post(stack, instances, **kw):
    return httpx.post(stack["source"].base_url + "/v1/instances", json={"instances": instances}, timeout=60, **kw)


def _assert_error(response, status, field):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == "INVALID_ARGUMENT" and body["field"] == field, body
    assert field in body["message"], body
    return body


# --- item 7: collision-free ids ---------------------------------------------------------------
PAIRS = [  # each pair collided under the separator-joined encoding
    (("x\x1fy", "z", 1), ("x", "y\x1fz", 1)),
    (("\x1f", "", 5), ("", "\x1f", 5)),
    (("\udcc3\udca9", "z", 1), ("é", "z", 1)),  # lone surrogates vs the UTF-8 bytes they escaped to
]


@pytest.mark.parametrize("a, b", PAIRS)
def test_parts_that_collided_under_a_separator_get_distinct_ins_ids(a, b):
    assert ins_id(*a) != ins_id(*b)


def test_the_encoding_is_unambiguous_over_hostile_parts():
    alphabet = ["", "x", "\x1f", "x\x1f", "\x1fy", "\xff", "\udcff", "é", "\x00", "8"]
    tuples = [t for n in range(4) for t in itertools.product(alphabet, repeat=n)]
    encoded = {encode_parts(*t) for t in tuples}
    assert len(encoded) == len(tuples)


def test_ids_without_the_separator_keep_their_values():
    """Stored InsIDs and trained feature buckets stay valid across the upgrade (golden values of
    the separator-joined encoding)."""
    assert ins_id("196:881250949", "242", 881250949000) == 4089679653020969116
    assert ins_id("r", "i", 1) != ins_id("r", "i", 2)


def test_contract_imports_neither_torch_nor_redis_nor_pydantic():
    import subprocess

    code = ("import sys, contract.ids, contract.validation;"
            "print(sorted(m for m in ('torch', 'redis', 'pydantic', 'fastapi', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_pair_that_collided_is_never_stored_as_one_record(stack):
    """Before: 200, ``accepted: 2``, one record (the second overwrote the first). The separator is
    a control character, which ids may not hold: the batch is refused whole, nothing stored."""
    client, user = stack["client"], _fresh_user()
    (r1, i1, _), (r2, i2, _) = PAIRS[0]
    before = client.dbsize()
    response = _post(stack, [_instance(user, request_id=r1, item_id=i1), _instance(user, request_id=r2, item_id=i2)])
    body = _assert_error(response, 422, "instances[0].request_id")
    assert "control character" in body["message"]
    assert client.dbsize() == before and _records(client, user) == []


def test_conflicting_duplicates_are_rejected_naming_both_indices(stack):
    client, user = stack["client"], _fresh_user()
    a = _instance(user, request_id="dup-a")
    b = _instance(user, request_id="dup-b")
    a_again = _instance(user, request_id="dup-a", labels={"like": 0, "love": 1})  # same InsID, other labels
    before, stream_before = client.dbsize(), client.xlen("iat:stream") if client.exists("iat:stream") else 0
    response = _post(stack, [a, b, a_again])
    body = _assert_error(response, 422, "instances[2]")
    assert "instances[0]" in body["message"] and "labels" in body["message"]
    assert body["indices"] == [0, 2]
    assert client.dbsize() == before and _records(client, user) == []
    assert (client.xlen("iat:stream") if client.exists("iat:stream") else 0) == stream_before


def test_identical_duplicates_are_one_instance(stack):
    client, user = stack["client"], _fresh_user()
    a, b = _instance(user, request_id="same-a"), _instance(user, request_id="same-b")
    response = _post(stack, [a, b, copy.deepcopy(a)])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 2  # distinct instances: the repeat is the same instance
    assert len(body["ins_ids"]) == 3 and body["ins_ids"][0] == body["ins_ids"][2] != body["ins_ids"][1]
    assert {int(k.rsplit(b":", 1)[1]) for k in _records(client, user)} == {int(i) for i in body["ins_ids"]}


# --- item 8: one validator, both services -------------------------------------------------------
def _with_big_value(inst):
    inst["features"]["categorical"]["zip_code"] = BIG


HOSTILE = {  # name: (change to a valid instance, the field the source names, the field ranking names)
    "nul_in_user_id": (lambda i: i.update(user_id="u\x00"), "instances[0].user_id", "user_id"),
    "multi_mb_categorical": (_with_big_value, "instances[0].features.categorical[zip_code]",
                             "context.categorical[zip_code]"),
    "time_true": (lambda i: i.update(timestamp_ms=True), "instances[0].timestamp_ms", "request_time_ms"),
}


def _score_body(inst: dict) -> dict:
    """The Score request a ranking client would send for this instance's user, context and time."""
    return {"user_id": inst["user_id"], "request_time_ms": inst["timestamp_ms"], "model": "iat",
            "context": {"categorical": {k: inst["features"]["categorical"][k] for k in CONTEXT}},
            "candidates": [{"item_id": "1"}, {"item_id": "2"}]}


@pytest.mark.parametrize("name", HOSTILE)
def test_source_rejects_hostile_values_naming_the_field(stack, name):
    change, field, _ = HOSTILE[name]
    client, user = stack["client"], _fresh_user()
    bad = _instance(user, request_id="hostile")
    change(bad)
    before = client.dbsize()
    _assert_error(_post(stack, [bad]), 422, field)
    assert client.dbsize() == before and _records(client, user) == []


@pytest.mark.parametrize("name", HOSTILE)
def test_ranking_rest_rejects_hostile_values_naming_the_field(stack, name):
    change, _, field = HOSTILE[name]
    inst = _instance("7")
    change(inst)
    response = httpx.post(stack["ranking"].base_url + "/v1/score", json=_score_body(inst), timeout=60)
    _assert_error(response, 422, field)


@pytest.mark.parametrize("name", ["nul_in_user_id", "multi_mb_categorical"])  # proto3 has no `true` int64
def test_ranking_grpc_rejects_hostile_values_naming_the_field(stack, name):
    change, _, field = HOSTILE[name]
    inst = _instance("7")
    change(inst)
    body = _score_body(inst)
    request = ranking_pb2.ScoreRequest(
        user_id=body["user_id"], request_time_ms=body["request_time_ms"], model="iat",
        context=ranking_pb2.Features(categorical=body["context"]["categorical"]),
        candidates=[ranking_pb2.Candidate(item_id=c["item_id"]) for c in body["candidates"]])
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].Score(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


def test_raw_stream_rejects_the_same_hostile_values(stack):
    """Each hostile entry is rejected (counted, acked, never stored); a good entry behind them is stored."""
    client, user = stack["client"], _fresh_user()
    bad = []
    for name, (change, _, _) in HOSTILE.items():
        inst = _instance(user, request_id=f"raw-{name}")
        change(inst)
        bad.append(inst)
    good = _instance(user, request_id="raw-good", timestamp_ms=VALID["timestamp_ms"] + 1)
    for inst in [*bad, good]:
        client.xadd(RAW, {"instance": json.dumps(inst)})
    last = client.xrevrange(RAW, count=1)[0][0]
    deadline = time.monotonic() + 120
    while True:  # the consumer reads in order: once the last entry is acked, all were handled
        group = next(g for g in client.xinfo_groups(RAW) if g["name"] == b"source")
        if group["last-delivered-id"] == last and client.xpending(RAW, "source")["pending"] == 0:
            break
        assert time.monotonic() < deadline, "the raw stream was not consumed"
        time.sleep(0.1)
    stored = {int(k.rsplit(b":", 1)[1]) for k in _records(client, user)}
    assert stored == {ins_id(good["request_id"], good["item_id"], good["timestamp_ms"])}
    assert _records(client, "u\x00") == []


def test_an_int64_as_a_decimal_string_stays_accepted(stack):
    """proto3's JSON mapping writes an int64 as a string; both services read it."""
    client, user = stack["client"], _fresh_user()
    inst = _instance(user, request_id="string-time", timestamp_ms=str(VALID["timestamp_ms"]))
    response = _post(stack, [inst])
    assert response.status_code == 200, response.text
    assert len(_records(client, user)) == 1
    body = _score_body(_instance("7"))
    body["request_time_ms"] = str(body["request_time_ms"])
    response = httpx.post(stack["ranking"].base_url + "/v1/score", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_ranking_history_rejects_a_nul_user_id(stack):
    response = httpx.get(stack["ranking"].base_url + "/v1/users/u%00/history", params={"before_ms": 1}, timeout=60)
    _assert_error(response, 422, "user_id")


# --- one error shape for every 4xx --------------------------------------------------------------
def _assert_shape(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert {"error", "field", "message"} <= body.keys() and "detail" not in body, body
    return body


@pytest.mark.parametrize("app, path", [("source", "/v1/instances"), ("ranking", "/v1/score")])
def test_malformed_json_answers_the_error_shape(stack, app, path):
    url = stack[app].base_url + path
    body = _assert_shape(httpx.post(url, content=b'{"instances": [', headers={"content-type": "application/json"},
                                    timeout=60), 400)
    assert body["error"] == "INVALID_ARGUMENT" and body["field"] == "body" and "malformed JSON" in body["message"]
    body = _assert_shape(httpx.post(url, json=["not", "an", "object"], timeout=60), 422)
    assert body["field"] == "body"


@pytest.mark.parametrize("app", ["source", "ranking", "sequencer"])
def test_unknown_paths_and_methods_answer_the_error_shape(stack, app):
    base = stack[app].base_url
    assert _assert_shape(httpx.get(base + "/no/such/path", timeout=60), 404)["error"] == "NOT_FOUND"
    assert _assert_shape(httpx.post(base + "/healthz", timeout=60), 405)["error"] == "METHOD_NOT_ALLOWED"
