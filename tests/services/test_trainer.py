"""The online learning loop with real processes: the source service ingests MovieLens-100K
instances in time order, the trainer (`iat serve trainer`) reads them through its own consumer
group and publishes versions; the published models equal the offline time-ordered protocol's
(models.training.online.replay) on the same instances, within 1e-5, uninterrupted and after a
SIGKILL mid-run."""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from contract.artifacts import latest_version, read_manifest
from models.data.prepared import load_dataset
from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.hashing import ins_id as make_ins_id
from models.training.online import OnlineLearner, empty_like, replay
from models.training.protocol import ProtocolConfig, time_order
from services.trainer.archive import read_archive
from services.trainer.trainer import load_module
from storage.connection import EmbeddedRedis

pytestmark = pytest.mark.slow

BATCH = 64
N_BATCHES = 8
HISTORY_LIMIT = 31
LR = 2e-3  # larger than the default: the published weights move well away from the start
SEED = 3


@pytest.fixture(scope="module")
def replay_set(movielens_models):
    return replay_instances(movielens_models)


def replay_instances(movielens_models):
    """(data, rows, raw instances of those rows in time order): the first instances after the
    models' training period, of the users the models were trained on."""
    schema = load_schema("movielens-100k")
    data = load_dataset(schema, movielens_models.data_dir)
    data = data.subset_users(np.arange(min(movielens_models.max_users, data.n_users)))
    rows = time_order(data, np.flatnonzero(data.split != 0))[:BATCH * N_BATCHES]
    wanted = {int(i): k for k, i in enumerate(data.ins_id[rows])}
    raw = [None] * len(rows)
    for r in raw_instances(schema, movielens_models.data_dir):
        k = wanted.get(make_ins_id(r["request_id"], r["item_id"], r["timestamp_ms"]))
        if k is not None:
            raw[k] = r
    assert all(r is not None for r in raw)
    return data, rows, raw


def trainer_env(redis_url: str, model_dir: Path, trainer_dir: Path, **extra) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "IAT_MODEL_DIR": str(model_dir), "IAT_TRAINER_DIR": str(trainer_dir),
            "IAT_TRAINER_BATCH_SIZE": str(BATCH), "IAT_TRAINER_PUBLISH_EVERY": str(BATCH * N_BATCHES // 2),
            "IAT_TRAINER_PUBLISH_INTERVAL_S": "0", "IAT_TRAINER_FLUSH_S": "0", "IAT_TRAINER_SEED": str(SEED),
            "IAT_TRAINER_HISTORY_LIMIT": str(HISTORY_LIMIT), "IAT_TRAINER_LR": str(LR), "IAT_TORCH_THREADS": "1",
            "IAT_RELOAD_INTERVAL_S": "0", "IAT_CONSUMER_NAME": "trainer-test", **extra}


def ingest(source, instances, chunk=BATCH):
    for start in range(0, len(instances), chunk):
        response = httpx.post(source.base_url + "/v1/instances", json={"instances": instances[start:start + chunk]},
                              timeout=120)
        assert response.status_code == 200, response.text


def wait_stats(trainer, done, deadline_s=400.0) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            stats = httpx.get(trainer.base_url + "/v1/stats", timeout=30).json()
            if done(stats):
                return stats
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"trainer did not get there in {deadline_s}s; log:\n{trainer.log_tail()}")


def offline(model_dir: Path, start: dict, data, rows) -> OnlineLearner:
    torch.set_num_threads(1)
    source, _ = load_module(model_dir / "source" / start["source"])
    iat, _ = load_module(model_dir / "iat" / start["iat"])
    pcfg = ProtocolConfig(batch_fraction=0.0, history_limit=HISTORY_LIMIT, batch_size=BATCH, lr=LR)
    learner = OnlineLearner(source.source, iat.model, empty_like(data), pcfg, seed=SEED)
    return replay(learner, data, rows, BATCH)


def assert_published_equal(model_dir: Path, learner: OnlineLearner) -> None:
    for name, module in (("source", learner.source.model), ("iat", learner.downstream)):
        path = latest_version(model_dir, name)
        published, _ = load_module(path)
        inner = published.source if name == "source" else published.model
        for key, value in module.state_dict().items():
            other = inner.state_dict()[key]
            assert torch.allclose(value.float(), other.float(), atol=1e-5, rtol=0), (name, key)


@pytest.fixture
def stack(movielens_models, start_service, tmp_path):
    model_dir = tmp_path / "models"
    shutil.copytree(movielens_models.model_dir, model_dir)
    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    env = trainer_env(server.url, model_dir, tmp_path / "trainer")
    source = start_service(["serve", "source"], env=env)
    yield model_dir, env, source
    server.stop()


