import os
from pathlib import Path

import numpy as np
import pytest

from models.data.prepared import build_history_index, load_dataset, split_by_time
from models.data.schema import DatasetSchema, SchemaError, load_schema

ML_DIR = Path(os.environ.get("IAT_DATA_DIR", Path(__file__).resolve().parents[2] / "../shared/data")) / "movielens-100k"


def test_shipped_schema_loads():
    schema = load_schema("movielens-100k")
    assert schema.tasks == ["like", "love"]
    assert schema.log.user == "user_id" and schema.tables[1].multi == {"class": " "}
    with pytest.raises(SchemaError, match="unknown schema"):
        load_schema("no-such-dataset")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["log"].pop("user"), "log.user"),
    (lambda r: r["log"].update(timestamp_unit="h"), "log.timestamp_unit"),
    (lambda r: r.update(labels=[]), "labels"),
    (lambda r: r["labels"][0].update(min="4"), r"labels\[0\].min"),
    (lambda r: r["tables"][0].update(categorical="age"), r"tables\[0\].categorical"),
    (lambda r: r["tables"][1].update(multi={"class": ""}), r"tables\[1\].multi"),
])
def test_bad_schema_names_the_field(mutate, message):
    import tomllib
    raw = tomllib.loads(load_schema("movielens-100k").source.read_text())
    mutate(raw)
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_dict(raw)


def test_missing_column_is_named(tmp_path):
    (tmp_path / "log.csv").write_text("u,i,t,y\n1,2,3,1\n")
    schema = DatasetSchema.from_dict({"log": {"path": "log.csv", "user": "u", "item": "i",
                                              "timestamp": "time"},
                                      "labels": [{"name": "y", "column": "y"}]})
    with pytest.raises(SchemaError, match="'time' not found"):
        load_dataset(schema, tmp_path)
    (tmp_path / "log.csv").write_text("u,i,t,y\n1,2,3,2\n")
    schema = DatasetSchema.from_dict({"log": {"path": "log.csv", "user": "u", "item": "i",
                                              "timestamp": "t"},
                                      "labels": [{"name": "y", "column": "y"}]})
    with pytest.raises(SchemaError, match="'y'.*0/1"):
        load_dataset(schema, tmp_path)


def test_history_index_against_brute_force():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 5, 200)
    ts = np.sort(rng.integers(0, 60, 200))  # many ties
    hist = build_history_index(users, ts, 7)
    for n in range(200):
        earlier = [j for j in range(200) if users[j] == users[n] and ts[j] < ts[n]]
        earlier.sort(key=lambda j: (ts[j], j), reverse=True)
        assert hist[n][hist[n] >= 0].tolist() == earlier[:7]
    counts = build_history_index(users, ts, 0, counts_only=True)
    assert counts.tolist() == [int(((users == users[n]) & (ts < ts[n])).sum()) for n in range(200)]


def test_split_by_time_keeps_ties_together():
    ts = np.array([1, 1, 2, 2, 2, 3, 3, 4, 5, 5])
    split = split_by_time(ts, (0.6, 0.2, 0.2))
    for t in np.unique(ts):
        assert len(set(split[ts == t])) == 1
    assert (np.diff(split) >= 0).all()
    with pytest.raises(ValueError, match="split fractions"):
        split_by_time(ts, (0.5, 0.5, 0.5))


@pytest.mark.skipif(not (ML_DIR / "ml-100k.inter").is_file(), reason="MovieLens-100K not present")
def test_movielens_bundle():
    d = load_dataset(load_schema("movielens-100k"), ML_DIR)
    assert d.n == 100_000 and d.n_users == 943
    assert d.tasks == ["like", "love"]
    assert abs(d.labels[:, 0].mean() - 0.554) < 0.001 and abs(d.labels[:, 1].mean() - 0.212) < 0.001
    assert (np.diff(d.ts_ms) >= 0).all()
    assert d.ts_ms[d.split == 0].max() < d.ts_ms[d.split == 1].min() <= d.ts_ms[d.split == 1].max() < d.ts_ms[d.split == 2].min()
    assert d.field_groups["user"] == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert d.field_groups["context"] == ["hour", "weekday"]
    assert d.multi.shape == (100_000, 1, 8) and (d.multi[:, 0, 0] >= 0).all()  # every movie has a genre
    assert len(np.unique(d.ins_id)) == d.n
    assert d.cat.dtype == np.int64 and (d.cat >= 0).all() and (d.cat < d.n_buckets).all()
