"""Training and offline prediction of the IAT downstream model (batches from ``PreparedData``)."""
from __future__ import annotations

import numpy as np
import torch

from models.data.prepared import PreparedData
from models.nn.base import FeatureShape, ModelConfig
from models.nn.downstream import IATDownstream
from models.training.batches import feature_batch, history_labels
from models.training.loop import TrainConfig, fit, predict, shuffled_batches


def iat_batch(data: PreparedData, rows: np.ndarray, insemb: np.ndarray, cfg: ModelConfig,
              hist_index: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Features of ``rows`` plus their IAT sequence (InsEmbs of the same user's instances
    strictly before each row, newest first), cut to the longest history in the batch."""
    hist = (data.history_index(cfg.history_len) if hist_index is None else hist_index)[rows]
    width = max(1, int((hist >= 0).sum(1).max()) if len(rows) else 1)
    hist = hist[:, :width]
    mask = hist >= 0
    hc = np.clip(hist, 0, None)
    batch = feature_batch(data, rows, cfg.seq_len)
    batch["ts_ms"] = torch.from_numpy(data.ts_ms[rows])
    batch["hist_emb"] = torch.from_numpy(insemb[hc] * mask[..., None])
    batch["hist_labels"] = torch.from_numpy(history_labels(data, hist))
    batch["hist_ts"] = torch.from_numpy(np.where(mask, data.ts_ms[hc], data.ts_ms[rows][:, None]))
    batch["hist_mask"] = torch.from_numpy(mask)
    return batch


def train_downstream(data: PreparedData, insemb: np.ndarray, cfg: ModelConfig, tcfg: TrainConfig,
                     seed: int, desc: str = "downstream") -> tuple[IATDownstream, dict]:
    model = IATDownstream(cfg, FeatureShape.of(data))
    train, val = data.split_indices(0), data.split_indices(1)
    rng = np.random.default_rng(seed)
    lengths = np.minimum(data.history_length(), cfg.history_len)

    def epoch_batches(epoch):
        for rows in shuffled_batches(train, tcfg.batch_size, rng, lengths=lengths):
            yield iat_batch(data, rows, insemb, cfg), torch.from_numpy(data.labels[rows]), None

    def validate():
        model.eval()
        return data.labels[val], predict_downstream(model, data, val, insemb)

    info = fit(model, epoch_batches, validate, tcfg, desc=desc)
    return model, info


def predict_downstream(model: IATDownstream, data: PreparedData, rows: np.ndarray,
                       insemb: np.ndarray) -> np.ndarray:
    model.eval()
    lengths = np.minimum(data.history_length()[rows], model.cfg.history_len)
    order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
    probs = predict(lambda r: model(iat_batch(data, r, insemb, model.cfg)), rows[order], batch_size=1024)
    out = np.empty_like(probs)
    out[order] = probs
    return out
