"""Assemble the mixer's history tensors from a table of Token Samples and a history index.

The index (int64 [B, L], newest first, -1 = no sample) comes from the data loader or the
sequence store; this function re-checks that every slot it keeps lies strictly before the
request time, so a history index that leaks a same-time or later instance is masked out here
rather than trusted.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from models.nn.sif.mixer import recency_bucket


class HistoryBatch(NamedTuple):
    rows: torch.Tensor  # codes [B, L, N_s, R] (or dense rows [B, L, N_s, d])
    recency: torch.Tensor  # int64 [B, L]
    mask: torch.Tensor  # bool [B, L]
    outcomes: torch.Tensor | None  # labels [B, L, T] of the history samples


def gather_history(
    table: torch.Tensor,
    history_index: torch.Tensor,
    timestamps: torch.Tensor,
    request_time: torch.Tensor,
    labels: torch.Tensor | None = None,
    recency_buckets: int = 32,
) -> HistoryBatch:
    """table [N, ...] per instance (codes or dense rows); timestamps [N] and request_time [B] in seconds."""
    valid = history_index >= 0
    safe = history_index.clamp(min=0)
    hist_time = timestamps[safe]
    valid = valid & (hist_time < request_time.unsqueeze(1))
    rows = table[safe]
    rows = torch.where(valid.view(*valid.shape, *([1] * (rows.dim() - 2))), rows, torch.zeros_like(rows))
    delta = (request_time.unsqueeze(1) - hist_time).clamp(min=0)
    recency = torch.where(valid, recency_bucket(delta, recency_buckets), torch.zeros_like(safe))
    outcomes = None
    if labels is not None:
        outcomes = torch.where(valid.unsqueeze(-1), labels[safe].long(), torch.zeros_like(labels[safe], dtype=torch.long))
    return HistoryBatch(rows, recency, valid, outcomes)
