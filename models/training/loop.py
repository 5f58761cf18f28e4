"""Training loop with early stopping on validation AUC (first task), and batch prediction."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.training.metrics import auc


@dataclass
class TrainConfig:
    epochs: int = 2
    patience: int = 1
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    progress: bool = True


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def shuffled_batches(rows: np.ndarray, batch_size: int, rng: np.random.Generator,
                     lengths: np.ndarray | None = None, bucket: int = 32) -> list[np.ndarray]:
    """Random batches; with ``lengths``, rows of similar length share a batch (groups of
    ``bucket`` batches are sorted by length) so padded history is cut per batch."""
    rows = rng.permutation(rows)
    if lengths is None:
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out = []
    span = batch_size * bucket
    for start in range(0, len(rows), span):
        chunk = rows[start:start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def bce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp(min=1.0)


def fit(model: torch.nn.Module,
        epoch_batches: Callable[[int], Iterable[tuple[dict, torch.Tensor, torch.Tensor | None]]],
        validate: Callable[[], tuple[np.ndarray, np.ndarray]],
        cfg: TrainConfig, desc: str = "train",
        on_epoch_start: Callable[[int], None] | None = None) -> dict:
    """Train with Adam; after each epoch score validation (labels, probs), keep the best state
    by first-task AUC, stop after ``patience`` epochs without improvement, restore the best.

    ``epoch_batches(epoch)`` yields (batch, labels [B, T], loss weight [B] or None); the
    model's ``forward(batch)`` returns logits of the same shape as the labels.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_auc, best_state, best_epoch, history = -1.0, None, -1, []
    for epoch in range(cfg.epochs):
        if on_epoch_start:
            on_epoch_start(epoch)
        model.train()
        batches = list(epoch_batches(epoch))
        total = 0.0
        for batch, labels, weight in tqdm(batches, desc=f"{desc} ep{epoch}", leave=False,
                                          disable=not cfg.progress, mininterval=2.0):
            loss = bce(model(batch), labels, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        y, p = validate()
        val_auc = auc(y[:, 0], p[:, 0])
        history.append({"epoch": epoch, "train_loss": total / max(1, len(batches)), "val_auc": val_auc})
        if val_auc > best_auc:
            best_auc, best_epoch = val_auc, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_val_auc": best_auc, "best_epoch": best_epoch, "epochs": history}


@torch.no_grad()
def predict(forward: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray,
            batch_size: int = 2048) -> np.ndarray:
    """Sigmoid of ``forward(row batch)`` over all rows, in row order: float32 [n, T]."""
    outs = [torch.sigmoid(forward(rows[i:i + batch_size])).float().numpy()
            for i in range(0, len(rows), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)
