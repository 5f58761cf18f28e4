"""Raw instances consumed from a Redis stream instead of HTTP: same records, bad entries skipped."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from models.data.raw import raw_instances
from models.data.schema import load_schema
from models.runtime.hashing import ins_id
from storage.connection import EmbeddedRedis, connect
from storage.instance_store import InstanceStore
from storage.stream import InstanceStream

pytestmark = pytest.mark.slow
RAW = "iat:raw-instances"


def test_source_consumes_raw_instances_from_a_stream(movielens_models, tmp_path, start_service):
    server = EmbeddedRedis(directory=tmp_path / "redis").start()
    try:
        client = connect(server.url, cluster=False)
        instances = raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)[:300]
        pipe = client.pipeline(transaction=False)
        for k, inst in enumerate(instances):
            pipe.xadd(RAW, {"instance": json.dumps(inst)})
            if k == 100:  # bad entries in the middle must not block the rest
                pipe.xadd(RAW, {"instance": json.dumps({**inst, "timestamp_ms": -5})})
                pipe.xadd(RAW, {"something_else": "x"})
        pipe.execute()
        env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(movielens_models.model_dir), "IAT_RAW_STREAM": RAW}
        start_service(["serve", "sequencer"], env=env)
        source = start_service(["serve", "source"], env=env)
        stream = InstanceStream(client)
        # Generous: on a loaded 2-core machine the source alone may take minutes to load its models.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pending = client.xpending(RAW, "source")["pending"] if client.exists(RAW) else 1
            groups = client.xinfo_groups(RAW)
            delivered_all = groups and groups[0]["last-delivered-id"] == client.xrevrange(RAW, count=1)[0][0]
            if delivered_all and pending == 0 and stream.lag() == 0 and stream.pending_count() == 0:
                break
            time.sleep(0.1)
        expected = {ins_id(i["request_id"], i["item_id"], i["timestamp_ms"]) for i in instances}
        keys = list(client.scan_iter(match="iat:ins:*", count=5000))
        assert {int(k.rsplit(b":", 1)[1]) for k in keys} == expected
        store = InstanceStore(client)
        total = sum(store.sequence_length(u) for u in {i["user_id"] for i in instances})
        assert total == len(instances)
        metrics = httpx.get(source.base_url + "/metrics").text
        assert 'iat_source_instances_total{outcome="rejected"} 2.0' in metrics
        assert f'iat_source_instances_total{{outcome="accepted"}} {float(len(instances))}' in metrics
    finally:
        server.stop()
