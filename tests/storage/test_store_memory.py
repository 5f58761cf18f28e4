"""Memory that follows what is servable (issue 17), on a real server and a real 3-master cluster.

The invariant: the records stored for a user are exactly the members of the user's sequence, the
newest Lmax instances written, whatever order writes, re-deliveries and out-of-order arrivals
come in. A trimmed member's record leaves with it, in the same script call.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import redis.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.instance_store import InstanceStore
from storage.records import InstanceRecord

DIM = 4
TASKS = ("like",)
_prefixes = itertools.count()


@pytest.fixture(params=["single", "cluster"])
def backend(request):
    if request.param == "single":
        return request.getfixturevalue("redis_client")
    return request.getfixturevalue("cluster_client")


def record(user: str, ins_id: int, ts: int) -> InstanceRecord:
    return InstanceRecord(ins_id=ins_id, user_id=user, timestamp_ms=ts,
                          embedding=np.array([ts, ins_id, 0.5, -1.0], np.float32),
                          labels={"like": ins_id % 2}, item_hash=ins_id, source_version="src-1")


def keys(client, prefix: str) -> set[str]:
    """Every key under the prefix, on every primary of a cluster."""
    if isinstance(client, redis.cluster.RedisCluster):
        found = client.keys(f"{prefix}:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        found = client.keys(f"{prefix}:*")
    return {k.decode() for k in found}


def members(client, store: InstanceStore, user: str) -> set[str]:
    return {m.decode() for m in client.zrange(store.sequence_key(user), 0, -1)}


def newest(instances: dict[int, int], lmax: int) -> set[int]:
    """The newest ``lmax`` of {ins_id: ts}: the store's order, ties by InsID (zero-padded members)."""
    return set(sorted(instances, key=lambda i: (instances[i], i), reverse=True)[:lmax])


def test_1000_instances_at_lmax_64_leave_64_records_and_one_sequence(backend):
    store = InstanceStore(backend, prefix="mem", dim=DIM, tasks=TASKS, max_sequence_length=64)
    written = 0
    for start in range(0, 1000, 7):  # batches of several records: trims within and across calls
        written += store.write_and_append([record("u", i, 10_000 + i) for i in range(start, min(start + 7, 1000))])[0]
    want = set(range(1000 - 64, 1000))
    assert keys(backend, "mem") == {store.sequence_key("u")} | {store.record_key("u", i) for i in want}
    assert written == 1000  # each was servable when it was written, and left when 64 newer came
    history = store.read_history("u", 10**9, 1000)
    assert history.ins_ids.tolist() == sorted(want, reverse=True) and history.missing == 0
    np.testing.assert_array_equal(history.embeddings[:, 1], history.ins_ids.astype(np.float32))


def test_an_old_instance_arriving_after_the_sequence_is_full_is_not_stored(backend):
    store = InstanceStore(backend, prefix="late", dim=DIM, tasks=TASKS, max_sequence_length=8)
    store.write_and_append([record("u", i, 100 + i) for i in range(20, 28)])
    before = keys(backend, "late")
    # An old one alone, then old ones mixed with a new one in one call.
    assert store.write_and_append([record("u", 3, 50)]) == (0, 0)
    assert keys(backend, "late") == before
    assert store.write_and_append([record("u", 4, 51), record("u", 30, 500), record("u", 5, 52)]) == (1, 0)
    assert keys(backend, "late") == ({store.sequence_key("u")} | {store.record_key("u", i) for i in range(21, 28)}
                                     | {store.record_key("u", 30)})
    # Re-delivered through the sequencer's path (sequence only) after its trim: trimmed again.
    store.append_to_sequences([("u", 20, 120), ("u", 3, 50)])
    assert store.sequence_length("u") == 8 and store.record_key("u", 20) not in keys(backend, "late")
    assert store.read_history("u", 10**9, 100).ins_ids.tolist() == [30, 27, 26, 25, 24, 23, 22, 21]


def test_a_lower_lmax_trims_an_existing_sequence_and_its_records(backend):
    wide = InstanceStore(backend, prefix="re", dim=DIM, tasks=TASKS, max_sequence_length=100)
    wide.write_and_append([record("u", i, i) for i in range(100)])
    narrow = InstanceStore(backend, prefix="re", dim=DIM, tasks=TASKS, max_sequence_length=5)
    narrow.write_and_append([record("u", 100, 100)])
    assert keys(backend, "re") == {narrow.sequence_key("u")} | {narrow.record_key("u", i) for i in range(96, 101)}


# One step: ("write", instances, keep_stored) stores records and membership (ingest, a retry,
# a backfill); ("sequence", instances) re-appends already written instances (the sequencer).
instances_ = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), min_size=1, max_size=6)
steps = st.lists(st.one_of(st.tuples(st.just("write"), instances_, st.booleans()),
                           st.tuples(st.just("sequence"), st.lists(st.integers(0, 40), max_size=6))),
                 min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lmax=st.integers(1, 6), steps=steps)
