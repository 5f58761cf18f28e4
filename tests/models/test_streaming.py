"""Streaming user-order training (Eq. 7-8) through a HistoryProvider: in memory, and on a real
Redis instance store (the same numbers either way)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import FeatureShape, ModelConfig
from models.nn.source import UserOrderSource
from models.training.source import insembs
from models.training.streaming import (
    HistoryProvider,
    InMemoryHistoryProvider,
    streaming_forward,
    train_streaming,
)

CFG = ModelConfig(emb_dim=8, seq_len=10, insemb_dim=16, sit_ffn=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=60, n_items=60, events_per_user=30, n_categories=4)


def _fresh_model(data, seed=0):
    torch.manual_seed(seed)
    return UserOrderSource(CFG, FeatureShape.of(data))


def test_in_memory_provider_contract():
    p = InMemoryHistoryProvider(dim=2)
    assert isinstance(p, HistoryProvider)
    p.write([1, 2, 3], ["u", "u", "v"], [10, 20, 20], np.array([[1, 1], [2, 2], [3, 3]], np.float32))
    p.write([2], ["u"], [20], np.array([[5, 5]], np.float32))  # re-write: replaced, not duplicated
    emb, mask = p.fetch(["u", "u", "v", "w"], [21, 20, 20, 99], 3)
    assert mask.tolist() == [[True, True, False], [True, False, False], [False] * 3, [False] * 3]
    assert emb[0, :2].tolist() == [[5, 5], [1, 1]]  # newest first
    assert emb[1, 0].tolist() == [1, 1]  # strictly before 20


def test_streaming_writes_only_current_and_stops_gradient(data):
    model = _fresh_model(data)
    provider = InMemoryHistoryProvider(CFG.insemb_dim)
    rows = np.flatnonzero(data.split == 0)
    out = train_streaming(model, data, rows, provider, history_limit=15, batch_size=64)
    assert provider.writes == len(rows)  # one write per instance, no history rewritten
    assert len(out["losses"]) == int(np.ceil(len(rows) / 64))
    # a later pass reads back what was written, and the history carries no gradient
    chunk = rows[-8:]
    users = [str(u) for u in data.user_ids[data.user_index[chunk]]]
    hist, mask = provider.fetch(users, data.ts_ms[chunk], 15)
    assert mask.any()
    hist_t = torch.from_numpy(hist).requires_grad_(True)
    from models.training.source import labelled_batch
    logits, _ = streaming_forward(model, labelled_batch(data, chunk, CFG), hist_t, torch.from_numpy(mask))
    logits.sum().backward()
    assert hist_t.grad is None  # sg(E_hist)


def test_streaming_training_reduces_the_loss(data):
    """Repeated streaming passes over the training period (fresh store each pass) lower the
    mean training loss: the Eq. 8 path trains the compression, SIT and heads."""
    model = _fresh_model(data)
    rows = np.flatnonzero(data.split == 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    means = []
    for _ in range(3):
        provider = InMemoryHistoryProvider(CFG.insemb_dim)
        out = train_streaming(model, data, rows, provider, history_limit=15, batch_size=32, optimizer=opt)
        means.append(float(np.mean(out["losses"])))
    assert means[-1] < means[0] - 0.005, means
    # scoring (train=False) leaves the parameters alone
    before = [p.detach().clone() for p in model.parameters()]
    train_streaming(model, data, np.flatnonzero(data.split == 1), provider, history_limit=15, train=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_redis_provider_matches_in_memory(data, redis_client):
    from cli.experiment import RedisHistoryProvider
    from storage.instance_store import InstanceStore

    rows = np.flatnonzero(data.split == 0)[:600]
    results = []
    for provider in (InMemoryHistoryProvider(CFG.insemb_dim),
                     RedisHistoryProvider(InstanceStore(redis_client, prefix="t", dim=CFG.insemb_dim,
                                                        codec="fp32", max_sequence_length=64),
                                          source_version="test-src")):
        model = _fresh_model(data, seed=3)
        out = train_streaming(model, data, rows, provider, history_limit=15, batch_size=50)
        e = insembs(model, data)
        results.append((out["losses"], e, provider.fetch(["u3", "u7"], [2_000_000_000_000] * 2, 15)))
    (l_mem, e_mem, (h_mem, m_mem)), (l_red, e_red, (h_red, m_red)) = results
    np.testing.assert_allclose(l_mem, l_red, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e_mem, e_red, rtol=1e-5, atol=1e-6)
    assert m_red.any() and (m_mem == m_red).all()
    np.testing.assert_allclose(h_mem, h_red, rtol=1e-6)
    # the store holds exactly one sequence entry per streamed instance
    store = InstanceStore(redis_client, prefix="t", dim=CFG.insemb_dim)
    users = {str(u) for u in data.user_ids[data.user_index[rows]]}
    assert sum(store.sequence_length(u) for u in users) == len(rows)
