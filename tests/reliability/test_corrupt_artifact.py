"""A corrupted model artifact (sha256 mismatch with its manifest) is never loaded, through the
real services at start-up. The hot-reload case (a bad new version refused while the old one keeps
serving) is in tests/services/test_ranking_e2e.py::test_hot_reload_swaps_without_failed_requests_and_refuses_a_bad_artifact.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grpc
import httpx
import pytest
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from models.runtime.loader import latest_version
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _corrupt_copy(version_dir, new_name):
    """A newer version of the same model whose weights no longer match the manifest."""
    bad = version_dir.parent / new_name
    shutil.copytree(version_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = new_name
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for name in manifest["files"]:
        if name.endswith(".pt"):
            with open(bad / name, "r+b") as fh:
                fh.seek(200)
                fh.write(b"\xde\xad\xbe\xef")
    return bad


@pytest.fixture
def model_dir(movielens_models, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(movielens_models.model_dir, target)
    return target


def test_ranking_starts_on_the_newest_good_version_when_the_newest_is_corrupted(model_dir, redis_server, start_service):
    good = latest_version(model_dir, "iat")
    bad = _corrupt_copy(good, "29990101T000000-" + good.name.split("-")[1])
    assert latest_version(model_dir, "iat") == bad
    grpc_port = free_port()
    ranking = start_service(["serve", "ranking", "--grpc-port", str(grpc_port)],
                            env={"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(model_dir), "IAT_RELOAD_INTERVAL_S": "0.2"})
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = ranking_pb2_grpc.RankingServiceStub(channel).Score(ranking_pb2.ScoreRequest(
            user_id="1", request_time_ms=880000000000, model="iat", candidates=[ranking_pb2.Candidate(item_id="5")]),
            timeout=10)
    assert reply.model_version == good.name  # the corrupted newer version was never loaded
    metrics = httpx.get(ranking.base_url + "/metrics").text
    assert 'iat_ranking_model_reloads_total{model="iat",outcome="refused"} 1.0' in metrics
    assert httpx.get(ranking.base_url + "/readyz").status_code == 200
    log = ranking.log_path.read_text()
    assert "sha256 mismatch" in log and bad.name in log
    # Reload passes do not retry the refused version over and over.
    import time
    time.sleep(1.0)
    assert 'iat_ranking_model_reloads_total{model="iat",outcome="refused"} 1.0' in httpx.get(ranking.base_url + "/metrics").text


def test_ranking_with_only_a_corrupted_version_serves_the_others_and_says_not_found(model_dir, redis_server, start_service):
    good = latest_version(model_dir, "iat")
    _corrupt_copy(good, "29990101T000000-" + good.name.split("-")[1])
    shutil.rmtree(good)
    grpc_port = free_port()
    start_service(["serve", "ranking", "--grpc-port", str(grpc_port)],
                  env={"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(model_dir), "IAT_RELOAD_INTERVAL_S": "0"})
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        request = ranking_pb2.ScoreRequest(user_id="1", request_time_ms=880000000000, model="iat",
                                           candidates=[ranking_pb2.Candidate(item_id="5")])
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        request.model = "sif"
        assert stub.Score(request, timeout=10).model == "sif"


def test_source_refuses_to_start_on_a_corrupted_source_model(model_dir, redis_server):
    good = latest_version(model_dir, "source")
    _corrupt_copy(good, "29990101T000000-" + good.name.split("-")[1])
    shutil.rmtree(good)  # the source service serves the newest only: no silent fallback for writes
    env = {**os.environ, "REDIS_URL": redis_server, "IAT_MODEL_DIR": str(model_dir)}
    iat = [sys.executable, "-c", "from cli import main; raise SystemExit(main())"]
    done = subprocess.run(iat + ["serve", "source", "--port", str(free_port())], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "sha256 mismatch" in done.stderr, done.stderr[-2000:]
