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

import torch
import torch.nn.functional as F
from torch import nn

from models.nn.base import Backbone, FeatureShape, ModelConfig, TaskHeads
from models.nn.layers import SelfAttentionBlock


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


