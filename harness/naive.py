"""The naive baseline: the same weights, the history re-encoded for every candidate."""
from __future__ import annotations

import torch

from models.runtime.modules import IATRanking


class IATNaive(IATRanking):
    """The same weights, the history re-encoded for every candidate (what shared attention
    saves); outputs equal ``IATRanking``'s."""

    def forward(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms, cat, multi, num):
        tokens, mask = self.history_inputs(hist_emb, hist_labels, hist_ts, hist_mask, request_ms)
        c = cat.shape[0]
        memory = self.model.encode_history(tokens.expand(c, -1, -1).contiguous(), mask.expand(c, -1))
        batch = self.candidates(hist_items, hist_mask, cat, multi, num)
        batch["seq_labels"] = self.sequence_labels(hist_labels, hist_mask, c)
        return torch.sigmoid(self.model.score(memory, batch))
