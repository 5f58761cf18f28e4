"""Source-model InsEmb protocols: user cross-fitting and the two-pass user order (App. A.3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import FeatureShape, ModelConfig
from models.nn.source import TemporalOrderSource, UserOrderSource
from models.training.loop import TrainConfig
from models.training.source import (
    insembs,
    train_user_order_source,
    two_pass_insembs,
    user_crossfit_insembs,
)

CFG = ModelConfig(emb_dim=8, seq_len=8, insemb_dim=16, sit_ffn=32)
TCFG = TrainConfig(epochs=1, batch_size=128, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=30, n_items=40, events_per_user=20)


def test_crossfit_never_embeds_a_user_with_a_model_trained_on_it(data):
    trained_users = {}

    def train_fn(train_rows, val_rows, fold):
        torch.manual_seed(fold)
        trained_users[fold] = set(data.user_index[train_rows].tolist())
        assert (data.split[train_rows] == 0).all() and (data.split[val_rows] == 1).all()
        return TemporalOrderSource(CFG, FeatureShape.of(data)).eval(), {}

    e_all, infos = user_crossfit_insembs(data, train_fn, seed=0, folds=2)
    assert e_all.shape == (data.n, CFG.insemb_dim)
    assert trained_users[0].isdisjoint(trained_users[1])
    for k, info in enumerate(infos):
        own = np.isin(data.user_index, sorted(trained_users[1 - k]))  # users NOT in model k's training
        np.testing.assert_allclose(e_all[own], insembs(info["model"], data)[own], rtol=1e-6)
        assert not np.isin(data.user_index[own], sorted(trained_users[k])).any()


def test_user_order_training_on_a_fixed_user_order(data):
    order = np.arange(data.n_users)[::-1].copy()
    model, info = train_user_order_source(data, CFG, TCFG, seed=0, window=16, user_order=order)
    assert isinstance(model, UserOrderSource) and len(info["epochs"]) == 1


def test_two_pass_keeps_each_users_late_job(data):
    e, info = two_pass_insembs(data, CFG, TCFG, seed=0, window=16)
    assert e.shape == (data.n, CFG.insemb_dim) and np.isfinite(e).all()
    assert info["users_from_forward"] == data.n_users - data.n_users // 2
