"""Serving featurization equals the offline loader's, row by row (no training/serving skew)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.data.prepared import load_dataset, read_table
from models.data.schema import DatasetSchema, load_schema
from models.runtime.featurizer import FeatureError, FeatureSpec, Featurizer

DATA_DIR = Path(os.environ.get("IAT_DATA_DIR", Path(__file__).parents[3] / "shared" / "data"))
ML = DATA_DIR / "movielens-100k"


def _table(path: Path, sep="\t"):
    header, rows = read_table(path, sep, "test")
    return header, {r[0]: dict(zip(header, r)) for r in rows}


@pytest.mark.skipif(not ML.exists(), reason="MovieLens-100K not found at IAT_DATA_DIR")
def test_movielens_rows_encode_identically():
    schema = load_schema("movielens-100k")
    data = load_dataset(schema, ML)
    spec = FeatureSpec.from_json(FeatureSpec.from_prepared(data).to_json())  # through JSON, as served
    featurizer = Featurizer(spec)
    _, users = _table(ML / "ml-100k.user")
    _, items = _table(ML / "ml-100k.item")
    rng = np.random.default_rng(0)
    rows = rng.choice(data.n, 300, replace=False)
    for row in rows:
        user = str(data.user_ids[data.user_index[row]])
        item = str(data.item_ids[row])
        u, it = users[user], items[item]
        context = {k: u[k] for k in ("age", "gender", "occupation", "zip_code")}
        cand = {"release_year": it["release_year"], "class": "|".join(it["class"].split(" "))}
        cat, multi, num = featurizer.encode(user, int(data.ts_ms[row]), [item], context, {}, [cand], [{}])
        np.testing.assert_array_equal(cat[0], data.cat[row])
        np.testing.assert_array_equal(multi[0], data.multi[row])
        np.testing.assert_array_equal(num[0], data.num[row])


def _small_dataset(tmp_path: Path):
    (tmp_path / "log.csv").write_text(
        "uid,iid,when,price,device,y\n"
        + "".join(f"u{i % 7},i{i % 5},{1_000_000 + 3600 * i},{1.5 * i},d{i % 3},{i % 2}\n" for i in range(60))
    )
    (tmp_path / "items.tsv").write_text(
        "iid\tbrand\ttags\tweight\n" + "".join(f"i{k}\tb{k % 2}\tt{k};t{k + 1}\t{10.0 + k}\n" for k in range(4))
    )  # i4 has no row: a failed join
    (tmp_path / "s.toml").write_text(
        '''name = "small"
[log]
path = "log.csv"
user = "uid"
item = "iid"
timestamp = "when"
categorical = ["device"]
numeric = ["price"]
[[labels]]
name = "click"
column = "y"
[[tables]]
path = "items.tsv"
key = "iid"
categorical = ["brand"]
numeric = ["weight"]
multi = { tags = ";" }
'''
    )
    schema = DatasetSchema.from_toml(tmp_path / "s.toml")
    return load_dataset(schema, tmp_path)


def test_numerics_multi_and_failed_joins_encode_identically(tmp_path):
    data = _small_dataset(tmp_path)
    featurizer = Featurizer(FeatureSpec.from_prepared(data))
    for row in range(data.n):
        i = int(data.item_ids[row][1:])
        # reconstruct the raw row: log values from the generator above, item side from the table
        t = (int(data.ts_ms[row]) // 1000 - 1_000_000) // 3600
        context_cat, context_num = {"device": f"d{t % 3}"}, {"price": 1.5 * t}
        cand_cat, cand_num = ({"brand": f"b{i % 2}", "tags": f"t{i}|t{i + 1}"}, {"weight": 10.0 + i}) if i < 4 else ({}, {})
        user = str(data.user_ids[data.user_index[row]])
        cat, multi, num = featurizer.encode(user, int(data.ts_ms[row]), [data.item_ids[row]],
                                            context_cat, context_num, [cand_cat], [cand_num])
        np.testing.assert_array_equal(cat[0], data.cat[row])
        np.testing.assert_array_equal(multi[0], data.multi[row])
        np.testing.assert_allclose(num[0], data.num[row], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "context, field",
    [
        ({"nope": "1"}, "context.categorical[nope]"),
        ({"hour": "3"}, "context.categorical[hour]"),
        ({"uid": "u1"}, "context.categorical[uid]"),
        ({"price": "3"}, "context.categorical[price]"),
    ],
)
def test_unknown_or_reserved_features_are_named(tmp_path, context, field):
    featurizer = Featurizer(FeatureSpec.from_prepared(_small_dataset(tmp_path)))
    with pytest.raises(FeatureError) as err:
        featurizer.encode("u1", 1_000_000_000, ["i1"], context, {}, [{}], [{}])
    assert err.value.field == field


def test_candidate_order_and_count_are_kept(tmp_path):
    featurizer = Featurizer(FeatureSpec.from_prepared(_small_dataset(tmp_path)))
    items = [f"i{k % 5}" for k in range(1000)]
    cat, multi, num = featurizer.encode("u1", 1_000_000_000, items, {}, {}, [{}] * 1000, [{}] * 1000)
    assert cat.shape[0] == multi.shape[0] == num.shape[0] == 1000
    item_col = featurizer.spec.cat_fields.index("iid")
    assert len(set(cat[:5, item_col])) == 5 and (cat[5:10, item_col] == cat[:5, item_col]).all()


def test_the_cached_shared_part_equals_encoding_it_anew(tmp_path):
    """The shared part (user, UTC hour, context) is cached per request key: repeated users,
    times within and across hours (and days: the weekday), other contexts and numerics all
    give what a featurizer without the cache gives; a bad context fails every time."""
    spec = FeatureSpec.from_prepared(_small_dataset(tmp_path))
    cached, fresh = Featurizer(spec, shared_cache_size=64), Featurizer(spec, shared_cache_size=0)
    rng = np.random.default_rng(0)
    t0 = 1_700_000_000_000
    for _ in range(400):  # more keys than the cache holds, many of them repeated
        user = f"u{rng.integers(0, 3)}"
        when = t0 + int(rng.choice([0, 59 * 60_000, 3_600_000, 86_400_000 + 1, -1]))
        context_cat = {"device": f"d{rng.integers(0, 2)}"} if rng.random() < 0.8 else {}
        context_num = {"price": float(rng.integers(0, 3))} if rng.random() < 0.5 else {}
        items = [f"i{k}" for k in rng.integers(0, 5, 3)]
        args = (user, when, items, context_cat, context_num, [{}] * 3, [{}] * 3)
        for got, want in zip(cached.encode(*args), fresh.encode(*args)):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    info = cached._shared.cache_info()
    assert info.hits > 50 and info.currsize == 64, info  # hits and evictions both happened
    for _ in range(2):
        with pytest.raises(FeatureError, match=r"numeric\[price\]: must be a finite number"):
            cached.encode("u1", t0, ["i1"], {}, {"price": float("nan")}, [{}], [{}])
        with pytest.raises(FeatureError) as err:
            cached.encode("u1", t0, ["i1"], {"nope": "1"}, {}, [{}], [{}])
        assert err.value.field == "context.categorical[nope]"
