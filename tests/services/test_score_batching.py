"""Cross-request batching over real gRPC: concurrent Scores share forwards and get the scores
each would get alone.

Two real ``iat serve ranking`` processes on one real Redis holding users with 0 to 60 stored
records (the model reads at most its L): one batching (IAT_SCORE_BATCH_WAIT_MS), one not. A burst of concurrent Score calls for
different users and candidate counts, plus one bad request, is sent to both: every good call's
scores equal the unbatched process's within 1e-5, in the request's candidate order, with its own
history length; the bad call fails alone with its own error; and the batching process's
``iat_ranking_score_batch_requests`` histogram shows forwards that held several requests.
"""
from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
from iat.ranking.v1 import ranking_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from harness.bench_ranking import (
    REQUEST_TIME_MS,
    MovieLensWorkload,
    seed_histories,
    to_proto,
)
from models.runtime.loader import latest_version, load_ranking_model
from services.config import Settings
from tests.conftest import free_port

HISTORIES = (0, 3, 17, 60)
COUNTS = (7, 120, 1, 300, 33, 64, 2, 150)


@pytest.fixture(scope="module")
def stack(movielens_models, redis_server, start_module_service):
    model = load_ranking_model(latest_version(movielens_models.model_dir, "iat"), "torchscript", "cpu")
    if not model.batches_requests:
        pytest.skip("the export under IAT_TEST_MODEL_DIR predates score_users: export it again")
    users = seed_histories(movielens_models.model_dir, redis_server, list(HISTORIES), Settings(redis_url=redis_server))
    env = {"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(movielens_models.model_dir),
           "IAT_RELOAD_INTERVAL_S": "0", "IAT_RUNTIME": "torchscript"}
    out = {"users": users, "workload": MovieLensWorkload(movielens_models.data_dir), "max_history": model.max_history}
    for name, extra in (("batched", {"IAT_SCORE_BATCH_WAIT_MS": "300"}), ("alone", {})):
        port = free_port()
        process = start_module_service(["serve", "ranking", "--grpc-port", str(port)], env={**env, **extra})
        process.wait("/readyz", timeout_s=120)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        out[name] = (process, ranking_pb2_grpc.RankingServiceStub(channel))
    yield out


def _batch_histogram(process) -> tuple[float, float]:
    """(forwards, requests in them) of the cross-request batcher so far."""
    text = httpx.get(process.base_url + "/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("iat_ranking_score_batch_requests_count", "iat_ranking_score_batch_requests_sum"):
                values[sample.name] = sample.value
    return (values.get("iat_ranking_score_batch_requests_count", 0.0),
            values.get("iat_ranking_score_batch_requests_sum", 0.0))


def _burst(stub, messages):
    """Every call in flight at once; (response or RpcError) per message, in order."""
    futures = [stub.Score.future(m, timeout=120) for m in messages]
    out = []
    for f in futures:
        try:
            out.append(f.result())
        except grpc.RpcError as err:
            out.append(err)
    return out


def test_concurrent_scores_are_batched_and_equal_scoring_alone(stack):
    workload, users = stack["workload"], stack["users"]
    rng = np.random.default_rng(5)
    context_user = workload.user_ids[0]
    messages, lengths = [], []
    for k, c in enumerate(COUNTS):
        n = HISTORIES[k % len(HISTORIES)]
        body = workload.request(users[n], REQUEST_TIME_MS, c, rng, context_user=context_user, request_id=f"r{k}")
        messages.append(to_proto(body))
        lengths.append(min(n, stack["max_history"]))
    bad = to_proto(workload.request(users[17], REQUEST_TIME_MS, 5, rng, context_user=context_user))
    bad.candidates[2].features.categorical["no_such_feature"] = "x"
    messages.insert(3, bad)

    batched_process, batched = stack["batched"]
    _, alone = stack["alone"]
    expected = _burst(alone, messages)
    assert isinstance(expected[3], grpc.RpcError)
    good = [k for k in range(len(messages)) if k != 3]

    # A loaded machine may spread a burst over several waits: send it again until a forward
    # has held several requests (generous deadline, no timing asserted).
    deadline = time.monotonic() + 300
    before = _batch_histogram(batched_process)
    while True:
        got = _burst(batched, messages)
        assert isinstance(got[3], grpc.RpcError)
        assert got[3].code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_feature" in got[3].details()
        assert got[3].code() == expected[3].code() and got[3].details() == expected[3].details()
        for k in good:
            assert not isinstance(got[k], grpc.RpcError), got[k]
            assert got[k].request_id == messages[k].request_id
            assert got[k].history_length == lengths[good.index(k)]
            np.testing.assert_allclose(np.array(got[k].scores), np.array(expected[k].scores),
                                       atol=1e-5, rtol=0, err_msg=f"request {k}")
            assert len(got[k].scores) == len(messages[k].candidates) * len(got[k].tasks)
        forwards, requests = _batch_histogram(batched_process)
        if requests - before[1] > forwards - before[0]:
            break  # some forward held at least two requests
        assert time.monotonic() < deadline, "no forward ever held two requests"
    # the scores differ between requests: the batch did not hand one request's rows to another
    assert not np.allclose(np.array(got[0].scores)[:2], np.array(got[1].scores)[:2], atol=1e-4)
