"""No future leakage: changing any OTHER instance at or after a request's timestamp (features,
labels, item) must leave the request's prediction unchanged, for the user-order source model
(SIT, batch and store forms) and for the downstream model (both attention variants)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import FeatureShape, ModelConfig
from models.nn.downstream import IATDownstream
from models.nn.source import UserOrderSource
from models.training.downstream import iat_batch
from models.training.source import (
    insembs,
    labelled_batch,
    sequence_batch,
    user_sequences,
)

CFG = ModelConfig(emb_dim=8, seq_len=10, history_len=16, insemb_dim=16, sit_ffn=32,
                  adapt_dim=24, iat_width=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    d = synthetic_data(tmp_path_factory.mktemp("syn"), n_users=12, n_items=40, events_per_user=25)
    # Force timestamp ties: within-user duplicates of a timestamp must not see each other.
    ts = d.ts_ms.copy()
    ts[1::4] = ts[0::4][: len(ts[1::4])]
    order = np.argsort(ts, kind="stable")
    return d.with_arrays(**{k: getattr(d, k)[order] for k in
                            ("user_index", "item_ids", "item_hash", "ins_id", "cat", "multi", "num",
                             "labels", "split")}, ts_ms=ts[order])


def _requests(data, k=6):
    """Requests with a non-trivial history and at least one other instance of the same user
    at or after their timestamp."""
    hist_len = data.history_length()
    rng = np.random.default_rng(0)
    out = []
    for r in rng.permutation(data.n):
        same_user = data.user_index == data.user_index[r]
        later = same_user & (data.ts_ms >= data.ts_ms[r])
        later[r] = False
        if hist_len[r] >= 3 and later.any():
            out.append(int(r))
        if len(out) == k:
            break
    return out


def _perturb_future(data, r, seed):
    """Scramble every instance other than r with ts >= ts[r] (all users)."""
    rng = np.random.default_rng(seed)
    future = data.ts_ms >= data.ts_ms[r]
    future[r] = False
    cat, multi, num, labels, item_hash = (data.cat.copy(), data.multi.copy(), data.num.copy(),
                                          data.labels.copy(), data.item_hash.copy())
    n_f = int(future.sum())
    cat[future] = rng.integers(0, data.n_buckets, (n_f, cat.shape[1]))
    multi[future] = rng.integers(0, data.n_buckets, (n_f,) + multi.shape[1:])
    num[future] = rng.normal(size=(n_f, num.shape[1])) * 5
    labels[future] = 1.0 - labels[future]
    item_hash[future] = rng.integers(0, data.n_buckets, n_f)
    return data.with_arrays(cat=cat, multi=multi, num=num, labels=labels, item_hash=item_hash), future


def test_history_index_is_strictly_before(data):
    hist = data.history_index(16)
    for r in range(data.n):
        h = hist[r][hist[r] >= 0]
        assert (data.user_index[h] == data.user_index[r]).all()
        assert (data.ts_ms[h] < data.ts_ms[r]).all()
        assert (np.diff(data.ts_ms[h]) <= 0).all()  # newest first
        expected = np.sum((data.user_index == data.user_index[r]) & (data.ts_ms < data.ts_ms[r]))
        assert len(h) == min(16, expected)


def test_user_order_source_is_causal(data):
    torch.manual_seed(0)
    model = UserOrderSource(CFG, FeatureShape.of(data)).eval()
    requests = _requests(data)
    assert requests
    for r in requests:
        changed, future = _perturb_future(data, r, seed=r)
        assert future.sum() > 0
        # batch user-order form: the user's whole sequence in one SIT window
        outs = []
        for d in (data, changed):
            seq = [s for s in user_sequences(d, np.arange(d.n), window=10_000)
                   if r in s][0]
            batch, _, _ = sequence_batch(d, [seq], CFG)
            with torch.no_grad():
                logits = model.forward_sequence(batch)[0]
            outs.append(logits[int(np.flatnonzero(seq == r)[0])])
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
        # the scrambled future really changes the future instances' outputs
        # store (Eq. 8) form: history InsEmbs fetched strictly before ts
        store_outs = []
        for d in (data, changed):
            e_all = insembs(model, d)
            h = d.history_index(15)[[r]]
            mask = h >= 0
            hc = np.clip(h, 0, None)
            with torch.no_grad():
                logits, _ = model.forward_with_history(labelled_batch(d, np.array([r]), CFG),
                                                       torch.from_numpy(e_all[hc]),
                                                       torch.from_numpy(d.ts_ms[hc]),
                                                       torch.from_numpy(mask))
            store_outs.append(logits)
        torch.testing.assert_close(store_outs[0], store_outs[1], rtol=0, atol=1e-6)


def test_sit_output_does_change_with_the_past(data):
    """Guard against a vacuous causality test: changing the PAST does change the output."""
    torch.manual_seed(0)
    model = UserOrderSource(CFG, FeatureShape.of(data)).eval()
    r = _requests(data)[0]
    past = (data.ts_ms < data.ts_ms[r]) & (data.user_index == data.user_index[r])
    cat = data.cat.copy()
    cat[past] = (cat[past] + 7) % data.n_buckets
    changed = data.with_arrays(cat=cat)
    outs = []
    for d in (data, changed):
        seq = [s for s in user_sequences(d, np.arange(d.n), window=10_000) if r in s][0]
        batch, _, _ = sequence_batch(d, [seq], CFG)
        with torch.no_grad():
            outs.append(model.forward_sequence(batch)[0][int(np.flatnonzero(seq == r)[0])])
    assert not torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("attention", ["shared", "full"])
def test_downstream_ignores_the_future(data, attention):
    from dataclasses import replace
    cfg = replace(CFG, attention=attention)
    torch.manual_seed(0)
    source = UserOrderSource(cfg, FeatureShape.of(data)).eval()
    model = IATDownstream(cfg, FeatureShape.of(data)).eval()
    for r in _requests(data):
        changed, _ = _perturb_future(data, r, seed=r + 1)
        outs = []
        for d in (data, changed):
            e_all = insembs(source, d)  # InsEmbs regenerated from the changed data
            with torch.no_grad():
                outs.append(model(iat_batch(d, np.array([r]), e_all, cfg)))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
        # and the past matters: flipping the past labels changes the prediction
        past = (data.ts_ms < data.ts_ms[r]) & (data.user_index == data.user_index[r])
        flipped = data.with_arrays(labels=np.where(past[:, None], 1 - data.labels, data.labels))
        with torch.no_grad():
            e_all = insembs(source, flipped)
            moved = model(iat_batch(flipped, np.array([r]), e_all, cfg))
        assert not torch.allclose(outs[0], moved, atol=1e-6)
