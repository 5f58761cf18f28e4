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


