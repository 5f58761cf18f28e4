"""The serving store's memory, measured with the store itself (issue 17).

``measure``: U users x N instances each, written in time order through ``write_and_append`` at
Lmax, per codec; reports keys, records, and ``INFO memory`` used_memory per servable instance
(servable = in a sequence, so a history read can return it) and per stored record.
``bytes_per_record``: the Redis memory one servable record costs, overhead included (key, value,
TTL entry, its sequence member), from a sample of whole sequences: what ``iat storage-cost``
multiplies by users x Lmax.

Both FLUSHALL the server they are given: use a server of their own (``main`` starts one).
Run: ``python -m harness.store_memory --users 50 --per-user 1000 --lmax 64``. Memory figures
come from a fresh embedded redis-server (no other keys); used_memory includes the allocator's
rounding, which is part of what a deployment pays.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from storage.codecs import CODECS
from storage.connection import EmbeddedRedis, connect
from storage.instance_store import InstanceStore
from storage.records import InstanceRecord

BASE_MS = 1_700_000_000_000
PREFIX = "iat-mem"


def _records(user: int, first: int, count: int, dim: int, tasks: tuple[str, ...], rng) -> list[InstanceRecord]:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    # Members are zero-padded to 20 digits, so small ids cost what real 64-bit hashes do.
    return [InstanceRecord(ins_id=user * 1_000_000_000 + i, user_id=f"user-{user}", timestamp_ms=BASE_MS + 1000 * i,
                           embedding=vectors[i - first], labels={t: i % 2 for t in tasks}, item_hash=i,
                           source_version="mem")
            for i in range(first, first + count)]


def _used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def fill(client, codec: str, users: int, per_user: int, lmax: int, dim: int, tasks: tuple[str, ...],
         batch: int = 10, retention_days: float = 30) -> InstanceStore:
    """Every user's ``per_user`` instances in time order, ``batch`` per user per script call."""
    store = InstanceStore(client, prefix=PREFIX, dim=dim, codec=codec, tasks=tasks,
                          retention_days=retention_days, max_sequence_length=lmax)
    rng = np.random.default_rng(0)
    for first in range(0, per_user, batch):
        count = min(batch, per_user - first)
        store.write_and_append([r for u in range(users) for r in _records(u, first, count, dim, tasks, rng)])
    return store


def measure_codec(client, codec: str, users: int, per_user: int, lmax: int, dim: int,
                  tasks: tuple[str, ...]) -> dict:
    client.flushall()
    keys_before, memory_before = client.dbsize(), _used_memory(client)
    store = fill(client, codec, users, per_user, lmax, dim, tasks)
    keys, delta = client.dbsize() - keys_before, _used_memory(client) - memory_before
    sequences = sum(1 for _ in client.scan_iter(match=f"{PREFIX}:seq:*", count=10_000))
    servable = sum(store.sequence_length(f"user-{u}") for u in range(users))
    records = keys - sequences
    sample = [store.record_key("user-0", int(i)) for i in store.read_history("user-0", 2**52, 8).ins_ids]
    return {
        "codec": codec, "users": users, "per_user": per_user, "lmax": lmax, "dim": dim, "tasks": len(tasks),
        "written": users * per_user, "keys": keys, "records": records, "sequences": sequences,
        "servable": servable, "record_value_bytes": store.layout.record_bytes,
        "used_memory_delta": delta,
        "bytes_per_servable": delta / servable,
        "bytes_per_stored_record": delta / max(records, 1),
        "memory_usage_record": float(np.mean([client.memory_usage(k, samples=0) for k in sample])),
        "memory_usage_sequence": int(client.memory_usage(store.sequence_key("user-0"), samples=0)),
    }


def bytes_per_record(client, codec: str, lmax: int, dim: int, tasks: int = 1, sample_users: int = 8) -> float:
    """used_memory per servable record, sequences included, of ``sample_users`` full sequences."""
    names = tuple(f"t{k}" for k in range(tasks))
    row = measure_codec(client, codec, sample_users, lmax, lmax, dim, names)
    client.flushall()
    return row["bytes_per_servable"]


def measure(client, users: int, per_user: int, lmax: int, dim: int, codecs=CODECS, tasks: int = 1) -> list[dict]:
    names = tuple(f"t{k}" for k in range(tasks))
    rows = [measure_codec(client, codec, users, per_user, lmax, dim, names) for codec in codecs]
    client.flushall()
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'codec':<6}{'keys':>8}{'records':>9}{'servable':>10}{'value B':>9}{'MEMORY USAGE':>14}"
            f"{'used_memory delta':>19}{'B/servable':>12}{'B/stored':>10}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['codec']:<6}{r['keys']:>8,}{r['records']:>9,}{r['servable']:>10,}{r['record_value_bytes']:>9}"
                     f"{r['memory_usage_record']:>14.0f}{r['used_memory_delta']:>19,}{r['bytes_per_servable']:>12.0f}"
                     f"{r['bytes_per_stored_record']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.store_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--per-user", type=int, default=1000)
    parser.add_argument("--lmax", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=1, help="label tasks per record")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated (default %(default)s)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    for name, value in (("--users", args.users), ("--per-user", args.per_user), ("--lmax", args.lmax), ("--dim", args.dim)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if unknown := sorted(set(codecs) - set(CODECS)):
        parser.error(f"--codecs: unknown {unknown}; expected some of {list(CODECS)}")
    server = EmbeddedRedis().start()
    try:
        client = connect(server.url, cluster=False)
        version = client.info("server")["redis_version"]
        rows = measure(client, args.users, args.per_user, args.lmax, args.dim, codecs, args.tasks)
        client.close()
    finally:
        server.stop()
    print(f"redis {version}, {args.users} users x {args.per_user} instances, Lmax {args.lmax}, d {args.dim}")
    print(format_table(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"redis_version": version, "argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
