"""Synthetic interaction logs with a planted sequential signal.

Each user has a *current interest* (an item category) that persists for a run of events and
then switches. Half of the items a user is shown come from the current interest; the user
likes them with high probability and the rest rarely. Static user/item features say nothing
about the current interest, while the user's recent instances (items AND their labels) do:
a sequence model that reads past instances should beat one that does not.

``write_synthetic(dir)`` writes the log, a user table and an item table (with a numeric
column and a multi-valued column) plus ``schema.toml``, so the data goes through the same
schema loader as MovieLens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data import PreparedData, load_dataset
from models.schema import DatasetSchema

SCHEMA_TOML = """\
name = "synthetic"

[log]
path = "events.tsv"
user = "user_id"
item = "item_id"
timestamp = "ts"
timestamp_unit = "s"
categorical = ["surface"]

[[labels]]
name = "like"
column = "like"

[[labels]]
name = "love"
column = "love"

[[tables]]
path = "users.tsv"
key = "user_id"
categorical = ["age_group", "region"]

[[tables]]
path = "items.tsv"
key = "item_id"
categorical = ["category"]
numeric = ["price"]
multi = { tags = "|" }
"""


def write_synthetic(out_dir: str | Path, *, n_users: int = 300, n_items: int = 400,
                    events_per_user: int = 60, n_categories: int = 8, seed: int = 0) -> Path:
    """Write a synthetic dataset into ``out_dir``; returns the path of its schema file."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    item_cat = rng.integers(0, n_categories, n_items)
    price = np.round(rng.lognormal(3.0, 0.6, n_items), 2)
    with (out / "items.tsv").open("w") as fh:
        fh.write("item_id\tcategory\tprice\ttags\n")
        for i in range(n_items):
            tags = "|".join(f"t{t}" for t in sorted({int(item_cat[i]) * 3 + int(x)
                                                      for x in rng.integers(0, 3, 2)}))
            fh.write(f"i{i}\tc{item_cat[i]}\t{price[i]}\t{tags}\n")
    with (out / "users.tsv").open("w") as fh:
        fh.write("user_id\tage_group\tregion\n")
        for u in range(n_users):
            fh.write(f"u{u}\t{rng.integers(0, 6)}\tr{rng.integers(0, 10)}\n")
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_categories)]
    t0 = 1_600_000_000
    with (out / "events.tsv").open("w") as fh:
        fh.write("user_id\titem_id\tts\tsurface\tlike\tlove\n")
        for u in range(n_users):
            n_events = max(5, int(rng.poisson(events_per_user)))
            times = np.sort(t0 + rng.integers(0, 60 * 86400, n_events))
            interest = int(rng.integers(0, n_categories))
            for t in times:
                if rng.random() < 0.08:  # interest drifts
                    interest = int(rng.integers(0, n_categories))
                pool = by_cat[interest] if rng.random() < 0.5 and len(by_cat[interest]) else None
                item = int(rng.choice(pool)) if pool is not None else int(rng.integers(0, n_items))
                match = item_cat[item] == interest
                like = int(rng.random() < (0.85 if match else 0.15))
                love = int(like and rng.random() < (0.5 if match else 0.1))
                fh.write(f"u{u}\ti{item}\t{t}\ts{rng.integers(0, 3)}\t{like}\t{love}\n")
    schema_path = out / "schema.toml"
    schema_path.write_text(SCHEMA_TOML)
    return schema_path


def synthetic_data(out_dir: str | Path, **kwargs) -> PreparedData:
    """Write a synthetic dataset and load it (the fast path for tests and the demo)."""
    schema_path = write_synthetic(out_dir, **kwargs)
    return load_dataset(DatasetSchema.from_toml(schema_path), out_dir)
