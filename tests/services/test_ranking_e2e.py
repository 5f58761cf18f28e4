"""The read path end to end: real source, sequencer and ranking processes on loopback, a real
Redis, models trained on MovieLens-100K. Instances are ingested through the source service (which
computes InsEmbs and codes online), sequenced by the sequencer, and scored over gRPC and REST."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import time

import grpc
import httpx
import numpy as np
import pytest
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from models.data.prepared import load_dataset
from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.loader import latest_version
from models.training.offline import offline_scores
from storage.connection import EmbeddedRedis, connect
from storage.stream import InstanceStream

pytestmark = pytest.mark.slow
N_USERS = 24


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_sequenced(client, timeout_s=60.0):
    stream = InstanceStream(client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stream.lag() == 0 and stream.pending_count() == 0:
            return
        time.sleep(0.02)
    raise TimeoutError("sequencer did not catch up")


class Stack:
    def __init__(self, model_dir, data, raw_by_row, users, client, source, ranking, grpc_port):
        self.model_dir, self.data, self.raw_by_row, self.users = model_dir, data, raw_by_row, users
        self.client, self.source, self.ranking, self.grpc_port = client, source, ranking, grpc_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def request(self, row: int, model: str = "iat", extra_items: int = 0) -> dict:
        """A Score request for dataset row ``row``: its user, its time, its item first."""
        raw = self.raw_by_row[row]
        user_side = {k: v for k, v in raw["features"]["categorical"].items() if k in ("age", "gender", "occupation", "zip_code")}
        item_side = {k: v for k, v in raw["features"]["categorical"].items() if k not in user_side}
        cands = [{"item_id": raw["item_id"], "features": {"categorical": item_side, "numeric": {}}}]
        cands += [{"item_id": str(1000 + k), "features": {"categorical": {"release_year": "1995", "class": "Drama"}, "numeric": {}}}
                  for k in range(extra_items)]
        return {"request_id": f"req-{row}", "user_id": raw["user_id"], "request_time_ms": raw["timestamp_ms"],
                "context": {"categorical": user_side, "numeric": {}}, "candidates": cands, "model": model}

    def rest(self, body: dict) -> httpx.Response:
        return httpx.post(self.ranking.base_url + "/v1/score", json=body, timeout=30)

    def grpc(self, body: dict, timeout=30) -> ranking_pb2.ScoreResponse:
        msg = ranking_pb2.ScoreRequest(
            request_id=body["request_id"], user_id=body["user_id"], request_time_ms=body["request_time_ms"],
            context=ranking_pb2.Features(**body["context"]), model=body["model"],
            candidates=[ranking_pb2.Candidate(item_id=c["item_id"], features=ranking_pb2.Features(**c["features"]))
                        for c in body["candidates"]])
        return self.stub.Score(msg, timeout=timeout)


@pytest.fixture(scope="module")
def stack(movielens_models, start_module_service, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    model_dir = root / "models"
    shutil.copytree(movielens_models.model_dir, model_dir)
    redis_server = EmbeddedRedis(directory=root / "redis").start()
    client = connect(redis_server.url, cluster=False)
    env = {"REDIS_URL": redis_server.url, "IAT_MODEL_DIR": str(model_dir), "IAT_RELOAD_INTERVAL_S": "0.3",
           "IAT_MAX_CANDIDATES": "1000", "IAT_RUNTIME": "torchscript", "IAT_CLAIM_IDLE_MS": "1000"}
    start_module_service(["serve", "sequencer"], env=env)
    source = start_module_service(["serve", "source"], env=env)
    grpc_port = _free_port()
    ranking = start_module_service(["serve", "ranking", "--grpc-port", str(grpc_port)], env=env)

    schema = load_schema("movielens-100k")
    data = load_dataset(schema, movielens_models.data_dir)
    raw = raw_instances(schema, movielens_models.data_dir)  # same order as the loader's rows
    assert [r["timestamp_ms"] for r in raw] == data.ts_ms.tolist()
    counts = np.bincount(data.user_index)
    rng = np.random.default_rng(7)
    # Users the models were trained on (SIF's id vocabulary is the training set's), with
    # histories long enough to matter and short enough to replay quickly.
    eligible = np.flatnonzero((counts >= 20) & (counts <= 150) & (np.arange(len(counts)) < movielens_models.max_users))
    users = rng.choice(eligible, N_USERS, replace=False)
    rows = np.flatnonzero(np.isin(data.user_index, users))  # time order
    # Replay in time order; each batch waits for the sequencer, as live traffic would.
    for start in range(0, len(rows), 256):
        batch = [raw[r] for r in rows[start:start + 256]]
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": batch}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == len(batch)
        _wait_sequenced(client)
    s = Stack(model_dir, data, {int(r): raw[r] for r in rows}, users, client, source, ranking, grpc_port)
    s.rows = rows
    # The offline reference sees the training users only (as the trained model did).
    trained_rows = np.flatnonzero(data.user_index < movielens_models.max_users)
    s.trained_data = data.subset_users(np.arange(movielens_models.max_users))
    s.to_trained_row = lambda r: np.searchsorted(trained_rows, r)
    yield s
    s.channel.close()
    client.close()
    redis_server.stop()


def _test_rows(stack, n, seed=0):
    rows = stack.rows[stack.data.split[stack.rows] == 2]
    return np.random.default_rng(seed).choice(rows, min(n, len(rows)), replace=False)


def test_history_length_is_ingested_instances_before_request_capped_at_L(stack):
    data = stack.data
    for model in ("iat", "sif"):
        max_history = json.loads((latest_version(stack.model_dir, model) / "manifest.json").read_text())["max_history"]
        for row in _test_rows(stack, 12):
            before = int(np.sum((data.user_index == data.user_index[row]) & (data.ts_ms < data.ts_ms[row])))
            response = stack.grpc(stack.request(int(row), model))
            assert response.history_length == min(before, max_history)
            assert list(response.tasks) == ["like", "love"]


def test_rest_and_grpc_give_identical_scores(stack):
    for row in _test_rows(stack, 5, seed=1):
        body = stack.request(int(row), "iat", extra_items=30)
        rest = stack.rest(body)
        assert rest.status_code == 200, rest.text
        g = stack.grpc(body)
        assert rest.json()["scores"] == pytest.approx(list(g.scores), abs=0)
        assert rest.json()["history_length"] == g.history_length
        assert rest.json()["model_version"] == g.model_version
        assert len(g.scores) == 31 * 2


@pytest.mark.parametrize("model", ["iat", "sif"])
def test_served_scores_equal_offline_predictions(stack, model):
    """No training/serving skew: online featurization, online InsEmbs/codes from the source
    service, the store's truncation and the exported model reproduce the offline model."""
    rows = _test_rows(stack, 40, seed=2)
    offline = offline_scores(stack.model_dir, stack.trained_data, stack.to_trained_row(rows), name=model)
    served = np.array([list(stack.grpc(stack.request(int(r), model)).scores) for r in rows], dtype=np.float32)
    np.testing.assert_allclose(served, offline, rtol=0, atol=1e-5)


