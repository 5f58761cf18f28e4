import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.training.metrics import auc, gauc, logloss


def _pairwise_auc(y, p):
    pos = [pi for yi, pi in zip(y, p) if yi]
    neg = [pi for yi, pi in zip(y, p) if not yi]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=40))
def test_auc_matches_pair_counting(pairs):
    y = [int(a) for a, _ in pairs]
    p = [b / 5 for _, b in pairs]
    if 0 < sum(y) < len(y):
        assert abs(auc(y, p) - _pairwise_auc(y, p)) < 1e-12
    else:
        assert np.isnan(auc(y, p))


def test_gauc_weights_by_impressions_and_skips_single_class_users():
    y = [1, 0, 1, 0, 0, 1, 1, 1]
    p = [0.9, 0.1, 0.2, 0.8, 0.5, 0.3, 0.3, 0.4]
    g = ["a", "a", "b", "b", "b", "c", "c", "c"]  # c has one class: skipped
    expected = (2 * 1.0 + 3 * auc([1, 0, 0], [0.2, 0.8, 0.5])) / 5
    assert abs(gauc(y, p, g) - expected) < 1e-12


def test_logloss():
    assert abs(logloss([1, 0], [0.5, 0.5]) - np.log(2)) < 1e-12
    assert logloss([1], [1.0]) < 1e-6  # clipped, finite
