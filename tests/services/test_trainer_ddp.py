"""Two trainer processes training together with DDP (issue 17, "scale out"), real processes on
the 3-master cluster: the source service ingests MovieLens-100K instances into a stream of 2
partitions, rank r trains partition r (its users only), the gradients are all-reduced by
DistributedDataParallel, and rank 0 publishes. After the run both ranks took the same steps,
hold bitwise equal weights, and the published version is those weights, loads and scores.
A rank SIGKILLed ends the job (its peer exits too); the restarted job resumes from the newest
checkpoint both ranks hold, trains nothing twice and keeps the ranks equal."""
from __future__ import annotations

import concurrent.futures
import shutil
import signal
import time

import httpx
import numpy as np
import pytest
import torch

from contract.artifacts import latest_version
from contract.history import History
from harness.processes import ServiceProcess
from models.runtime.loader import load_ranking_model
from models.training.online import load_state
from services.trainer.trainer import JOB_RESTART_EXIT, load_module
from storage.connection import EmbeddedRedis
from storage.stream import partition_of
from tests.conftest import free_port
from tests.services.test_trainer import (
    BATCH,
    N_BATCHES,
    ingest,
    replay_instances,
    trainer_env,
)

pytestmark = pytest.mark.slow

WORLD = 2


@pytest.fixture(scope="module")
def replay_set(movielens_models):
    return replay_instances(movielens_models)


@pytest.fixture
def trainers(tmp_path):
    procs: list[ServiceProcess] = []

    def start(envs: list[dict[str, str]]) -> list[ServiceProcess]:
        # all ranks at once: each waits in the rendezvous for the others before it serves HTTP
        for k, env in enumerate(envs):
            procs.append(ServiceProcess(["serve", "trainer"], log_path=tmp_path / f"trainer-{k}.log", env=env))
        with concurrent.futures.ThreadPoolExecutor(len(envs)) as pool:
            return list(pool.map(lambda p: p.wait("/healthz", timeout_s=300), procs[-len(envs):]))

    yield start
    for p in procs:
        p.stop()


def rank_envs(env: dict[str, str]) -> list[dict[str, str]]:
    """The environments of the WORLD ranks of one job (a fresh rendezvous port)."""
    url = f"tcp://127.0.0.1:{free_port()}"
    return [{**env, "IAT_TRAINER_RANK": str(r), "IAT_TRAINER_DIST_URL": url} for r in range(WORLD)]


def stats_of(trainer: ServiceProcess) -> dict | None:
    try:
        return httpx.get(trainer.base_url + "/v1/stats", timeout=30).json()
    except httpx.HTTPError:
        return None


def wait_all(trainers: list[ServiceProcess], done, deadline_s: float = 900.0) -> list[dict]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        stats = [stats_of(t) for t in trainers]
        if all(s is not None for s in stats) and done(stats):
            return stats
        for t in trainers:
            if t.proc.poll() is not None:
                raise AssertionError(f"a trainer exited ({t.proc.returncode}):\n{t.log_tail()}")
        time.sleep(0.5)
    raise AssertionError("the trainers did not get there in time; logs:\n"
                         + "\n---\n".join(t.log_tail() for t in trainers))