def test_unknown_user_scores_with_empty_history(stack):
    body = stack.request(int(stack.rows[0]), "iat", extra_items=3)
    body["user_id"] = "no-such-user"
    response = stack.grpc(body)
    assert response.history_length == 0 and len(response.scores) == 8
    assert all(0.0 < s < 1.0 for s in response.scores)


def test_empty_candidate_list_is_an_empty_answer(stack):
    body = stack.request(int(stack.rows[-1]), "iat")
    body["candidates"] = []
    response = stack.grpc(body)
    assert list(response.scores) == [] and response.model == "iat"
    assert stack.rest(body).json()["scores"] == []


@pytest.mark.parametrize(
    "mutate, code, http, field",
    [
        (lambda b: b.update(user_id=""), grpc.StatusCode.INVALID_ARGUMENT, 422, "user_id"),
        (lambda b: b.update(request_time_ms=-1), grpc.StatusCode.INVALID_ARGUMENT, 422, "request_time_ms"),
        (lambda b: b["candidates"][0].update(item_id=""), grpc.StatusCode.INVALID_ARGUMENT, 422, "candidates[0].item_id"),
        (lambda b: b["context"]["categorical"].update(nope="1"), grpc.StatusCode.INVALID_ARGUMENT, 422, "context.categorical[nope]"),
        (lambda b: b["context"]["categorical"].update(hour="3"), grpc.StatusCode.INVALID_ARGUMENT, 422, "context.categorical[hour]"),
        (lambda b: b.update(model="nope"), grpc.StatusCode.NOT_FOUND, 404, "model"),
        (lambda b: b.update(candidates=b["candidates"] * 1001), grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "candidates"),
    ],
)
def test_bad_requests_get_the_right_status_naming_the_field(stack, mutate, code, http, field):
    body = stack.request(int(stack.rows[5]), "iat")
    mutate(body)
    with pytest.raises(grpc.RpcError) as err:
        stack.grpc(body)
    assert err.value.code() == code
    assert field in err.value.details()
    rest = stack.rest(body)
    assert rest.status_code == http
    assert rest.json()["field"] == field


