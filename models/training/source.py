"""Training the IAT source models and computing InsEmbs over a ``PreparedData``."""
from __future__ import annotations

import numpy as np
import torch

from models.data.prepared import PreparedData
from models.nn.base import FeatureShape, ModelConfig
from models.nn.source import TemporalOrderSource, UserOrderSource
from models.training.batches import feature_batch
from models.training.loop import TrainConfig, fit, predict, shuffled_batches


def labelled_batch(data: PreparedData, rows: np.ndarray, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    batch = feature_batch(data, rows, cfg.seq_len)
    batch["ts_ms"] = torch.from_numpy(data.ts_ms[rows])
    return batch


@torch.no_grad()
def insembs(model: TemporalOrderSource, data: PreparedData, batch_size: int = 4096) -> np.ndarray:
    """InsEmb of every instance of ``data``: float32 [N, d] (row order of ``data``)."""
    model.eval()
    rows = np.arange(data.n)
    out = [model.embed(feature_batch(data, rows[i:i + batch_size], model.cfg.seq_len)).numpy()
           for i in range(0, data.n, batch_size)]
    return np.concatenate(out).astype(np.float32)


def user_sequences(data: PreparedData, rows: np.ndarray, window: int) -> list[np.ndarray]:
    """The given rows grouped by user in time order, cut into windows of at most ``window``."""
    rows = rows[np.lexsort((data.ts_ms[rows], data.user_index[rows]))]
    users = data.user_index[rows]
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    out = []
    for seq in np.split(rows, cuts):
        out.extend(seq[i:i + window] for i in range(0, len(seq), window))
    return out


def sequence_batch(data: PreparedData, seqs: list[np.ndarray], cfg: ModelConfig):
    s = max(len(q) for q in seqs)
    layout = np.full((len(seqs), s), -1, dtype=np.int64)
    for i, q in enumerate(seqs):
        layout[i, :len(q)] = q
    valid = layout >= 0
    flat = np.where(valid, layout, layout[:, :1]).ravel()
    batch = feature_batch(data, flat, cfg.seq_len)
    batch["ts"] = torch.from_numpy(data.ts_ms[flat].reshape(layout.shape))
    batch["valid"] = torch.from_numpy(valid)
    labels = torch.from_numpy(data.labels[flat].reshape(*layout.shape, -1))
    return batch, labels, batch["valid"].float()


def history_predict(model: UserOrderSource, data: PreparedData, rows: np.ndarray,
                    e_all: np.ndarray, window: int) -> np.ndarray:
    """Predictions of a user-order source model for ``rows`` with their history's InsEmbs
    taken from ``e_all`` (Eq. 8 form; how a trained SIT scores an instance)."""
    hist_idx = data.history_index(window - 1)

    def forward(chunk: np.ndarray) -> torch.Tensor:
        h = hist_idx[chunk]
        mask = h >= 0
        hc = np.clip(h, 0, None)
        batch = labelled_batch(data, chunk, model.cfg)
        logits, _ = model.forward_with_history(batch, torch.from_numpy(e_all[hc]),
                                               torch.from_numpy(data.ts_ms[hc]), torch.from_numpy(mask))
        return logits

    model.eval()
    return predict(forward, rows, batch_size=1024)


def train_temporal_source(data: PreparedData, cfg: ModelConfig, tcfg: TrainConfig, seed: int,
                          model: TemporalOrderSource | None = None, train_rows: np.ndarray | None = None,
                          val_rows: np.ndarray | None = None) -> tuple[TemporalOrderSource, dict]:
    model = model or TemporalOrderSource(cfg, FeatureShape.of(data))
    train = data.split_indices(0) if train_rows is None else train_rows
    val = data.split_indices(1) if val_rows is None else val_rows
    rng = np.random.default_rng(seed)

    def epoch_batches(epoch):
        for rows in shuffled_batches(train, tcfg.batch_size, rng):
            yield feature_batch(data, rows, cfg.seq_len), torch.from_numpy(data.labels[rows]), None

    def validate():
        model.eval()
        return data.labels[val], predict(lambda r: model(feature_batch(data, r, cfg.seq_len)), val)

    info = fit(model, epoch_batches, validate, tcfg, desc="temporal source")
    return model, info


def train_user_order_source(data: PreparedData, cfg: ModelConfig, tcfg: TrainConfig, seed: int,
                            window: int = 128, instances_per_batch: int | None = None,
                            user_order: np.ndarray | None = None,
                            model: UserOrderSource | None = None, train_rows: np.ndarray | None = None,
                            val_rows: np.ndarray | None = None) -> tuple[UserOrderSource, dict]:
    """Batch user-order training (Eq. 6): each batch holds whole windows of users' train
    instances in time order. ``user_order`` fixes the order users are visited (two-pass);
    by default windows are shuffled each epoch."""
    model = model or UserOrderSource(cfg, FeatureShape.of(data))
    train = data.split_indices(0) if train_rows is None else train_rows
    val = data.split_indices(1) if val_rows is None else val_rows
    rng = np.random.default_rng(seed)
    seqs = user_sequences(data, train, window)
    instances_per_batch = instances_per_batch or tcfg.batch_size

    def epoch_batches(epoch):
        if user_order is None:
            ordered = [seqs[i] for i in rng.permutation(len(seqs))]
        else:
            rank = np.empty(data.n_users, dtype=np.int64)
            rank[user_order] = np.arange(len(user_order))
            ordered = sorted(seqs, key=lambda q: (rank[data.user_index[q[0]]], data.ts_ms[q[0]]))
        group, count = [], 0
        for q in ordered:
            group.append(q)
            count += len(q)
            if count >= instances_per_batch:
                yield sequence_batch(data, group, cfg)
                group, count = [], 0
        if group:
            yield sequence_batch(data, group, cfg)

    def validate():
        e_all = insembs(model, data)
        return data.labels[val], history_predict(model, data, val, e_all, window)

    info = fit(model, epoch_batches, validate, tcfg, desc="user-order source")
    return model, info
