"""Feature embeddings: hashed categorical tables, multi-valued mean pooling, numerics.

Every categorical id in ``PreparedData`` is already a bucket of ``hashing.hash_bucket``;
one shared table of ``n_buckets`` rows serves all fields (the field name salts the hash,
so fields do not share rows except by rare collision). Id -1 means "absent".
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureEmbedder(nn.Module):
    """Maps a feature batch to one embedding per field: [B, F_cat + F_multi + F_num, emb_dim]."""

    def __init__(self, n_cat: int, n_multi: int, n_num: int, n_buckets: int, emb_dim: int):
        super().__init__()
        self.n_buckets = n_buckets
        self.table = nn.Embedding(n_buckets + 1, emb_dim, padding_idx=n_buckets)
        nn.init.normal_(self.table.weight, std=0.05)
        with torch.no_grad():
            self.table.weight[n_buckets].zero_()
        self.num_weight = nn.Parameter(torch.randn(n_num, emb_dim) * 0.05)
        self.num_bias = nn.Parameter(torch.zeros(n_num, emb_dim))
        self.n_fields = n_cat + n_multi + n_num

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of hashed ids of any shape; -1 gives a zero vector."""
        return self.table(torch.where(ids < 0, torch.full_like(ids, self.n_buckets), ids))

    def forward(self, cat: torch.Tensor, multi: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        parts = [self.lookup(cat)]
        if multi.shape[1]:
            valid = (multi >= 0).unsqueeze(-1).float()
            pooled = (self.lookup(multi) * valid).sum(2) / valid.sum(2).clamp(min=1.0)
            parts.append(pooled)
        if num.shape[1]:
            parts.append(num.unsqueeze(-1) * self.num_weight + self.num_bias)
        return torch.cat(parts, dim=1)


class LabelEmbedding(nn.Module):
    """Side info of past instances: their labels, one embedding per combination of the tasks'
    values in {unknown, 0, 1} (3^T ids, id = sum_t (y_t + 1) 3^t; id 3^T is padding, a zero
    vector). A label of -1 (ingest had none, or it had not arrived yet) is its own value, never
    read as a negative.

    Training data has every label, so in training mode each history slot has all its labels
    hidden with probability ``unknown_rate`` (a label that has not arrived) and each remaining
    task's label hidden with the same probability (a task without a label): the unknown ids
    are trained at the rate ingest produces them. Ids with an unknown are recorded as they are
    trained (``seen``, saved with the weights; the fully known ids, which every training batch
    has, count as seen); in eval mode such an id never trained reads the all-unknown row if that
    one was trained, else padding, never a row still at its random init.
    """

    def __init__(self, n_tasks: int, dim: int, unknown_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= unknown_rate < 1.0:
            raise ValueError(f"unknown_rate must lie in [0, 1), got {unknown_rate}")
        self.n_tasks = n_tasks
        self.n_ids = 3 ** n_tasks
        self.unknown_rate = unknown_rate
        self.table = nn.Embedding(self.n_ids + 1, dim, padding_idx=self.n_ids)
        self.register_buffer("powers", 3 ** torch.arange(n_tasks, dtype=torch.long), persistent=False)
        ids = torch.arange(self.n_ids)
        known = torch.ones(self.n_ids, dtype=torch.bool)
        for _ in range(n_tasks):  # no base-3 digit is 0 (unknown)
            known &= ids % 3 != 0
            ids = ids // 3
        self.register_buffer("seen", torch.cat([known, torch.ones(1, dtype=torch.bool)]))

    def ids(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """labels int [..., T] (1, 0, -1 unknown), mask bool [...] -> ids [...] (padding where
        ``mask`` is False)."""
        labels = labels.long().clamp(-1, 1)
        if self.training and self.unknown_rate > 0:
            rate = self.unknown_rate
            hide = (torch.rand(labels.shape[:-1], device=labels.device) < rate).unsqueeze(-1)
            hide = hide | (torch.rand(labels.shape, device=labels.device) < rate)
            labels = torch.where(hide, torch.full_like(labels, -1), labels)
        ids = ((labels + 1) * self.powers).sum(-1)
        return torch.where(mask, ids, torch.full_like(ids, self.n_ids))

    def forward(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids = self.ids(labels, mask)
        if self.training:
            with torch.no_grad():
                self.seen[ids.reshape(-1)] = True
        else:
            all_unknown = torch.zeros_like(ids)  # every task -1 -> id 0
            fallback = torch.where(self.seen[0], all_unknown, torch.full_like(ids, self.n_ids))
            ids = torch.where(self.seen[ids], ids, fallback)
        return self.table(ids)