def test_fifty_concurrent_clients_are_all_answered_correctly(stack):
    rows = [int(r) for r in _test_rows(stack, 50, seed=3)]
    expected = {r: list(stack.grpc(stack.request(r, "iat", extra_items=20)).scores) for r in rows}
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        got = dict(zip(rows, pool.map(lambda r: list(stack.grpc(stack.request(r, "iat", extra_items=20)).scores), rows)))
    for r in rows:
        assert got[r] == pytest.approx(expected[r], abs=1e-6)


def test_history_endpoint_shows_the_truncated_sequence(stack):
    row = int(_test_rows(stack, 1, seed=4)[0])
    raw = stack.raw_by_row[row]
    response = httpx.get(f"{stack.ranking.base_url}/v1/users/{raw['user_id']}/history",
                         params={"before_ms": raw["timestamp_ms"], "limit": 5})
    body = response.json()
    assert response.status_code == 200 and body["count"] <= 5
    stamps = [i["timestamp_ms"] for i in body["instances"]]
    assert stamps == sorted(stamps, reverse=True) and all(t < raw["timestamp_ms"] for t in stamps)
    assert httpx.get(f"{stack.ranking.base_url}/v1/users/u/history", params={"before_ms": -1}).status_code == 422


def test_hot_reload_swaps_without_failed_requests_and_refuses_a_bad_artifact(stack):
    current = latest_version(stack.model_dir, "iat")
    body = stack.request(int(stack.rows[10]), "iat", extra_items=10)
    before = stack.grpc(body).model_version
    failures, versions = [], set()
    stop = False

    def hammer():
        while not stop:
            try:
                versions.add(stack.grpc(body, timeout=10).model_version)
            except grpc.RpcError as exc:  # pragma: no cover - what the test is about
                failures.append(exc)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        # A new version: same files, newer name; written elsewhere, then renamed into place.
        new_name = "29990101T000000-" + current.name.split("-")[1]  # sorts after any real version
        staging = stack.model_dir / f".staging-{new_name}"
        shutil.copytree(current, staging)
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["version"] = new_name
        (staging / "manifest.json").write_text(json.dumps(manifest))
        staging.rename(stack.model_dir / "iat" / new_name)
        deadline = time.monotonic() + 60
        while new_name not in versions and time.monotonic() < deadline:
            time.sleep(0.05)
        stop = True
        for f in futures:
            f.result()
    assert not failures, failures[:3]
    assert before in versions and new_name in versions
    assert stack.grpc(body).model_version == new_name

    # A corrupted artifact (sha256 mismatch) is refused; the good version keeps serving.
    bad_name = "29990101T000001-" + current.name.split("-")[1]
    staging = stack.model_dir / ".staging-bad"
    shutil.copytree(stack.model_dir / "iat" / new_name, staging)
    with open(staging / "model.pt", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    staging.rename(stack.model_dir / "iat" / bad_name)
    deadline = time.monotonic() + 30
    metrics = ""
    while 'outcome="refused"' not in metrics and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = httpx.get(stack.ranking.base_url + "/metrics").text
    assert 'iat_ranking_model_reloads_total{model="iat",outcome="refused"}' in metrics
    assert stack.grpc(body).model_version == new_name
