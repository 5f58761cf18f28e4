"""Source versions by lineage (docs/source-versions.md) on a real Redis server.

A downstream that declares lineage A from ordinal 4 reads A's records of ordinals 4 and 5, and
skips and counts the rest: older A, lineage B, and records written before lineages (an 8-byte
version hash); a downstream without lineage fields (an old artifact) still matches exactly.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from contract.artifacts import ArtifactError, read_manifest
from contract.lineage import SourceLineage
from harness.two_trips import read_history_two_trips
from storage.instance_store import VERSION_MISMATCH, InstanceStore, accepted_mask
from storage.records import (
    InstanceRecord,
    InvalidRecord,
    lineage_version_id,
    split_version_id,
)

_prefixes = itertools.count()
USER = "u-lineage"


def rec(ins_id: int, ts: int, lineage: str | None, ordinal: int = 0, version: str = "") -> InstanceRecord:
    return InstanceRecord(ins_id=ins_id, user_id=USER, timestamp_ms=ts, embedding=np.full(4, ins_id, np.float32),
                          labels={"like": 1}, item_hash=ins_id, source_version=version,
                          source_lineage=lineage, source_ordinal=ordinal)


@pytest.fixture
def store(redis_client):
    s = InstanceStore(redis_client, prefix=f"lin{next(_prefixes)}", dim=4, tasks=("like",))
    # ins_id encodes who wrote it: A3 -> 3xx, A4 -> 4xx, A5 -> 5xx, B9 -> 9xx, pre-lineage -> 1xx
    records = []
    for k in range(3):
        ts = 1_000 + 10 * k
        records += [rec(300 + k, ts + 1, "A", 3), rec(400 + k, ts + 2, "A", 4), rec(500 + k, ts + 3, "A", 5),
                    rec(900 + k, ts + 4, "B", 9), rec(100 + k, ts + 5, None, version="src-old")]
    s.write_and_append(records)
    return s


def test_a_lineage_reader_gets_its_lineage_from_the_oldest_ordinal_and_counts_the_rest(store):
    h = store.read_history(USER, 10_000, 100, expected_source_version=SourceLineage("A", 4), explain=True)
    assert sorted(int(i) for i in h.ins_ids) == [400, 401, 402, 500, 501, 502]
    assert h.version_mismatch == 9  # A3 x3, B9 x3, pre-lineage x3: skipped and counted
    assert sorted(s.ins_id for s in h.skipped) == [100, 101, 102, 300, 301, 302, 900, 901, 902]
    assert {s.reason for s in h.skipped} == {VERSION_MISMATCH}
    assert all(split_version_id(v) == (split_version_id(lineage_version_id("A", 0))[0], o)
               for v, o in zip(h.source_versions, [int(i) // 100 for i in h.ins_ids]))
    # the two-round-trip read (benchmark baseline) applies the same rule in numpy
    two = read_history_two_trips(store, USER, 10_000, 100, expected_source_version=SourceLineage("A", 4))
    assert two.ins_ids.tolist() == h.ins_ids.tolist() and two.version_mismatch == 9


def test_the_read_reaches_further_back_past_skipped_lineages(store):
    # L = 2: the two newest members are pre-lineage and B; the read goes on to A5 and A4
    h = store.read_history(USER, 10_000, 2, expected_source_version=SourceLineage("A", 4))
    assert h.ins_ids.tolist() == [502, 402]
    assert h.version_mismatch == 2


def test_an_artifact_without_lineage_still_matches_its_version_exactly(store):
    h = store.read_history(USER, 10_000, 100, expected_source_version="src-old")
    assert sorted(int(i) for i in h.ins_ids) == [100, 101, 102]
    assert h.version_mismatch == 12
    assert len(store.read_history(USER, 10_000, 100)) == 15  # no expectation: everything


def test_the_numpy_rule_equals_the_script_rule_at_the_edges():
    ids = np.array([lineage_version_id("A", o) for o in (0, 3, 4, 2**32 - 1)]
                   + [lineage_version_id("B", 4)], np.uint64)
    assert accepted_mask(SourceLineage("A", 4), ids).tolist() == [False, False, True, True, False]
    assert accepted_mask(SourceLineage("A", 0), ids).tolist() == [True, True, True, True, False]
    assert accepted_mask(None, ids).all()


def test_bad_lineage_stamps_and_policies_are_refused_naming_the_field(store):
    with pytest.raises(InvalidRecord, match="source_ordinal"):
        store.write_and_append([rec(7, 5, "A", 2**32)])
    with pytest.raises(InvalidRecord, match="source_lineage"):
        store.write_and_append([rec(7, 5, "", 1)])
    assert store.sequence_length(USER) == 15  # nothing of the bad batches was stored
    with pytest.raises(ValueError, match="min_ordinal"):
        SourceLineage("A", -1)


def _manifest(tmp_path, **extra):
    raw = {"name": "iat", "kind": "iat", "version": "20260101T000000-abcdef", "created": "now",
           "files": {"model.pt": "0" * 64}, "schema": {}, "embedding_dim": 4, "max_history": 8, "codec": "fp32",
           "tasks": ["like"], "source_version": "20260101T000000-123456", "inputs": [], "outputs": [], **extra}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    return read_manifest(tmp_path)


def test_manifest_lineage_fields_are_optional_paired_and_validated(tmp_path):
    old = _manifest(tmp_path)
    assert old.accepted_sources() == "20260101T000000-123456"  # exact match, as before
    new = _manifest(tmp_path, source_lineage="A", source_min_ordinal=4)
    assert new.accepted_sources() == SourceLineage("A", 4)
    with pytest.raises(ArtifactError, match="source_min_ordinal is required"):
        _manifest(tmp_path, source_lineage="A")
    with pytest.raises(ArtifactError, match="'ordinal'"):
        _manifest(tmp_path, lineage="A", ordinal=-1)
    with pytest.raises(ArtifactError, match="'source_lineage'"):
        _manifest(tmp_path, source_lineage="", source_min_ordinal=1)