def test_two_ddp_trainers_train_their_own_partitions_in_lockstep_to_equal_weights(
        movielens_models, replay_set, redis_cluster, cluster_client, start_service, trainers, tmp_path):
    data, rows, raw = replay_set
    total = len(rows)
    model_dir = tmp_path / "models"
    shutil.copytree(movielens_models.model_dir, model_dir)
    before = {n: latest_version(model_dir, n).name for n in ("source", "iat")}
    trainer_dir = tmp_path / "trainer"
    env = {**trainer_env(redis_cluster, model_dir, trainer_dir), "IAT_STREAM_PARTITIONS": str(WORLD),
           "IAT_TRAINER_PUBLISH_EVERY": str(total), "IAT_TRAINER_CHECKPOINT_EVERY": str(2 * BATCH),
           "IAT_TRAINER_FLUSH_S": "1", "IAT_TRAINER_WORLD_SIZE": str(WORLD)}
    source = start_service(["serve", "source"], env=env)
    ranks = trainers(rank_envs(env))
    assert [(s or {}).get("rank") for s in map(stats_of, ranks)] == list(range(WORLD))
    ingest(source, raw)

    stats = wait_all(ranks, lambda s: sum(x["instances"] for x in s) >= total and s[0]["published"]
                     and s[0]["published"][-1]["instances"] >= total)
    assert sum(s["instances"] for s in stats) == total  # each instance trained once, by one rank
    assert [s["rank"] for s in stats] == list(range(WORLD)) and all(s["world"] == WORLD for s in stats)
    assert [s["partitions"] for s in stats] == [[r] for r in range(WORLD)]
    assert all(0 < s["instances"] < total for s in stats), [s["instances"] for s in stats]
    # lockstep: the same number of steps, at least the fuller rank's batches
    assert stats[0]["steps"] == stats[1]["steps"] >= max(-(-s["instances"] // BATCH) for s in stats)
    assert stats[0]["steps"] < N_BATCHES * WORLD  # ranks step together, not one after the other

    # every rank checkpointed the same (last) step; its log holds only its own partition's users
    checkpoints = [sorted((trainer_dir / f"rank-{r}").glob("checkpoint-*.pt")) for r in range(WORLD)]
    assert [[p.name for p in c] for c in checkpoints] == [[f"checkpoint-{stats[0]['steps']:09d}.pt"]] * WORLD
    states = [load_state(c[-1].read_bytes()) for c in checkpoints]
    users: list[set[str]] = []
    for r, state in enumerate(states):
        users.append(set(state["log"]["user_ids"]))
        assert state["log"]["n"] == stats[r]["instances"]
        assert {partition_of(u, WORLD) for u in users[r]} == {r}
    assert users[0].isdisjoint(users[1])
    assert users[0] | users[1] == {str(u) for u in data.user_ids[data.user_index[rows]]}

    # DDP kept the weights equal, bitwise, on both ranks; rank 0 published exactly them
    for name in ("source", "iat"):
        a, b = states[0]["learner"][name], states[1]["learner"][name]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        published, _ = load_module(latest_version(model_dir, name))
        inner = (published.source if name == "source" else published.model).state_dict()
        assert all(torch.equal(a[k], inner[k]) for k in a), name
    assert stats[1]["published"][-1]["versions"] == {}  # rank 1 publishes nothing
    assert latest_version(model_dir, "iat").name > before["iat"]

    # the published version loads (sha256 checked) and scores
    model = load_ranking_model(latest_version(model_dir, "iat"), runtime="torchscript", device="cpu")
    rng = np.random.default_rng(0)
    hist = History(rng.standard_normal((5, model.embedding_dim)).astype(np.float32),
                   np.zeros((5, len(model.tasks)), np.int8), rng.integers(0, 100, 5),
                   np.arange(5, dtype=np.int64)[::-1] + 1_000)
    spec = model.feature_spec
    n_cat, n_multi, m, n_num = len(spec.cat_fields), len(spec.multi_fields), spec.max_multi, len(spec.num_fields)
    probs = model.score(hist, 10_000, rng.integers(0, 100, (7, n_cat)), np.full((7, n_multi, m), -1),
                        np.zeros((7, n_num), np.float32))
    assert probs.shape == (7, len(model.tasks)) and np.all((probs > 0) & (probs < 1))


def test_a_rank_killed_ends_the_job_and_the_restarted_job_resumes_from_the_common_checkpoint(
        movielens_models, replay_set, start_service, trainers, tmp_path):
    _, rows, raw = replay_set
    total = len(rows)
    model_dir = tmp_path / "models"
    shutil.copytree(movielens_models.model_dir, model_dir)
    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    try:
        trainer_dir = tmp_path / "trainer"
        env = {**trainer_env(server.url, model_dir, trainer_dir), "IAT_STREAM_PARTITIONS": str(WORLD),
               "IAT_TRAINER_PUBLISH_EVERY": str(total), "IAT_TRAINER_CHECKPOINT_EVERY": str(2 * BATCH),
               "IAT_TRAINER_FLUSH_S": "1", "IAT_TRAINER_WORLD_SIZE": str(WORLD), "IAT_TRAINER_DIST_TIMEOUT_S": "60"}
        source = start_service(["serve", "source"], env=env)
        ranks = trainers(rank_envs(env))
        ingest(source, raw[:total // 2])
        wait_all(ranks, lambda s: all(x["trained"] >= 2 * BATCH for x in s))
        ranks[1].kill(signal.SIGKILL)
        end = time.monotonic() + 300
        while ranks[0].proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        assert ranks[0].proc.returncode == JOB_RESTART_EXIT, ranks[0].log_tail()  # the peer's loss ends the job
        ingest(source, raw[total // 2:])
        again = trainers(rank_envs(env))
        stats = wait_all(again, lambda s: sum(x["instances"] for x in s) >= total and s[0]["published"]
                         and s[0]["published"][-1]["instances"] >= total)
        assert sum(s["instances"] for s in stats) == total  # resumed at a common step: nothing trained twice
        assert stats[0]["steps"] == stats[1]["steps"]
        states = [load_state(max((trainer_dir / f"rank-{r}").glob("checkpoint-*.pt")).read_bytes())
                  for r in range(WORLD)]
        for name in ("source", "iat"):
            a, b = states[0]["learner"][name], states[1]["learner"][name]
            assert all(torch.equal(a[k], b[k]) for k in a), name
    finally:
        server.stop()
