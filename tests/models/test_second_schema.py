"""A second schema, with other column names, a side table with a numeric and a multi-valued
column, ms timestamps, a request-id column and a 0/1 label, runs end to end through
`iat experiment`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli import main as iat_main
from models.data.prepared import load_dataset
from models.data.schema import DatasetSchema

SCHEMA = """\
name = "shop-clicks"

[log]
path = "clicks.csv"
user = "visitor"
item = "sku"
timestamp = "when_ms"
timestamp_unit = "ms"
request = "req"
categorical = ["device"]
numeric = ["position"]

[[labels]]
name = "click"
column = "clicked"

[[labels]]
name = "big_basket"
column = "basket_value"
min = 50

[[tables]]
path = "products.tsv"
key = "sku"
categorical = ["brand"]
numeric = ["price"]
multi = { labels = ";" }
"""


def write_shop(tmp_path, n_visitors=40, n_skus=30, per_visitor=30, seed=0):
    rng = np.random.default_rng(seed)
    brand = rng.integers(0, 4, n_skus)
    with (tmp_path / "products.tsv").open("w") as fh:
        fh.write("sku\tbrand\tprice\tlabels\n")
        for s in range(n_skus - 2):  # two skus missing from the side table: joined as absent
            tags = ";".join(sorted({f"tag{brand[s]}", f"tag{rng.integers(0, 6)}"}))
            fh.write(f"P{s}\tb{brand[s]}\t{rng.uniform(1, 99):.2f}\t{tags}\n")
    with (tmp_path / "clicks.csv").open("w") as fh:
        fh.write("req,visitor,sku,when_ms,device,position,clicked,basket_value\n")
        for v in range(n_visitors):
            fav = rng.integers(0, 4)
            t = 1_700_000_000_000 + int(rng.integers(0, 10**8))
            for k in range(per_visitor):
                t += int(rng.integers(1, 10**7))
                s = int(rng.integers(0, n_skus))
                click = int(rng.random() < (0.8 if brand[s] == fav else 0.2))
                fh.write(f"r{v}-{k},V{v},P{s},{t},{rng.choice(['ios', 'web'])},{k % 10},"
                         f"{click},{rng.integers(0, 100) if click else 0}\n")
    (tmp_path / "shop.toml").write_text(SCHEMA)
    return tmp_path / "shop.toml"


def test_second_schema_loads(tmp_path):
    path = write_shop(tmp_path)
    data = load_dataset(DatasetSchema.from_toml(path), tmp_path)
    assert data.tasks == ["click", "big_basket"]
    assert data.cat_fields == ["visitor", "sku", "device", "brand", "hour", "weekday"]
    assert data.multi_fields == ["labels"] and data.num_fields == ["position", "price"]
    assert data.field_groups["item"] == ["sku", "brand", "price", "labels"]
    assert data.field_groups["context"] == ["device", "position", "hour", "weekday"]
    # absent side-table rows: no multi values, numeric at the train mean (0 after z-scoring)
    missing = np.isin(data.item_ids, ["P28", "P29"])
    assert missing.any() and (data.multi[missing] == -1).all() and (data.num[missing, 1] == 0).all()
    train = data.split == 0
    assert abs(data.num[train, 0].mean()) < 1e-5 and abs(data.num[train, 0].std() - 1) < 1e-3


@pytest.mark.slow
def test_second_schema_runs_end_to_end(tmp_path):
    path = write_shop(tmp_path)
    out = tmp_path / "out"
    rc = iat_main(["experiment", "--schema", str(path), "--data-dir", str(tmp_path), "--out", str(out),
                   "--quick", "--seeds", "2", "--workers", "1", "--no-progress",
                   "--rows", "base,temporal_iat,user_iat,user_iat_full_attention"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "shop-clicks"
    assert [r["model"] for r in results["rows"]] == ["base", "temporal_iat", "user_iat",
                                                     "user_iat_full_attention"]
    for row in results["rows"]:
        assert 0.0 <= row["auc"] <= 1.0 and row["logloss"] > 0 and row["auc_std"] >= 0
        assert set(row["per_task"]) == {"click", "big_basket"}
        assert row["per_task"]["click"]["auc"] == row["auc"]
        assert len(row["runs"]) == 2
    assert (out / "results.png").stat().st_size > 1000


def test_bad_data_dir_is_a_clear_error(tmp_path, capsys):
    path = write_shop(tmp_path)
    rc = iat_main(["experiment", "--schema", str(path), "--data-dir", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "clicks.csv" in capsys.readouterr().err