def test_the_online_loop_publishes_the_offline_protocols_models(stack, replay_set, start_service):
    model_dir, env, source = stack
    data, rows, raw = replay_set
    before = {n: latest_version(model_dir, n).name for n in ("source", "iat")}
    trainer = start_service(["serve", "trainer"], env=env)
    ingest(source, raw)
    stats = wait_stats(trainer, lambda s: len(s["published"]) >= 2)
    assert stats["instances"] == len(rows) and stats["steps"] == N_BATCHES
    assert [p["instances"] for p in stats["published"]] == [len(rows) // 2, len(rows)]
    assert stats["start"] == before
    # the published versions are whole, newer than the start, of the same lineage
    src = read_manifest(latest_version(model_dir, "source"))
    iat = read_manifest(latest_version(model_dir, "iat"))
    first = read_manifest(model_dir / "source" / before["source"])
    assert src.version > before["source"] and src.lineage == first.lineage and src.ordinal > first.ordinal
    assert iat.source_version == src.version and iat.source_lineage == first.lineage
    assert not list(model_dir.glob("*/.*partial"))
    learner = offline(model_dir, before, data, rows)
    assert_published_equal(model_dir, learner)
    # progressive metrics: one window over every instance, per model and task
    for model in ("source", "iat"):
        for task in data.tasks:
            assert stats["progressive"][model][task]["n"] == len(rows)
            assert abs(stats["progressive"][model][task]["logloss"]
                       - learner.progressive.metrics()[model][task]["logloss"]) < 1e-4
    metrics = httpx.get(trainer.base_url + "/metrics", timeout=30).text
    assert 'iat_progressive_auc{model="iat",task="like"}' in metrics


def test_a_trainer_killed_mid_run_resumes_to_the_same_models(stack, replay_set, start_service):
    model_dir, env, source = stack
    data, rows, raw = replay_set
    before = {n: latest_version(model_dir, n).name for n in ("source", "iat")}
    env = {**env, "IAT_TRAINER_CHECKPOINT_EVERY": str(BATCH)}
    trainer = start_service(["serve", "trainer"], env=env)
    half = len(raw) // 2
    ingest(source, raw[:half])
    wait_stats(trainer, lambda s: s["instances"] >= 2 * BATCH)
    trainer.proc.send_signal(signal.SIGSTOP)  # frozen mid-work: what is after its last checkpoint is lost at the kill
    ingest(source, raw[half:])
    trainer.kill(signal.SIGKILL)
    checkpoint = json.dumps(sorted(p.name for p in (Path(env["IAT_TRAINER_DIR"])).iterdir()))
    assert "checkpoint.pt" in checkpoint
    again = start_service(["serve", "trainer"], env=env)
    stats = wait_stats(again, lambda s: s["instances"] >= len(rows) and len(s["published"]) >= 2)
    assert stats["instances"] == len(rows) and stats["steps"] == N_BATCHES  # nothing trained twice
    assert_published_equal(model_dir, offline(model_dir, before, data, rows))
    # the archive (full history, not in Redis) holds every trained instance once, in order
    archive = read_archive(Path(env["IAT_TRAINER_DIR"]) / "archive")
    assert archive["ins_id"].tolist() == data.ins_id[rows].tolist()
    assert np.array_equal(archive["labels"], data.labels[rows]) and np.array_equal(archive["cat"], data.cat[rows])


def test_late_labels_are_joined_and_a_closed_window_trains_as_negatives(stack, replay_set, start_service):
    """Exposures ingested without labels: those labelled later (POST /v1/labels) are trained
    with their labels; those whose window closes unlabelled are trained as 0 and counted."""
    from models.training.online import load_state

    model_dir, env, source = stack
    _, _, raw = replay_set
    labelled, unlabelled = raw[:BATCH // 2], raw[BATCH // 2:BATCH]
    stamps = [r["timestamp_ms"] for r in raw[:BATCH]]
    window_s = (max(stamps) - min(stamps)) // 1000 + 3600  # no window closes within the batch itself
    env = {**env, "IAT_LABEL_WINDOW_S": str(window_s), "IAT_TRAINER_PUBLISH_EVERY": str(BATCH)}
    trainer = start_service(["serve", "trainer"], env=env)
    response = httpx.post(source.base_url + "/v1/instances",
                          json={"instances": [dict(r, labels={}) for r in labelled + unlabelled]}, timeout=120)
    assert response.status_code == 200, response.text
    ids = response.json()["ins_ids"]
    updates = [{"user_id": r["user_id"], "ins_id": i, "labels": r["labels"], "arrival_ms": r["timestamp_ms"] + 1000}
               for r, i in zip(labelled, ids)]
    response = httpx.post(source.base_url + "/v1/labels", json={"updates": updates}, timeout=120)
    assert response.status_code == 200 and response.json()["refused"] == 0, response.text
    # the labelled half is ready (a partial batch: no flush), the other half waits for its window
    ready = wait_stats(trainer, lambda s: s["waiting"] == BATCH // 2 and s["buffered"] == BATCH // 2)
    assert ready["instances"] == 0
    # an instance a window after the last: the partition's event time passes every window
    later = dict(raw[BATCH], request_id="closing-the-windows", labels={},
                 timestamp_ms=max(stamps) + (window_s + 1) * 1000)
    assert httpx.post(source.base_url + "/v1/instances", json={"instances": [later]}, timeout=120).status_code == 200
    wait_stats(trainer, lambda s: s["instances"] == BATCH and len(s["published"]) == 1)
    state = load_state((Path(env["IAT_TRAINER_DIR"]) / "checkpoint.pt").read_bytes())
    cols = state["log"]["cols"]
    trained = {int(i): row for i, row in zip(cols["ins_id"], cols["labels"])}
    tasks = list(read_manifest(latest_version(model_dir, "source")).tasks)
    for r, i in zip(labelled + unlabelled, ids):
        expected = [float(r["labels"][t]) for t in tasks] if r in labelled else [0.0] * len(tasks)
        assert trained[int(i)].tolist() == expected
    metrics = httpx.get(trainer.base_url + "/metrics", timeout=30).text
    for task in tasks:
        assert f'iat_trainer_defaulted_labels_total{{task="{task}"}} {float(len(unlabelled))}' in metrics
