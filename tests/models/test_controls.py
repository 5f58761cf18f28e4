"""The synthetic controls of the IAT claim: in the positive one past instances' FEATURES (their
hints) tell the next label while past labels do not; in the negative one no past feature does.
Checked on the generated data itself, by counting."""
from __future__ import annotations

import numpy as np
import pytest

from models.data.prepared import load_dataset
from models.data.schema import DatasetSchema
from models.data.synthetic import write_control
from models.runtime.hashing import hash_bucket


def signed(data, field, plus):
    """+1 / -1 per instance for a two-valued categorical field."""
    col = data.cat[:, data.cat_fields.index(field)]
    return np.where(col == hash_bucket(field, plus, data.n_buckets), 1, -1)


@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_only_the_positive_control_puts_the_signal_in_past_features(tmp_path, kind):
    data = load_dataset(DatasetSchema.from_toml(write_control(tmp_path, kind, n_users=200)), tmp_path)
    y = data.labels[:, 0] > 0
    hint, variant = signed(data, "hint", "h+1"), signed(data, "variant", "v+1")
    past = data.history_index(8)
    rows = np.flatnonzero(past[:, -1] >= 0)  # instances with 8 earlier ones
    past_hints = hint[past[rows]].sum(1)     # odd: never 0
    from_past = np.mean(y[rows] == (past_hints * variant[rows] > 0))    # past instances' features
    from_own = np.mean(y[rows] == (hint[rows] * variant[rows] > 0))     # the instance's own hint
    previous = past[rows, 0]
    label_gap = abs(y[rows][y[previous]].mean() - y[rows][~y[previous]].mean())  # a past label
    assert label_gap < 0.04, label_gap
    assert 0.64 < from_own < 0.76, from_own
    if kind == "positive":
        assert from_past > from_own + 0.08, (from_past, from_own)
    else:
        assert abs(from_past - 0.5) < 0.03, from_past
