"""Synthetic interaction logs with a planted sequential signal.

Each user has two hidden states that persist for runs of events and then switch: a *mood*
(likes a lot / likes little) and a *current interest* (an item category; most shown items
come from it). P(like) = sigmoid(1.6 mood + 1.2 [item in current interest] + item quality).
Static user/item features reveal only item quality and the user's average mood; the user's
recent instances reveal the rest: their items show the current interest, and their LABELS
show the mood. So a model reading past instances and their labels (IAT with label side
info) should beat one reading past item ids only (the base model), which beats nothing.

``write_synthetic(dir)`` writes the log, a user table and an item table (with a numeric
column and a multi-valued column) plus ``schema.toml``, so the data goes through the same
schema loader as MovieLens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data.prepared import PreparedData, load_dataset
from models.data.schema import DatasetSchema

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
    quality = rng.normal(0.0, 0.8, n_items)
    t0 = 1_600_000_000
    with (out / "events.tsv").open("w") as fh:
        fh.write("user_id\titem_id\tts\tsurface\tlike\tlove\n")
        for u in range(n_users):
            n_events = max(5, int(rng.poisson(events_per_user)))
            times = np.sort(t0 + rng.integers(0, 60 * 86400, n_events))
            interest = int(rng.integers(0, n_categories))
            mood = 1.0 if rng.random() < 0.5 else -1.0
            for t in times:
                if rng.random() < 0.05:
                    interest = int(rng.integers(0, n_categories))
                if rng.random() < 0.05:
                    mood = -mood
                from_interest = rng.random() < 0.6 and len(by_cat[interest])
                item = int(rng.choice(by_cat[interest])) if from_interest else int(rng.integers(0, n_items))
                match = 1.0 if item_cat[item] == interest else -1.0
                p_like = 1.0 / (1.0 + np.exp(-(1.6 * mood + 0.6 * match + quality[item])))
                like = int(rng.random() < p_like)
                love = int(like and rng.random() < (0.6 if match > 0 else 0.2))
                fh.write(f"u{u}\ti{item}\t{t}\ts{rng.integers(0, 3)}\t{like}\t{love}\n")
    schema_path = out / "schema.toml"
    schema_path.write_text(SCHEMA_TOML)
    return schema_path


def synthetic_data(out_dir: str | Path, **kwargs) -> PreparedData:
    """Write a synthetic dataset and load it (the fast path for tests and the demo)."""
    schema_path = write_synthetic(out_dir, **kwargs)
    return load_dataset(DatasetSchema.from_toml(schema_path), out_dir)


CONTROL_SCHEMA_TOML = """\
name = "synthetic-{kind}"

[log]
path = "events.tsv"
user = "user_id"
item = "item_id"
timestamp = "ts"
timestamp_unit = "s"
categorical = ["hint", "variant"]

[[labels]]
name = "click"
column = "click"

[[tables]]
path = "users.tsv"
key = "user_id"
categorical = ["region"]

[[tables]]
path = "items.tsv"
key = "item_id"
categorical = ["category"]
"""

CONTROLS = ("positive", "negative")


def write_control(out_dir: str | Path, kind: str, *, n_users: int = 300, n_items: int = 200,
                  events_per_user: int = 60, hint_accuracy: float = 0.75, switch: float = 0.02,
                  strength: float = 2.5, seed: int = 0) -> Path:
    """A control dataset for the IAT claim; returns the path of its schema file.

    Every instance has a hidden state s = +-1 and two request-time features: ``hint`` (s with
    probability ``hint_accuracy``, else -s) and ``variant`` (c = +-1 at random);
    P(click) = sigmoid(strength * s * c + item quality). Averaged over c a label is the same for
    both states, so a past instance's label says nothing of s, nor does its item id: only its
    features do (its hint; its variant together with its label).

    - ``positive``: s is the user's and persists (it switches with probability ``switch`` per
      event), so past instances' features tell the current s far better than the instance's own
      hint. A correct IAT (which reads past instances' content) must beat the base model given
      past item ids and labels, and its own zero-InsEmb control.
    - ``negative``: s is drawn afresh for every instance: the same features and label mechanism,
      but past instances' features carry nothing about the current label; every history gain
      must be within noise of 0.

    The label is an interaction (s times c), which a network learns only after a plateau of
    some epochs: run the controls with at least 4 epochs.
    """
    if kind not in CONTROLS:
        raise ValueError(f"kind must be one of {CONTROLS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quality = rng.normal(0.0, 0.5, n_items)
    with (out / "items.tsv").open("w") as fh:
        fh.write("item_id\tcategory\n")
        for i in range(n_items):
            fh.write(f"i{i}\tc{rng.integers(0, 8)}\n")
    with (out / "users.tsv").open("w") as fh:
        fh.write("user_id\tregion\n")
        for u in range(n_users):
            fh.write(f"u{u}\tr{rng.integers(0, 10)}\n")
    t0 = 1_600_000_000
    with (out / "events.tsv").open("w") as fh:
        fh.write("user_id\titem_id\tts\thint\tvariant\tclick\n")
        for u in range(n_users):
            n_events = max(5, int(rng.poisson(events_per_user)))
            times = np.sort(t0 + rng.choice(60 * 86400, n_events, replace=False))  # no ties
            state = 1 if rng.random() < 0.5 else -1
            for t in times:
                if kind == "negative" or rng.random() < switch:
                    state = 1 if rng.random() < 0.5 else -1
                hint = state if rng.random() < hint_accuracy else -state
                variant = 1 if rng.random() < 0.5 else -1
                item = int(rng.integers(0, n_items))
                p = 1.0 / (1.0 + np.exp(-(strength * state * variant + quality[item])))
                fh.write(f"u{u}\ti{item}\t{t}\th{hint:+d}\tv{variant:+d}\t{int(rng.random() < p)}\n")
    schema_path = out / "schema.toml"
    schema_path.write_text(CONTROL_SCHEMA_TOML.format(kind=kind))
    return schema_path
