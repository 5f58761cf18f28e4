"""Feast's Redis online store fetching the same history embeddings: the peer of our fused read.

Runs in its OWN virtualenv (``.venv-feast``: Feast pins protobuf, pandas, pyarrow...), as

    .venv-feast/bin/python harness/peers/feast_fetch.py --input hist.json --redis HOST:PORT

``--input`` holds, per user, the InsIDs and 64-d embeddings of the user's newest L instances (what
our store returns for the same request). They are written to Feast's online store (entity
``ins_id``, one ``Array(Float32)`` feature), then each user's L embeddings are fetched with
``get_online_features`` as a Feast deployment would, timed, and the figures printed as JSON.
Feast has no "sequence before t" read: the InsIDs are given (our read finds them itself).

``--rounds N``: set up once, then time one round per line read from stdin (after printing
``ready``), one JSON line per round, so that the caller can time its own read between Feast's
rounds on the same machine minutes (``loadtests/report.py``: the ratio is taken per round).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--redis", required=True, help="host:port (Feast's connection_string)")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved: print 'ready', then time one round per stdin line (0: one round, no prompt)")
    args = parser.parse_args()

    import feast
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Array, Float32
    from feast.value_type import ValueType

    data = json.loads(args.input.read_text())
    repo = Path(tempfile.mkdtemp(prefix="iat-feast-"))
    (repo / "feature_store.yaml").write_text(
        "project: iat_bench\n"
        f"registry: {repo / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n  type: redis\n"
        f"  connection_string: \"{args.redis}\"\n"
        "offline_store:\n  type: file\n"
        "entity_key_serialization_version: 3\n")
    now = datetime.now(timezone.utc)
    rows = [{"ins_id": int(i), "embedding": [float(x) for x in e], "event_timestamp": now}
            for user in data["users"] for i, e in zip(user["ins_ids"], user["embeddings"])]
    frame = pd.DataFrame(rows)
    frame.to_parquet(repo / "insemb.parquet")
    ins = Entity(name="ins", join_keys=["ins_id"], value_type=ValueType.INT64)
    view = FeatureView(name="insemb", entities=[ins], schema=[Field(name="embedding", dtype=Array(Float32))],
                       source=FileSource(path=str(repo / "insemb.parquet"), timestamp_field="event_timestamp"),
                       online=True)
    store = FeatureStore(repo_path=str(repo))
    store.apply([ins, view])
    store.write_to_online_store("insemb", frame)

    def fetch(user):
        reply = store.get_online_features(features=["insemb:embedding"],
                                          entity_rows=[{"ins_id": int(i)} for i in user["ins_ids"]]).to_dict()
        return np.asarray(reply["embedding"], dtype=np.float32)

    for user in data["users"]:
        got = fetch(user)
        expected = np.asarray(user["embeddings"], dtype=np.float32)
        assert got.shape == expected.shape and np.allclose(got, expected), "Feast returned other embeddings"
        for _ in range(args.warmup):
            fetch(user)

    def timed_round() -> list[dict]:
        results = []
        for user in data["users"]:
            times = np.empty(args.iterations)
            for k in range(args.iterations):
                s = time.perf_counter()
                fetch(user)
                times[k] = time.perf_counter() - s
            ms = times * 1e3
            results.append({"user": user["user_id"], "length": len(user["ins_ids"]),
                            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                            "p99_ms": float(np.percentile(ms, 99)), "n": args.iterations, "gc_enabled": gc.isenabled()})
        return results

    if not args.rounds:
        print(json.dumps({"feast": feast.__version__, "results": timed_round()}))
        return 0
    print("ready", flush=True)
    for _ in range(args.rounds):
        if not sys.stdin.readline():  # the caller went away
            break
        print(json.dumps({"feast": feast.__version__, "results": timed_round()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
