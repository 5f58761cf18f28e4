"""Streaming training of the user-order source model with store retrieval (IAT Eq. 7-8, App. A.2).

A streaming batch holds instances of many users in time order. For each instance the previous
L-1 InsEmbs of its user are FETCHED (not recomputed) from a store, treated as constants
(stop-gradient), and fed to the SIT after the current instance's fresh InsEmb:
``[e_current ; E_hist]`` with the history newest first, causal so that every element sees only
older ones. ``output[:, 0]`` is decompressed and trained; only ``e_current`` is written back.

``models/`` knows nothing of Redis: the store is reached through ``HistoryProvider``. The
in-memory implementation here is for tests and offline runs; a Redis-backed adapter lives
with the caller (``cli.experiment.RedisHistoryProvider``).
"""
from __future__ import annotations

import bisect
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from models.data.prepared import PreparedData
from models.nn.source import UserOrderSource
from models.training.loop import bce
from models.training.source import labelled_batch


@runtime_checkable
class HistoryProvider(Protocol):
    def fetch(self, user_ids: Sequence[str], before_ms: Sequence[int], limit: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Each user's newest ``limit`` InsEmbs with timestamp strictly before ``before_ms``,
        newest first: (embeddings float32 [B, limit, d], mask bool [B, limit])."""
        ...

    def write(self, ins_ids: Sequence[int], user_ids: Sequence[str], ts_ms: Sequence[int],
              embeddings: np.ndarray) -> None:
        """Store InsEmbs float32 [B, d]; writing an ins_id again replaces it (idempotent)."""
        ...


class InMemoryHistoryProvider:
    """Per-user time-sorted lists; the reference ``HistoryProvider``."""

    def __init__(self, dim: int, keep: int | None = None):
        """``keep``: hold only each user's newest ``keep`` InsEmbs (a time-ordered writer such
        as the online learner fetches no further back, so the bound changes no fetch)."""
        self.dim = dim
        self.keep = keep
        self._keys: dict[str, list[tuple[int, int]]] = {}   # user -> sorted (ts, ins_id)
        self._emb: dict[int, np.ndarray] = {}
        self.writes = 0

    def state(self) -> dict:
        return {"keys": self._keys, "emb": self._emb, "writes": self.writes}

    def load(self, state: dict) -> None:
        self._keys, self._emb, self.writes = state["keys"], state["emb"], state["writes"]

    def write(self, ins_ids, user_ids, ts_ms, embeddings) -> None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(ins_ids), self.dim):
            raise ValueError(f"embeddings: expected shape {(len(ins_ids), self.dim)}, got {embeddings.shape}")
        for ins, user, ts, emb in zip(ins_ids, user_ids, ts_ms, embeddings):
            ins, ts = int(ins), int(ts)
            keys = self._keys.setdefault(str(user), [])
            if ins not in self._emb:
                bisect.insort(keys, (ts, ins))
            self._emb[ins] = emb.copy()
            self.writes += 1
            if self.keep is not None and len(keys) > self.keep:
                for _, old in keys[:len(keys) - self.keep]:
                    self._emb.pop(old, None)
                del keys[:len(keys) - self.keep]

    def fetch(self, user_ids, before_ms, limit):
        out = np.zeros((len(user_ids), limit, self.dim), dtype=np.float32)
        mask = np.zeros((len(user_ids), limit), dtype=bool)
        for b, (user, before) in enumerate(zip(user_ids, before_ms)):
            keys = self._keys.get(str(user), [])
            end = bisect.bisect_left(keys, (int(before), -1))  # strictly before
            newest = keys[max(0, end - limit):end][::-1]
            for k, (_, ins) in enumerate(newest):
                out[b, k] = self._emb[ins]
                mask[b, k] = True
        return out, mask


def streaming_sit(model: UserOrderSource, batch: dict, hist_e: torch.Tensor,
                  hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 with a fetched history: (the SIT output at the current instance z [B, d], its
    fresh InsEmb e_current [B, d]). Positions stand in for time (current first, then
    newest-first history), so element k sees only elements older than it."""
    b, l = hist_mask.shape
    pseudo_ts = -torch.arange(l + 1, dtype=torch.int64).expand(b, -1)
    e_cur = model.embed(batch)
    seq = torch.cat([e_cur.unsqueeze(1), hist_e.detach()], dim=1)  # sg(E_hist)
    valid = torch.cat([torch.ones(b, 1, dtype=torch.bool), hist_mask], dim=1)
    return model.run_sit(seq, pseudo_ts, valid)[:, 0], e_cur


def streaming_forward(model: UserOrderSource, batch: dict, hist_e: torch.Tensor,
                      hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 trained: (logits of the SIT output at the current instance, e_current)."""
    z, e_cur = streaming_sit(model, batch, hist_e, hist_mask)
    return model.decode(z), e_cur


def train_streaming(model: UserOrderSource, data: PreparedData, rows: np.ndarray,
                    provider: HistoryProvider, *, history_limit: int = 255, batch_size: int = 256,
                    lr: float = 1e-3, optimizer: torch.optim.Optimizer | None = None,
                    train: bool = True, progress: bool = False) -> dict:
    """One pass over ``rows`` in time order. Each batch: fetch histories (before each
    instance's timestamp), forward, update (when ``train``), then write the batch's fresh
    InsEmbs. Instances of one user inside the same batch do not see each other (their
    InsEmbs are written after the batch), as in the paper's streaming setting."""
    rows = rows[np.argsort(data.ts_ms[rows], kind="stable")]
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    model.train(train)
    losses, probs = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="streaming", disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        users = [str(u) for u in data.user_ids[data.user_index[chunk]]]
        hist, mask = provider.fetch(users, data.ts_ms[chunk], history_limit)
        batch = labelled_batch(data, chunk, model.cfg)
        labels = torch.from_numpy(data.labels[chunk])
        with torch.set_grad_enabled(train):
            logits, e_cur = streaming_forward(model, batch, torch.from_numpy(hist), torch.from_numpy(mask))
            loss = bce(logits, labels)
            if train:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        losses.append(float(loss.detach()))
        probs.append(torch.sigmoid(logits.detach()).numpy())
        provider.write(data.ins_id[chunk], users, data.ts_ms[chunk], e_cur.detach().numpy())
    model.eval()
    return {"losses": losses, "probs": np.concatenate(probs) if probs else np.zeros((0, len(data.tasks))),
            "rows": rows}
