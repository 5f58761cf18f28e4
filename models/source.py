"""IAT source models: compress each instance into a d-dim InsEmb.

- ``TemporalOrderSource`` (Eq. 4-5): e = GELU(h Wc + bc); h' = GELU(e Wd + bd) -> heads.
- ``UserOrderSource`` (Eq. 6): the same compression, then the Source Instance Transformer
  (SIT) over a user's instances in time order before decompression. Causality is by
  timestamp: an instance sees only instances of the same user strictly earlier (and itself),
  so a tie at the same millisecond is never visible. The stored InsEmb is e, from BEFORE the
  SIT (the paper found after-SIT embeddings worse downstream).

``embed(batch) -> e [B, d]`` maps a batch of instances to InsEmbs; ``insembs(model, data)``
runs it over every instance of a ``PreparedData``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import Backbone, FeatureShape, ModelConfig, TaskHeads
from models.data import PreparedData
from models.features import feature_batch
from models.layers import SelfAttentionBlock
from models.training import TrainConfig, fit, predict, shuffled_batches


class TemporalOrderSource(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: FeatureShape):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, shape)
        self.compress = nn.Linear(self.backbone.out_dim, cfg.insemb_dim)
        self.decompress = nn.Linear(cfg.insemb_dim, self.backbone.out_dim)
        self.heads = TaskHeads(self.backbone.out_dim, shape.n_tasks, cfg.head_hidden)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """InsEmb e = GELU(h Wc + bc) (Eq. 4): [B, d]."""
        return F.gelu(self.compress(self.backbone(batch)))

    def decode(self, e: torch.Tensor) -> torch.Tensor:
        """Logits from a (possibly SIT-mixed) compressed representation (Eq. 5 + heads)."""
        return self.heads(F.gelu(self.decompress(e)))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode(self.embed(batch))


def sit_mask(ts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """allowed[b, k, j] = valid[b, j] and (ts[b, j] < ts[b, k] or j == k): strict causality by
    time, whatever the order of the sequence (time order in batch training, current-first
    then newest-first in streaming)."""
    s = ts.shape[1]
    allowed = (ts[:, None, :] < ts[:, :, None]) & valid[:, None, :]
    # the identity built from a tensor, not torch.eye(device=): a trace freezes a factory's device
    ones = allowed.new_ones((s, s))
    return allowed | (ones.tril() & ones.triu())[None]


class UserOrderSource(TemporalOrderSource):
    def __init__(self, cfg: ModelConfig, shape: FeatureShape):
        super().__init__(cfg, shape)
        self.sit = nn.ModuleList(SelfAttentionBlock(cfg.insemb_dim, cfg.sit_heads, cfg.sit_ffn)
                                 for _ in range(cfg.sit_layers))
        self.sit_norm = nn.LayerNorm(cfg.insemb_dim)

    def run_sit(self, e: torch.Tensor, ts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """SIT over e [B, S, d] with timestamps ts [B, S] and validity [B, S] (Eq. 6 / 8)."""
        allowed = sit_mask(ts, valid)
        x = e
        for block in self.sit:
            x = block(x, allowed)
        return self.sit_norm(x)

    def forward_sequence(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch user-order training: features of B*S instances laid out as ``batch["ts"]``
        [B, S] (user sequences in time order, padded); logits [B, S, T]."""
        b, s = batch["ts"].shape
        e = self.embed(batch).view(b, s, -1)
        return self.decode(self.run_sit(e, batch["ts"], batch["valid"]))

    def forward_with_history(self, batch: dict[str, torch.Tensor], hist_e: torch.Tensor,
                             hist_ts: torch.Tensor, hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7-8: input [e_current ; sg(E_hist)] (history newest first); returns
        (logits of output[:, 0] [B, T], e_current [B, d])."""
        e_cur = self.embed(batch)
        seq = torch.cat([e_cur.unsqueeze(1), hist_e.detach()], dim=1)
        ts = torch.cat([batch["ts_ms"].unsqueeze(1), hist_ts], dim=1)
        valid = torch.cat([torch.ones_like(hist_mask[:, :1]), hist_mask], dim=1)
        z = self.run_sit(seq, ts, valid)[:, 0]
        return self.decode(z), e_cur

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_sequence(batch)


# ---------------------------------------------------------------- data plumbing

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


def two_pass_insembs(data: PreparedData, cfg: ModelConfig, tcfg: TrainConfig, seed: int,
                     window: int = 128) -> tuple[np.ndarray, dict]:
    """App. A.3: two single-pass jobs over users in opposite orders; each instance keeps the
    InsEmb from the job that visited its user in the later half (a better-converged model).
    Instances outside the training split take the InsEmb of the job that owns their user."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(data.n_users)
    one_pass = TrainConfig(**{**tcfg.__dict__, "epochs": 1})
    forward_model, _ = train_user_order_source(data, cfg, one_pass, seed, window, user_order=order)
    e_forward = insembs(forward_model, data)
    backward_model, _ = train_user_order_source(data, cfg, one_pass, seed + 1, window,
                                                user_order=order[::-1].copy())
    e_backward = insembs(backward_model, data)
    late_in_forward = np.zeros(data.n_users, dtype=bool)
    late_in_forward[order[len(order) // 2:]] = True
    keep_forward = late_in_forward[data.user_index]
    return np.where(keep_forward[:, None], e_forward, e_backward), {"users_from_forward": int(late_in_forward.sum())}


def user_crossfit_insembs(data: PreparedData, train_fn, seed: int, folds: int = 2
                          ) -> tuple[np.ndarray, list[dict]]:
    """InsEmbs such that no instance's InsEmb comes from a source model trained on ITS USER's
    labels: users are split into ``folds`` groups; the model trained on the other groups'
    train instances embeds this group's instances (all splits).

    Why: a multi-epoch source model memorises each user's label rate in its user-level
    parameters (user id, and side features that nearly identify a user). InsEmbs of a user's
    PAST instances then carry the user's FUTURE training labels, the current one included:
    the downstream model learns that shortcut in training and it vanishes on validation/test.
    (The paper's single streaming pass never trains on an instance before embedding it; this
    is the multi-epoch equivalent, and like App. A.3 it keeps each user's InsEmbs from the job
    that did not train on that user.)

    ``train_fn(train_rows, val_rows, fold) -> model`` trains one source model."""
    rng = np.random.default_rng(seed + 7919)
    fold_of_user = rng.permutation(data.n_users) % folds
    fold = fold_of_user[data.user_index]
    e_all = np.zeros((data.n, 0), dtype=np.float32)
    infos = []
    for k in range(folds):
        train_rows = np.flatnonzero((data.split == 0) & (fold != k))
        val_rows = np.flatnonzero((data.split == 1) & (fold != k))
        model, info = train_fn(train_rows, val_rows, k)
        e_fold = insembs(model, data)
        if e_all.shape[1] == 0:
            e_all = np.zeros_like(e_fold)
        e_all[fold == k] = e_fold[fold == k]
        info["model"] = model
        infos.append(info)
    return e_all, infos
