"""Batch user-order training of the source model on a fixed user order (the two-pass protocol
itself is tested in test_protocol.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import ModelConfig
from models.nn.source import UserOrderSource
from models.training.loop import TrainConfig
from models.training.source import train_user_order_source

CFG = ModelConfig(emb_dim=8, seq_len=8, insemb_dim=16, sit_ffn=32)
TCFG = TrainConfig(epochs=1, batch_size=128, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=30, n_items=40, events_per_user=20)


def test_user_order_training_on_a_fixed_user_order(data):
    order = np.arange(data.n_users)[::-1].copy()
    model, info = train_user_order_source(data, CFG, TCFG, seed=0, window=16, user_order=order)
    assert isinstance(model, UserOrderSource) and len(info["epochs"]) == 1
