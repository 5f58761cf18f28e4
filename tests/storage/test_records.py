"""Validation before any write: a bad record names its field and nothing of the batch is stored."""
from __future__ import annotations

import numpy as np
import pytest

from harness.two_trips import read_history_two_trips
from storage.instance_store import InstanceStore
from storage.records import HEADER_BYTES, InstanceRecord, InvalidRecord

DIM = 8


def good(i: int, user: str = "u1") -> InstanceRecord:
    return InstanceRecord(
        ins_id=i, user_id=user, timestamp_ms=1_000 + i, embedding=np.full(DIM, i, np.float32),
        codes=np.arange(4, dtype=np.uint8), labels={"like": 1}, item_hash=i, source_version="src-1",
    )


@pytest.fixture
def store(redis_client):
    return InstanceStore(redis_client, dim=DIM, tasks=("like", "love"), code_length=4, code_dtype=np.uint8)


def with_field(i, **changes):
    record = good(i)
    for name, value in changes.items():
        setattr(record, name, value)
    return record


BAD = {
    "wrong dimension": (with_field(2, embedding=np.ones(DIM + 1, np.float32)), "embedding", "wrong dimension"),
    "nan": (with_field(2, embedding=np.array([np.nan] + [0.0] * (DIM - 1), np.float32)), "embedding", "NaN or inf"),
    "inf": (with_field(2, embedding=np.array([np.inf] + [0.0] * (DIM - 1), np.float32)), "embedding", "NaN or inf"),
    "missing embedding": (with_field(2, embedding=None), "embedding", "missing"),
    "empty user": (with_field(2, user_id=""), "user_id", "non-empty"),
    "negative ts": (with_field(2, timestamp_ms=-1), "timestamp_ms", ">= 0"),
    "float ts": (with_field(2, timestamp_ms=1.5), "timestamp_ms", "must be an int"),
    "negative ins_id": (with_field(2, ins_id=-3), "ins_id", "outside"),
    "huge ins_id": (with_field(2, ins_id=2**64), "ins_id", "outside"),
    "codes dtype": (with_field(2, codes=np.arange(4, dtype=np.int32)), "codes", "uint8 or uint16"),
    "codes too wide": (with_field(2, codes=np.arange(4, dtype=np.uint16)), "codes", "does not fit"),
    "codes length": (with_field(2, codes=np.arange(5, dtype=np.uint8)), "codes", "wrong length"),
    "unknown task": (with_field(2, labels={"share": 1}), "labels", "unknown task"),
    "label value": (with_field(2, labels={"like": 2}), "labels", "0 or 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_field_and_writes_nothing(store, redis_client, case):
    store.write_and_append([good(100)])
    before = sorted(redis_client.keys("*"))
    stored = redis_client.get(store.record_key("u1", 100))
    bad, field, message = BAD[case]
    batch = [good(1), bad, good(3)]
    with pytest.raises(InvalidRecord, match=message) as info:
        store.write_records(batch)
    assert info.value.field == field and info.value.index == 1
    assert str(info.value).startswith(f"{field}:")
    with pytest.raises(InvalidRecord):
        store.write_and_append(batch)
    assert sorted(redis_client.keys("*")) == before
    assert redis_client.get(store.record_key("u1", 100)) == stored


@pytest.mark.parametrize(
    "entry, field",
    [(("", 1, 5), "user_id"), (("u", 1, -5), "timestamp_ms"), (("u", -1, 5), "ins_id"), (("u", 1), "entry")],
)
def test_bad_sequence_entry_writes_nothing(store, redis_client, entry, field):
    with pytest.raises(InvalidRecord) as info:
        store.append_to_sequences([("u", 7, 10), entry])
    assert info.value.field == field
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(
    "args, field", [(("", 10, 5), "user_id"), (("u", -1, 5), "before_ms"), (("u", 10, -1), "limit")]
)
def test_bad_read_arguments(store, args, field):
    for read in (store.read_history, lambda *a: read_history_two_trips(store, *a)):
        with pytest.raises(InvalidRecord) as info:
            read(*args)
        assert info.value.field == field


def test_record_size_is_header_plus_payload(store):
    fp32_d64 = InstanceStore(store.client, dim=64).layout.record_bytes
    assert fp32_d64 == HEADER_BYTES + 256
    # format 2: a uint32 label arrival time per task after the header
    assert store.layout.record_bytes == HEADER_BYTES + 4 * 2 + 4 * DIM + 4
