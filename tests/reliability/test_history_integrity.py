"""What an InsEmb depends on, what a history read returns, and a store that must not evict
(issue 14, items 3-5), against real service processes and real redis-servers.

- InsEmbs are a function of the instance and the user's earlier STORED instances only: the same
  instances, in the same arrival order (out of order across batches), give byte-identical
  records whether the sequencer keeps up or does not run at all.
- The history read returns the newest L usable records strictly before T, reaching back past
  expired records (out-of-order arrival, short retention) and records of another source-model
  version; the history endpoint shows exactly what Score uses and marks the rest.
- A redis-server with an evicting maxmemory-policy is refused at start-up and by readiness,
  unless IAT_ALLOW_EVICTING_REDIS overrides; the store's memory is exported.
"""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from contract.lineage import SourceLineage
from harness.processes import ServiceProcess, free_port
from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.hashing import ins_id
from models.runtime.loader import latest_version
from storage.connection import EmbeddedRedis, connect
from storage.instance_store import InstanceStore
from storage.records import InstanceRecord
from storage.stream import InstanceStream

BASE_MS = 880_000_000_000
USER_FEATURES = ("age", "gender", "occupation", "zip_code")


@pytest.fixture(scope="module")
def raw(movielens_models):
    return raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)


def _post(url, batch):
    response = httpx.post(url + "/v1/instances", json={"instances": batch}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == len(batch)


def _wait(condition, what, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _sequenced(client):
    stream = InstanceStream(client)
    return stream.lag() == 0 and stream.pending_count() == 0


def _snapshot(client):
    records = {k: client.get(k) for k in client.scan_iter(match="iat:ins:*", count=5000)}
    sequences = {k: client.zrange(k, 0, -1, withscores=True) for k in client.scan_iter(match="iat:seq:*", count=5000)}
    return records, sequences


def _answers(process):
    try:
        return httpx.get(process.base_url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _metric(text, name, labels):
    match = re.search(re.escape(name) + r"\{" + re.escape(labels) + r"\} ([0-9.e+]+)", text)
    return float(match.group(1)) if match else 0.0


# ---- item 3: InsEmbs do not depend on the sequencer's lag --------------------------------------


def test_insembs_do_not_depend_on_sequencer_lag(movielens_models, raw, tmp_path, start_service):
    users = list(dict.fromkeys(r["user_id"] for r in raw))[:5]
    instances = [r for u in users for r in [x for x in raw if x["user_id"] == u][:30]]  # each in time order
    batches = [instances[i:i + 10] for i in range(0, len(instances), 10)]
    random.Random(14).shuffle(batches)  # arrival out of order across batches, the same in both runs
    env = {"IAT_MODEL_DIR": str(movielens_models.model_dir), "IAT_SEQUENCER_BATCH_SIZE": "20"}

    caught_up = EmbeddedRedis(directory=tmp_path / "caught-up").start()
    lagging = EmbeddedRedis(directory=tmp_path / "lagging").start()
    try:
        a, b = connect(caught_up.url, cluster=False), connect(lagging.url, cluster=False)
        start_service(["serve", "sequencer"], env={**env, "REDIS_URL": caught_up.url})
        source = start_service(["serve", "source"], env={**env, "REDIS_URL": caught_up.url})
        for batch in batches:  # the sequencer catches up after every batch
            _post(source.base_url, batch)
            _wait(lambda: _sequenced(a), "sequencer did not catch up")
        source.stop()
        source = start_service(["serve", "source"], env={**env, "REDIS_URL": lagging.url})
        for batch in batches:  # no sequencer at all: the stream is never read
            _post(source.base_url, batch)
        assert InstanceStream(b).lag() == len(instances)  # nothing was sequenced here

        records_a, sequences_a = _snapshot(a)
        records_b, sequences_b = _snapshot(b)
        assert len(records_a) == len(instances)
        assert records_a.keys() == records_b.keys()
        differing = [k for k in records_a if records_a[k] != records_b[k]]
        assert not differing, f"{len(differing)} of {len(records_a)} records differ with the sequencer lagging"
        assert sequences_a == sequences_b  # the ingest wrote every sequence itself
        a.close(), b.close()
    finally:
        caught_up.stop()
        lagging.stop()


# ---- item 4: the history read reaches back past unusable records -------------------------------


def _switched_model_dir(model_dir: Path, root: Path) -> tuple[Path, object]:
    """A model dir whose newest source model is a new version of a new architecture (the same
    weights under another name and lineage): what a source-model roll-out that the rankers may
    not read looks like to the services. Returns the dir and what accepts the new records (its
    lineage; its version for an artifact without lineage)."""
    switched = root / "models-switched"
    (switched / "source").mkdir(parents=True)
    for name in ("iat", "sif"):
        (switched / name).symlink_to(model_dir / name)
    current = latest_version(model_dir, "source")
    (switched / "source" / current.name).symlink_to(current)
    new_name = "29990101T000000-" + current.name.split("-")[1]  # sorts after any real version
    new = switched / "source" / new_name
    new.mkdir()
    for f in current.iterdir():
        if f.name != "manifest.json":
            (new / f.name).symlink_to(f)
    manifest = json.loads((current / "manifest.json").read_text())
    if manifest.get("lineage"):  # a retrain of the same lineage would be read: a new architecture
        manifest["lineage"] += "-rearchitected"
    (new / "manifest.json").write_text(json.dumps({**manifest, "version": new_name}))
    accepts = SourceLineage(manifest["lineage"], 0) if manifest.get("lineage") else new_name
    return switched, accepts


def _score_body(template, user_id, request_time_ms):
    context = {k: template["features"]["categorical"][k] for k in USER_FEATURES}
    return {"request_id": "h", "user_id": user_id, "request_time_ms": request_time_ms, "model": "iat",
            "context": {"categorical": context, "numeric": {}},
            "candidates": [{"item_id": str(1 + i)} for i in range(3)]}


def test_history_reaches_back_past_expired_and_other_version_records(movielens_models, raw, tmp_path, start_service):
    model_dir = movielens_models.model_dir
    manifest = json.loads((latest_version(model_dir, "iat") / "manifest.json").read_text())
    L = int(manifest["max_history"])
    user = raw[0]["user_id"]
    mine = [r for r in raw if r["user_id"] == user]

    def make(tag, n, start_ms):  # n valid instances of the user at chosen times
        return [{**mine[i % len(mine)], "request_id": f"{tag}-{i}", "timestamp_ms": start_ms + 1000 * i}
                for i in range(n)]

    old, mid = make("old", L // 2, BASE_MS), make("mid", L // 2 + 4, BASE_MS + 10**8)
    new, newer = make("new", L // 2, BASE_MS + 2 * 10**8), make("v2", L // 2, BASE_MS + 3 * 10**8)
    request_ms = BASE_MS + 4 * 10**8

    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    try:
        client = connect(server.url, cluster=False)
        env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(model_dir), "IAT_RELOAD_INTERVAL_S": "0"}
        start_service(["serve", "sequencer"], env=env)
        ranking = start_service(["serve", "ranking", "--grpc-port", str(free_port())], env=env)
        keeping = start_service(["serve", "source"], env=env)
        short = start_service(["serve", "source"], env={**env, "IAT_RETENTION_DAYS": str(3 / 86_400)})  # 3 s
        for source, batch in ((keeping, old), (short, new), (keeping, mid)):
            # `new` are the newest and kept 3 s; `mid` arrive after them, out of order (older)
            _post(source.base_url, batch)
            _wait(lambda: _sequenced(client), "sequencer did not catch up")
        store = InstanceStore(client)

        def key(r):
            return store.record_key(user, ins_id(r["request_id"], r["item_id"], r["timestamp_ms"]))

        _wait(lambda: not any(client.exists(key(r)) for r in new), "short-retention records did not expire")
        live = sorted(old + mid, key=lambda r: r["timestamp_ms"], reverse=True)
        assert all(client.exists(key(r)) for r in live)
        assert store.sequence_length(user) == len(old) + len(mid) + len(new)  # `new` now dangling
        expected = [str(ins_id(r["request_id"], r["item_id"], r["timestamp_ms"])) for r in live[:L]]

        def history():
            response = httpx.get(f"{ranking.base_url}/v1/users/{user}/history",
                                 params={"before_ms": request_ms, "model": "iat"}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        def history_length():
            response = httpx.post(ranking.base_url + "/v1/score", json=_score_body(mine[0], user, request_ms), timeout=30)
            assert response.status_code == 200, response.text
            return response.json()["history_length"]

        shown, used = history(), history_length()  # the first read removes the dangling members
        assert len(live) > L and used == L  # not L - len(new): the read reached back past them
        assert shown["count"] == used and shown["limit"] == L
        assert [i["ins_id"] for i in shown["instances"]] == expected  # the newest L live ones
        assert [s["reason"] for s in shown["skipped"]] == ["missing"] * len(new)
        assert store.sequence_length(user) == len(old) + len(mid)  # dangling members removed
        metrics = httpx.get(ranking.base_url + "/metrics").text
        assert _metric(metrics, "iat_ranking_history_skipped_total", 'reason="missing"') == len(new)

        # A roll-out of a new source architecture (a new lineage): its records are the newest; the
        # iat model still reads its own source lineage, further back, and gets a full history.
        switched_dir, new_source = _switched_model_dir(model_dir, tmp_path)
        short.stop()
        rolled = start_service(["serve", "source"], env={**env, "IAT_MODEL_DIR": str(switched_dir)})
        _post(rolled.base_url, newer)
        _wait(lambda: _sequenced(client), "sequencer did not catch up")
        assert store.read_history_raw(user, request_ms, L, new_source)[0] == len(newer)  # stored as the new source
        shown, used = history(), history_length()
        assert used == L  # not L - len(newer): the version filter reached back
        assert shown["count"] == used and [i["ins_id"] for i in shown["instances"]] == expected
        assert [s["reason"] for s in shown["skipped"]] == ["version_mismatch"] * len(newer)
        metrics = httpx.get(ranking.base_url + "/metrics").text
        assert _metric(metrics, "iat_ranking_history_skipped_total", 'reason="version_mismatch"') == 2 * len(newer)
        client.close()
    finally:
        server.stop()


def test_store_read_is_bounded_and_explains_skips(redis_client):
    """The read on the real store alone: the bound on members examined, cleaning, and the order."""
    writer = InstanceStore(redis_client, dim=4, tasks=("like",), retention_days=None)
    reader = InstanceStore(redis_client, dim=4, tasks=("like",), source_version="v1", scan_factor=2)

    def rec(i, version):
        return InstanceRecord(ins_id=i, user_id="u", timestamp_ms=1000 + i, embedding=np.full(4, i, np.float32),
                              labels={"like": i % 2}, source_version=version)

    writer.write_and_append([rec(i, "v1") for i in range(10)] + [rec(i, "v2") for i in range(10, 16)])
    redis_client.delete(*(writer.record_key("u", i) for i in (8, 9)))  # expired
    h = reader.read_history("u", 10**6, 4, explain=True)
    # Newest first: 15..10 are v2, 9 and 8 missing; a bound of 2 x 4 members stops right there.
    assert len(h) == 0 and h.version_mismatch == 6 and h.missing == 2
    assert [(s.ins_id, s.reason) for s in h.skipped] == [(i, "version_mismatch") for i in range(15, 9, -1)] + [
        (9, "missing"), (8, "missing")]
    assert reader.sequence_length("u") == 14  # the two dangling members are gone
    h = reader.read_history("u", 10**6, 4)  # 8 members examined: 6 of v2, then 7 and 6
    assert h.ins_ids.tolist() == [7, 6] and h.version_mismatch == 6 and h.missing == 0
    for factor, got in ((1, []), (4, [7, 6, 5, 4])):
        store = InstanceStore(redis_client, dim=4, tasks=("like",), source_version="v1", scan_factor=factor)
        assert store.read_history("u", 10**6, 4).ins_ids.tolist() == got
    # A record stored again under the same version is kept as first written; another version replaces it.
    assert writer.write_and_append([rec(7, "v1")], keep_stored=True) == (0, 1)
    v3 = InstanceRecord(ins_id=7, user_id="u", timestamp_ms=1007, embedding=np.zeros(4), source_version="v3")
    assert writer.write_and_append([v3], keep_stored=True) == (1, 0)
    assert writer.write_and_append([v3]) == (1, 0)  # without keep_stored: always written


# ---- item 5: an evicting store is refused ---------------------------------------------------


def test_evicting_policy_refused_unless_allowed(movielens_models, tmp_path, start_service):
    server = EmbeddedRedis(directory=tmp_path / "redis",
                           extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]).start()
    try:
        client = connect(server.url, cluster=False)
        env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(movielens_models.model_dir), "IAT_RELOAD_INTERVAL_S": "0"}
        for n, args in enumerate((["serve", "sequencer"], ["serve", "source"],
                                  ["serve", "ranking", "--grpc-port", str(free_port())])):
            process = ServiceProcess(args, log_path=tmp_path / f"refused-{n}.log", env=env)
            try:
                _wait(lambda: process.proc.poll() is not None or _answers(process), f"{args} neither exited nor started")
                assert process.proc.poll() not in (None, 0), f"{args} started on an evicting store"
            finally:
                process.stop()
            log = process.log_path.read_text()
            assert "maxmemory-policy allkeys-lru" in log and "IAT_ALLOW_EVICTING_REDIS" in log, log[-2000:]

        allowed = start_service(["serve", "sequencer"], env={**env, "IAT_ALLOW_EVICTING_REDIS": "true"})
        ready = httpx.get(allowed.base_url + "/readyz", timeout=10)
        assert ready.status_code == 200 and "allowed by IAT_ALLOW_EVICTING_REDIS" in ready.json()["checks"]["store"]["detail"]
        metrics = httpx.get(allowed.base_url + "/metrics", timeout=10).text
        assert re.search(r'iat_store_maxmemory_bytes\{node="[^"]+"\} 6\.7108864e\+07', metrics), metrics
        used = re.search(r'iat_store_used_memory_bytes\{node="[^"]+"\} ([0-9.e+]+)', metrics)
        assert used and float(used.group(1)) > 0

        # Readiness follows the policy at run time; volatile-* is refused too (records carry TTLs).
        client.config_set("maxmemory-policy", "noeviction")
        strict = start_service(["serve", "sequencer"], env=env)
        assert httpx.get(strict.base_url + "/readyz", timeout=10).status_code == 200
        client.config_set("maxmemory-policy", "volatile-lru")
        ready = httpx.get(strict.base_url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "maxmemory-policy volatile-lru" in ready.json()["checks"]["store"]["detail"]
        client.config_set("maxmemory-policy", "noeviction")
        assert httpx.get(strict.base_url + "/readyz", timeout=10).status_code == 200
        client.close()
    finally:
        server.stop()


def test_store_memory_on_every_cluster_primary(cluster_client, redis_cluster):
    """The policy check and the memory gauges cover every primary of a cluster, sync and asyncio."""
    import asyncio

    from storage.connection import (
        EvictingStoreError,
        check_no_eviction,
        check_no_eviction_async,
        connect_async,
    )

    memories = check_no_eviction(cluster_client)
    assert len(memories) == 3 and all(m.policy == "noeviction" and m.used_memory > 0 for m in memories)
    node = cluster_client.get_primaries()[1]
    cluster_client.config_set("maxmemory-policy", "volatile-ttl", target_nodes=node)
    try:
        with pytest.raises(EvictingStoreError, match=f"{node.name} has maxmemory-policy volatile-ttl"):
            check_no_eviction(cluster_client)
        assert len(check_no_eviction(cluster_client, allow=True)) == 3

        async def main():
            client = await connect_async(redis_cluster)
            try:
                with pytest.raises(EvictingStoreError, match="volatile-ttl"):
                    await check_no_eviction_async(client)
            finally:
                await client.aclose()

        asyncio.run(main())
    finally:
        cluster_client.config_set("maxmemory-policy", "noeviction", target_nodes=node)
