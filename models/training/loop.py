"""Training loop with early stopping on validation AUC (first task), and batch prediction."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

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


def bce_step(model: torch.nn.Module) -> Callable[[tuple], torch.Tensor]:
    """The usual step: an item (batch, labels [B, T], loss weight [B] or None) -> BCE of
    ``model(batch)`` (logits shaped like the labels)."""
    def step(item: tuple) -> torch.Tensor:
        batch, labels, weight = item
        return bce(model(batch), labels, weight)

    return step


def fit(modules: torch.nn.Module | Sequence[torch.nn.Module],
        epoch_batches: Callable[[int], Iterable[Any]],
        validate: Callable[[], tuple[np.ndarray, np.ndarray]],
        cfg: TrainConfig, desc: str = "train",
        on_epoch_start: Callable[[int], None] | None = None,
        step: Callable[[Any], torch.Tensor] | None = None,
        on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """The one training loop with early stopping, for every trainer here.

    Adam over the (deduplicated) parameters of ``modules``; each epoch: ``on_epoch_start(epoch)``,
    modules to train mode, ``step(item)`` -> loss for every item of ``epoch_batches(epoch)``
    (default: ``bce_step`` of the single module), then ``validate()`` -> (labels, probs) scored
    by first-task AUC. The best epoch's state of every module is kept; training stops after
    ``patience`` epochs without improvement and the best state is restored (modules in eval
    mode). ``on_epoch_end(record)`` sees each epoch's record (e.g. to print progress).
    """
    modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    step = step or bce_step(modules[0])
    params = list({id(q): q for m in modules for q in m.parameters()}.values())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_auc, best_state, best_epoch, history = -1.0, None, -1, []
    for epoch in range(cfg.epochs):
        if on_epoch_start:
            on_epoch_start(epoch)
        for m in modules:
            m.train()
        batches = list(epoch_batches(epoch))
        total = 0.0
        for item in tqdm(batches, desc=f"{desc} ep{epoch}", leave=False, disable=not cfg.progress, mininterval=2.0):
            loss = step(item)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        y, p = validate()
        val_auc = auc(y[:, 0], p[:, 0])
        record = {"epoch": epoch, "train_loss": total / max(1, len(batches)), "val_auc": val_auc}
        history.append(record)
        if on_epoch_end:
            on_epoch_end(record)
        if val_auc > best_auc:
            best_auc, best_epoch = val_auc, epoch
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        for m, state in zip(modules, best_state):
            m.load_state_dict(state)
    for m in modules:
        m.eval()
    return {"best_val_auc": best_auc, "best_epoch": best_epoch, "epochs": history}


@torch.no_grad()
def predict(forward: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray,
            batch_size: int = 2048) -> np.ndarray:
    """Sigmoid of ``forward(row batch)`` over all rows, in row order: float32 [n, T]."""
    outs = [torch.sigmoid(forward(rows[i:i + batch_size])).float().numpy()
            for i in range(0, len(rows), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)
