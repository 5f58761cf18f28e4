"""Access and limits through real processes: a bearer token on /v1/ and gRPC Score, open probes
and metrics, body and message size limits applied before parsing, loopback binding, and the
services running against a real password-protected Redis with an ACL user."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.config import Settings
from storage.connection import connect
from storage.instance_store import InstanceStore
from tests.conftest import free_port

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token-for-tests"
LIMIT = 64 * 1024
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INSTANCE = {"request_id": "r1", "user_id": "7", "item_id": "50", "timestamp_ms": 880000000000,
            "features": {"categorical": {"age": "30", "gender": "M", "occupation": "writer", "zip_code": "12345",
                                         "release_year": "1995", "class": "Drama|Comedy"}, "numeric": {}},
            "labels": {"like": 1, "love": 0}}


@pytest.fixture(scope="module")
def stack(movielens_models, redis_auth_server, start_module_service):
    url = redis_auth_server.url(redis_auth_server.username, redis_auth_server.user_password)
    env = {"REDIS_URL": url, "IAT_MODEL_DIR": str(movielens_models.model_dir), "IAT_API_TOKEN": TOKEN,
           "IAT_MAX_BODY_BYTES": str(LIMIT), "IAT_GRPC_MAX_RECEIVE_BYTES": str(LIMIT), "IAT_RELOAD_INTERVAL_S": "0"}
    client = connect(url, cluster=False)
    client.flushall()
    sequencer = start_module_service(["serve", "sequencer"], env=env)
    source = start_module_service(["serve", "source"], env=env)
    grpc_port = free_port()
    ranking = start_module_service(["serve", "ranking", "--grpc-port", str(grpc_port)], env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield {"sequencer": sequencer, "source": source, "ranking": ranking, "channel": channel, "client": client}
    channel.close()
    client.close()


def _score_body(n=3):
    return {"request_id": "q", "user_id": "7", "request_time_ms": 890000000000, "model": "iat",
            "context": {"categorical": {"age": "30", "gender": "M", "occupation": "writer", "zip_code": "12345"}},
            "candidates": [{"item_id": str(50 + i), "features": {"categorical": {"release_year": "1995", "class": "Drama"}}}
                           for i in range(n)]}


def _grpc_request(n=3, item_id_len=1):
    return ranking_pb2.ScoreRequest(
        request_id="q", user_id="7", request_time_ms=890000000000, model="iat",
        context=ranking_pb2.Features(categorical={"age": "30", "gender": "M", "occupation": "writer", "zip_code": "12345"}),
        candidates=[ranking_pb2.Candidate(item_id=str(50 + i).rjust(item_id_len, "0"),
                                          features=ranking_pb2.Features(categorical={"release_year": "1995"}))
                    for i in range(n)])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}],
                         ids=["none", "wrong", "basic", "no-scheme", "longer"])
def test_v1_routes_refuse_without_the_token(stack, headers):
    client = stack["client"]
    before = client.dbsize()
    calls = [
        lambda: httpx.post(stack["source"].base_url + "/v1/instances", json={"instances": [INSTANCE]}, headers=headers),
        lambda: httpx.post(stack["ranking"].base_url + "/v1/score", json=_score_body(), headers=headers),
        lambda: httpx.get(stack["ranking"].base_url + "/v1/users/7/history", params={"before_ms": 1}, headers=headers),
        lambda: httpx.get(stack["sequencer"].base_url + "/v1/stats", headers=headers),
    ]
    for call in calls:
        response = call()
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"] == "UNAUTHENTICATED"
    assert client.dbsize() == before  # nothing ingested


def test_v1_routes_work_with_the_token_against_an_acl_user_on_a_password_redis(stack):
    ingest = httpx.post(stack["source"].base_url + "/v1/instances", json={"instances": [INSTANCE]}, headers=AUTH)
    assert ingest.status_code == 200, ingest.text
    assert stack["client"].exists(InstanceStore(stack["client"]).record_key("7", int(ingest.json()["ins_ids"][0])))
    score = httpx.post(stack["ranking"].base_url + "/v1/score", json=_score_body(), headers=AUTH)
    assert score.status_code == 200, score.text
    assert len(score.json()["scores"]) == 3 * 2
    history = httpx.get(stack["ranking"].base_url + "/v1/users/7/history", params={"before_ms": 1}, headers=AUTH)
    assert history.status_code == 200 and history.json()["count"] == 0
    assert httpx.get(stack["sequencer"].base_url + "/v1/stats", headers=AUTH).status_code == 200


def test_probes_and_metrics_stay_open(stack):
    for name in ("source", "ranking", "sequencer"):
        base = stack[name].base_url
        assert httpx.get(base + "/healthz").status_code == 200
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200, ready.text  # the store answers through the ACL user
        assert "# TYPE" in httpx.get(base + "/metrics").text


def test_grpc_score_needs_the_token_in_metadata_health_does_not(stack):
    stub = ranking_pb2_grpc.RankingServiceStub(stack["channel"])
    for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_grpc_request(), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = stub.Score(_grpc_request(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    assert len(ok.scores) == 3 * 2
    health = health_pb2_grpc.HealthStub(stack["channel"]).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_oversized_bodies_get_413_before_parsing(stack):
    not_json = b"{" * (LIMIT + 1)  # would be a 422 if anything parsed it
    for url in (stack["source"].base_url + "/v1/instances", stack["ranking"].base_url + "/v1/score"):
        response = httpx.post(url, content=not_json, headers={**AUTH, "content-type": "application/json"})
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "PAYLOAD_TOO_LARGE"

        def chunked():  # no Content-Length: the limit is counted while reading
            for _ in range(LIMIT // 1024 + 2):
                yield b" " * 1024

        response = httpx.post(url, content=chunked(), headers={**AUTH, "content-type": "application/json"})
        assert response.status_code == 413, response.text
        # Anonymous and oversized: refused for the token first, the body is never read.
        assert httpx.post(url, content=not_json).status_code == 401


def test_a_body_just_under_the_limit_is_parsed(stack):
    body = json.dumps({"instances": [INSTANCE]}).encode()
    padded = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(padded) == LIMIT
    response = httpx.post(stack["source"].base_url + "/v1/instances", content=padded,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_oversized_grpc_message_is_resource_exhausted(stack):
    stub = ranking_pb2_grpc.RankingServiceStub(stack["channel"])
    big = _grpc_request(n=200, item_id_len=400)  # ~100 KB > 64 KiB
    assert big.ByteSize() > LIMIT
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(big, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def test_services_bind_loopback_unless_told_otherwise(stack, monkeypatch):
    for key in list(os.environ):
        if key.startswith("IAT_"):
            monkeypatch.delenv(key)
    assert Settings().host == "127.0.0.1"
    assert Settings().token is None  # open unless configured
    for name in ("source", "ranking", "sequencer"):  # started without --host
        assert _listening_addresses(stack[name].http_port) == {"0100007F"}  # 127.0.0.1


@pytest.mark.parametrize("service", ["source", "ranking", "sequencer"])
def test_a_wrong_redis_password_fails_clearly_at_start_up(movielens_models, redis_auth_server, tmp_path, service):
    url = redis_auth_server.url(redis_auth_server.username, "not-the-password")
    env = {**os.environ, "REDIS_URL": url, "IAT_MODEL_DIR": str(movielens_models.model_dir)}
    iat = [sys.executable, "-c", "from cli import main; raise SystemExit(main())"]
    done = subprocess.run(iat + ["serve", service, "--port", str(free_port()), "--grpc-port", str(free_port())]
                          if service == "ranking" else iat + ["serve", service, "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "AuthenticationError" in done.stderr or "WRONGPASS" in done.stderr, done.stderr[-2000:]