def test_records_equal_members_over_random_interleavings(backend, lmax, steps):
    prefix = f"prop{next(_prefixes)}"
    store = InstanceStore(backend, prefix=prefix, dim=DIM, tasks=TASKS, max_sequence_length=lmax)
    timestamps: dict[int, int] = {}  # an instance's timestamp is fixed by its first arrival
    seen: dict[int, int] = {}
    for step in steps:
        if step[0] == "write":
            batch = [(i, timestamps.setdefault(i, ts)) for i, ts in step[1]]
            store.write_and_append([record("u", i, ts) for i, ts in batch], keep_stored=step[2])
            seen.update(batch)
        else:
            again = [i for i in step[1] if i in seen]  # the sequencer appends only what was stored
            store.append_to_sequences([("u", i, seen[i]) for i in again])
        want = newest(seen, lmax)
        assert members(backend, store, "u") == {f"{i:020d}" for i in want}
        sequence = {store.sequence_key("u")} if seen else set()
        assert keys(backend, prefix) == sequence | {store.record_key("u", i) for i in want}
    history = store.read_history("u", 10**9, lmax)
    assert set(history.ins_ids.tolist()) == newest(seen, lmax) and history.missing == 0


def test_memory_harness_counts_only_servable_records(redis_client):
    from harness.store_memory import bytes_per_record, measure

    # dim 64: an fp32 record is ~190 B longer than an int8 one; 30 users, so that Redis' own
    # swings of used_memory (a few KB: a table resized, a buffer kept) weigh little per record
    # (at 3 users and dim 4 they once made the two codecs equal)
    users = 30
    rows = measure(redis_client, users=users, per_user=40, lmax=8, dim=64, codecs=("fp32", "int8"))
    for row in rows:
        assert (row["keys"], row["records"], row["servable"]) == (users * 9, users * 8, users * 8)
        # Redis' overhead (key, TTL, sequence member) comes on top of the record's bytes.
        assert row["bytes_per_servable"] > row["record_value_bytes"]
    assert rows[0]["bytes_per_servable"] > rows[1]["bytes_per_servable"]  # fp32 > int8
    assert bytes_per_record(redis_client, "fp16", lmax=8, dim=DIM, sample_users=2) > 48
    assert redis_client.dbsize() == 0


# ---- iat storage-cost: the serving store's size beside Eq. 12's ---------------------------------

def _storage_cost(capsys, *extra) -> dict:
    from cli import main

    assert main(["storage-cost", "--instances-per-day", "1000", "--days", "30", "--dim", "64", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_storage_cost_serving_estimate_without_measuring(capsys):
    from cli.storage_cost import OVERHEAD_LISTPACK, OVERHEAD_SKIPLIST

    out = _storage_cost(capsys, "--users", "10", "--lmax", "64", "--no-measure")
    assert out["bytes"] == 30_000 * 256  # Eq. 12 unchanged
    serving = out["serving"]
    assert (serving["records"], serving["measured"], set(serving["codecs"])) == (640, False, {"fp32", "fp16", "int8"})
    assert serving["codecs"]["fp32"]["bytes"] == 640 * (48 + 256 + OVERHEAD_LISTPACK)
    assert serving["codecs"]["int8"]["bytes"] == 640 * (48 + 68 + OVERHEAD_LISTPACK)
    long = _storage_cost(capsys, "--users", "10", "--lmax", "1024", "--no-measure")["serving"]
    assert long["codecs"]["fp16"]["bytes"] == 10 * 1024 * (48 + 128 + OVERHEAD_SKIPLIST)
    assert "serving" not in _storage_cost(capsys)  # without --users: Eq. 12 alone, as before


@pytest.mark.parametrize("lmax", [64, 1024])
def test_storage_cost_measures_in_redis_and_the_estimate_stays_close(capsys, lmax):
    measured = _storage_cost(capsys, "--users", "1000", "--lmax", str(lmax))["serving"]
    estimated = _storage_cost(capsys, "--users", "1000", "--lmax", str(lmax), "--no-measure")["serving"]
    assert measured["measured"] and measured["redis_version"]
    per_record = {c: measured["codecs"][c]["bytes_per_record"] for c in ("fp32", "fp16", "int8")}
    assert per_record["fp32"] > per_record["fp16"] > per_record["int8"] > 48 + 68  # Redis overhead on top
    for codec, value in per_record.items():
        assert abs(measured["codecs"][codec]["bytes"] - 1000 * lmax * value) <= 1000 * lmax * 0.05  # value: 0.1 B
        assert abs(estimated["codecs"][codec]["bytes_per_record"] - value) <= 0.15 * value, codec


def test_storage_cost_imports_no_torch_and_rejects_bad_users():
    code = ("import sys; from cli import main; "
            "rc = main(['storage-cost', '--instances-per-day', '5', '--days', '1', '--dim', '8', '--users', '3', '--lmax', '8']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "serving store" in proc.stdout and "measured in redis" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import sys; from cli import main; sys.exit(main())", "storage-cost",
                           "--instances-per-day", "5", "--days", "1", "--dim", "8", "--users", "0"],
                          check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2 and "--users must be a positive integer" in proc.stderr
