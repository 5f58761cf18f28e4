"""`iat bench store`: latency of the fused history read against two round trips and a bare MGET.

For each L the same user's newest L records are read, the methods interleaved round-robin in one
run (so that noise from other processes hits all of them alike):
  fused      read_history: one EVALSHA round trip + bulk numpy decode (what serving calls)
  fused_raw  the same script call without decoding (the reply only)
  two_trips  read_history_two_trips: ZREVRANGEBYSCORE, then MGET, + decode
  mget_floor MGET of the same L record keys, known in advance, no decode: the floor a read of
             these records cannot beat, since it skips the sequence lookup and the decoding
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import numpy as np

from harness.two_trips import read_history_two_trips
from storage.connection import EmbeddedRedis, connect
from storage.instance_store import InstanceStore
from storage.records import InstanceRecord

METHODS = ("fused", "fused_raw", "two_trips", "mget_floor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="default: a fresh embedded redis-server (unix socket)")
    parser.add_argument("--lengths", default="64,256,1024", help="comma-separated L values (default %(default)s)")
    parser.add_argument("--iterations", type=int, default=2000, help="timed reads per method and L")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codec", choices=("fp32", "fp16", "int8"), default="fp32")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the figures as JSON")


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--lengths: expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"--lengths: values must be >= 1, got {text!r}")
    return values


def _populate(store: InstanceStore, user: str, count: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    records = [
        InstanceRecord(ins_id=10_000 + i, user_id=user, timestamp_ms=1_700_000_000_000 + 1000 * i,
                       embedding=vectors[i], labels={"like": i % 2}, item_hash=i, source_version="bench")
        for i in range(count)
    ]
    for start in range(0, count, 500):
        store.write_and_append(records[start:start + 500])


def measure(client, lengths: list[int], iterations: int, warmup: int, dim: int, codec: str) -> dict:
    user = "bench-user"
    longest = max(lengths)
    store = InstanceStore(client, prefix="iat-bench", dim=dim, codec=codec, tasks=("like",),
                          retention_days=1, max_sequence_length=longest + 16)
    _populate(store, user, longest + 16, dim)
    before = 1_700_000_000_000 + 1000 * (longest + 16)
    rows = []
    for limit in lengths:
        history = store.read_history(user, before, limit)
        assert len(history) == limit, "benchmark data not in place"
        keys = [store.record_key(user, int(i)) for i in history.ins_ids]
        calls = {
            "fused": lambda: store.read_history(user, before, limit),
            "fused_raw": lambda: store.read_history_raw(user, before, limit),
            "two_trips": lambda: read_history_two_trips(store, user, before, limit),
            "mget_floor": lambda: client.mget(keys),
        }
        for _ in range(warmup):
            for call in calls.values():
                call()
        timings = {name: np.empty(iterations, dtype=np.int64) for name in calls}
        gc.collect()
        gc.freeze()  # as a warm service does: the set-up heap is not rescanned by every GC pass
        clock = time.perf_counter_ns
        for i in range(iterations):
            for name, call in calls.items():
                start = clock()
                call()
                timings[name][i] = clock() - start
        gc.unfreeze()
        for name in METHODS:
            t_us = timings[name] / 1000.0
            rows.append({
                "limit": limit, "method": name, "p50_us": float(np.percentile(t_us, 50)),
                "p99_us": float(np.percentile(t_us, 99)), "mean_us": float(t_us.mean()), "n": iterations,
            })
    client.delete(store.sequence_key(user))
    return {"rows": rows, "ratios": _ratios(rows)}


def _ratios(rows: list[dict]) -> list[dict]:
    by = {(r["limit"], r["method"]): r for r in rows}
    out = []
    for limit in sorted({r["limit"] for r in rows}):
        floor = by[(limit, "mget_floor")]
        out.append({
            "limit": limit,
            "fused_over_floor_p50": by[(limit, "fused")]["p50_us"] / floor["p50_us"],
            "fused_over_floor_p99": by[(limit, "fused")]["p99_us"] / floor["p99_us"],
            "two_trips_over_fused_p50": by[(limit, "two_trips")]["p50_us"] / by[(limit, "fused")]["p50_us"],
        })
    return out


def format_table(result: dict) -> str:
    lines = [f"{'L':>5}  {'method':<11}{'p50 us':>9}{'p99 us':>9}{'mean us':>9}"]
    for row in result["rows"]:
        lines.append(f"{row['limit']:>5}  {row['method']:<11}{row['p50_us']:>9.1f}{row['p99_us']:>9.1f}{row['mean_us']:>9.1f}")
    lines.append("")
    lines.append(f"{'L':>5}  {'fused/floor p50':>16}{'fused/floor p99':>16}{'two_trips/fused p50':>21}")
    for r in result["ratios"]:
        lines.append(f"{r['limit']:>5}  {r['fused_over_floor_p50']:>16.2f}{r['fused_over_floor_p99']:>16.2f}{r['two_trips_over_fused_p50']:>21.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    lengths = _lengths(args.lengths)
    if args.iterations < 1:
        print("--iterations: must be >= 1", file=sys.stderr)
        return 2
    embedded = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis().start()
        url = embedded.url
    try:
        client = connect(url)
        server = client.info("server") if not hasattr(client, "get_primaries") else {}
        result = measure(client, lengths, args.iterations, args.warmup, args.dim, args.codec)
        client.close()
    finally:
        if embedded is not None:
            embedded.stop()
    result.update({
        "argv": sys.argv,
        "redis": "embedded (unix socket)" if embedded is not None else "REDIS URL given",
        "redis_version": server.get("redis_version"),
        "dim": args.dim, "codec": args.codec, "iterations": args.iterations,
        "python": platform.python_version(), "machine": platform.machine(),
    })
    print(format_table(result))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":  # also runnable as `python -m harness.bench_store` (same arguments)
    _parser = argparse.ArgumentParser(prog="iat bench store", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
