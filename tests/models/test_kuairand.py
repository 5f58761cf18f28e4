"""KuaiRand-Pure through the shipped schema: what is a feature and what is an outcome (the data
README's "what is known when"), loaded on a subset of its users."""
from __future__ import annotations

import csv
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from models.data.prepared import load_dataset
from models.data.schema import DatasetSchema, SchemaError, load_schema

DATA = Path(os.environ.get("IAT_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data")) / "kuairand-pure"

# Everything the user did after the exposure (the data README)
OUTCOMES = {"is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view",
            "play_time_ms", "profile_stay_time", "comment_stay_time", "is_profile_enter"}


def test_schema_declares_every_outcome_and_uses_none_as_a_feature():
    schema = load_schema("kuairand-pure")
    assert schema.tasks == ["click", "long_view", "like"]
    assert set(schema.log.outcomes) == OUTCOMES
    assert {lab.column for lab in schema.labels} <= OUTCOMES
    assert not schema.feature_columns & OUTCOMES
    assert schema.log.timestamp_unit == "ms"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["log"]["numeric"].append("play_time_ms"), r"'log.numeric': column 'play_time_ms' is an outcome"),
    (lambda r: r["log"]["categorical"].append("is_like"), r"'log.categorical': column 'is_like' is an outcome"),
    (lambda r: r["log"]["buckets"].update(watch={"column": "play_time_ms", "edges": [1, 10]}),
     r"'log.buckets.watch.column': column 'play_time_ms' is an outcome"),
    (lambda r: r["log"]["buckets"]["duration_bucket"].update(edges=[5, 1]), r"duration_bucket.edges"),
])
def test_an_outcome_as_a_feature_is_refused(mutate, message):
    raw = tomllib.loads(load_schema("kuairand-pure").source.read_text())
    mutate(raw)
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_dict(raw)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The first 1,500 user ids' impressions with the full user and video tables."""
    if not (DATA / "impressions.tsv").is_file():
        pytest.skip(f"KuaiRand-Pure not found at {DATA} (set IAT_DATA_DIR)")
    out = tmp_path_factory.mktemp("kuairand")
    with (DATA / "impressions.tsv").open() as src, (out / "impressions.tsv").open("w") as dst:
        dst.write(next(src))
        for line in src:
            if int(line.split("\t", 1)[0]) < 1500:
                dst.write(line)
    for name in ("users.csv", "videos.csv"):
        (out / name).write_bytes((DATA / name).read_bytes())
    return out, load_dataset(load_schema("kuairand-pure"), out)


def test_subset_loads_with_labels_from_outcomes_and_no_outcome_feature(subset):
    folder, data = subset
    assert data.tasks == ["click", "long_view", "like"] and data.n > 5000
    features = set(data.cat_fields) | set(data.multi_fields) | set(data.num_fields)
    assert not features & OUTCOMES, features & OUTCOMES
    assert {"tab", "is_rand", "duration_bucket", "duration_ms", "user_active_degree", "author_id",
            "video_duration", "tag", "hour", "weekday"} <= features
    assert "tag" in data.multi_fields and "duration_ms" in data.num_fields

    # one instance per exposure: rows repeating (user, video, time_ms) (KuaiRand repeats a few
    # exposures with another hourmin) are one instance, one InsID; the first row is kept
    with (folder / "impressions.tsv").open() as fh:
        raw = list(csv.DictReader(fh, delimiter="\t"))
    by_key: dict = {}
    for r in raw:
        by_key.setdefault((r["user_id"], r["video_id"], int(r["time_ms"])), r)
    assert len(by_key) == data.n == len(set(data.ins_id.tolist())) < len(raw)
    # the labels are the outcome columns, row for row
    for n in range(0, data.n, 97):
        r = by_key[(str(data.user_ids[data.user_index[n]]), str(data.item_ids[n]), int(data.ts_ms[n]))]
        assert data.labels[n].tolist() == [float(r["is_click"]), float(r["long_view"]), float(r["is_like"])]
    # ms timestamps are kept as ms; the split is by time
    assert data.ts_ms.min() >= 1650812741436 - 10**9 and np.all(np.diff(data.ts_ms) >= 0)
    assert data.ts_ms[data.split == 0].max() <= data.ts_ms[data.split == 2].min()


def test_duration_bucket_is_derived_from_the_video_length(subset):
    _, data = subset
    schema = load_schema("kuairand-pure")
    spec = schema.log.buckets["duration_bucket"]
    assert spec.column == "duration_ms" and spec.bucket(0.0) == "0" and spec.bucket(7000.0) == "2"
    assert spec.bucket(float("nan")) == ""
    from models.runtime.hashing import hash_bucket
    col = data.cat_fields.index("duration_bucket")
    mean, std = data.num_stats["duration_ms"]
    raw_ms = data.num[:, data.num_fields.index("duration_ms")].astype(np.float64) * std + mean
    for n in range(0, data.n, 131):
        want = hash_bucket("duration_bucket", spec.bucket(round(raw_ms[n])), data.n_buckets)
        assert data.cat[n, col] == want
