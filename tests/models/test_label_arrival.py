"""The offline loaders apply serving's late-label rule: a label that arrived at or after T is
unknown at T; arrival = timestamp + the schema's label_delay_s (default 0: every earlier
instance's label is known, as before)."""
from __future__ import annotations

import numpy as np
import pytest

from models.data.schema import DatasetSchema, SchemaError
from models.data.synthetic import synthetic_data

DELAY_MS = 6 * 3_600_000  # synthetic events are hours apart: some labels arrive after the next one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("arrival"), n_users=10, events_per_user=20)


def test_no_delay_keeps_every_earlier_label(data):
    hist = data.history_index(8)
    got = data.history_labels(hist, data.ts_ms)
    want = np.where((hist >= 0)[..., None], data.labels[np.clip(hist, 0, None)], -1)
    assert data.label_delay_ms == 0 and np.array_equal(got, want)


def test_a_delayed_label_is_unknown_until_it_arrived(data):
    delayed = data.with_arrays(label_delay_ms=DELAY_MS)
    hist = delayed.history_index(8)
    got = delayed.history_labels(hist, delayed.ts_ms)
    rows = np.clip(hist, 0, None)
    arrived = delayed.ts_ms[rows] + DELAY_MS
    for n, k in zip(*np.nonzero(hist >= 0)):
        if arrived[n, k] < delayed.ts_ms[n]:
            assert (got[n, k] == delayed.labels[hist[n, k]]).all()
        else:  # arrived at or after the instance that reads it
            assert (got[n, k] == -1).all()
    assert (got == -1).sum() > (data.history_labels(hist, data.ts_ms) == -1).sum()


def test_schema_label_delay_is_read_and_validated():
    raw = {"log": {"path": "x.csv", "user": "u", "item": "i", "timestamp": "t"},
           "labels": [{"name": "click", "column": "c"}]}
    assert DatasetSchema.from_dict(raw).label_delay_ms == 0
    assert DatasetSchema.from_dict({**raw, "label_delay_s": 1.5}).label_delay_ms == 1500
    with pytest.raises(SchemaError, match="label_delay_s"):
        DatasetSchema.from_dict({**raw, "label_delay_s": -1})
