"""IAT downstream model (Eq. 9-11).

For a request at time t the IAT sequence is the user's last L instances strictly before t
(``PreparedData.history_index``), each an InsToken = concat(adapted InsEmb
E' = GELU(E Wa + ba), side-info embeddings). Side info: the instance's past labels (one id per combination of
{unknown, 0, 1} per task, ``features.LabelEmbedding``; dropped in the ``no_label_side_info``
ablation) and its age at request time (log2 hours bucket; the paper's "other side info",
dropped in the ``no_other_side_info`` ablation: ``ModelConfig.gap_side_info``). A query token
(Eq. 11: an MLP compressing all the downstream's feature tokens, or the ``id`` ablation: the
candidate item id alone) reads the sequence; the output enters the token-mixing feature
interaction as one more token (``ModelConfig.iat_position`` "before_fi", the paper's), or, in
the "after_fi" ablation (IAT Tab. 4, App. A.1 Fig. 8), is concatenated with the feature
interaction's output before the task heads.

Two attention variants (``ModelConfig.attention``):
- ``"full"`` (the paper): one Transformer over [query ; InsTokens], every token sees every
  token, so the history must be re-encoded for each candidate.
- ``"shared"`` (serving): InsTokens attend among themselves only, then the query attends to
  them. ``encode_history(tokens, mask)`` runs once per request; ``score(memory, batch)``
  scores any number of candidates against it (keys/values projected once).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.nn.base import Backbone, FeatureShape, ModelConfig, TaskHeads
from models.nn.features import LabelEmbedding
from models.nn.layers import CrossAttention, SelfAttentionBlock

N_GAP_BUCKETS = 24


class HistoryMemory(NamedTuple):
    keys: torch.Tensor     # [B, H, 1 + L, dh]
    values: torch.Tensor   # [B, H, 1 + L, dh]
    mask: torch.Tensor     # [B, 1 + L] (slot 0: a learned always-valid token)


def gap_bucket(request_ms: torch.Tensor, hist_ms: torch.Tensor) -> torch.Tensor:
    """floor(log2(1 + hours between history instance and request)), clipped."""
    hours = (request_ms.unsqueeze(-1) - hist_ms).clamp(min=0).double() / 3.6e6
    return torch.log2(1.0 + hours).floor().long().clamp(0, N_GAP_BUCKETS - 1)


class IATDownstream(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: FeatureShape):
        super().__init__()
        if cfg.attention not in ("shared", "full"):
            raise ValueError(f"attention must be 'shared' or 'full', got {cfg.attention!r}")
        if cfg.query not in ("compressed", "id"):
            raise ValueError(f"query must be 'compressed' or 'id', got {cfg.query!r}")
        if cfg.iat_position not in ("before_fi", "after_fi"):
            raise ValueError(f"iat_position must be 'before_fi' or 'after_fi', got {cfg.iat_position!r}")
        self.cfg = cfg
        w = cfg.iat_width
        before_fi = cfg.iat_position == "before_fi"
        self.backbone = Backbone(cfg, shape, n_extra_tokens=1 if before_fi else 0,
                                 seq_labels=cfg.seq_label_side_info)
        # InsEmbs arrive at whatever scale their source model left them; normalising first
        # keeps them from drowning the side-info embeddings at the start of training.
        self.insemb_norm = nn.LayerNorm(cfg.insemb_dim)
        self.adapt = nn.Linear(cfg.insemb_dim, cfg.adapt_dim)
        self.label_side = LabelEmbedding(shape.n_tasks, cfg.side_dim, cfg.unknown_label_rate)
        self.gap_side = nn.Embedding(N_GAP_BUCKETS, cfg.side_dim) if cfg.gap_side_info else None
        side = cfg.side_dim * (int(cfg.label_side_info) + int(cfg.gap_side_info))
        self.token_proj = nn.Linear(cfg.adapt_dim + side, w)
        self.pos = nn.Parameter(torch.randn(cfg.history_len + 1, w) * 0.02)
        if cfg.query == "compressed":
            self.query = nn.Sequential(nn.LayerNorm(self.backbone.flat_dim),
                                       nn.Linear(self.backbone.flat_dim, 2 * w), nn.GELU(),
                                       nn.Linear(2 * w, w))
        else:
            self.query = nn.Linear(cfg.emb_dim, w)
        self.null = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.encoder = nn.ModuleList(SelfAttentionBlock(w, cfg.iat_heads, 2 * w, cfg.dropout)
                                     for _ in range(cfg.iat_layers))
        if cfg.attention == "shared":
            self.cross = CrossAttention(w, cfg.iat_heads, 2 * w)
        self.out = nn.Linear(w, self.backbone.token_dim)
        heads_in = self.backbone.out_dim + (0 if before_fi else self.backbone.token_dim)
        self.heads = TaskHeads(heads_in, shape.n_tasks, cfg.head_hidden)

    # -- history side (once per request)
    def history_tokens(self, insemb: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                       gap_ids: torch.Tensor) -> torch.Tensor:
        """InsTokens [B, L, w] (Eq. 9-10) from InsEmbs [B, L, d], past labels [B, L, T] (1, 0,
        -1 unknown), the history mask [B, L] and age buckets."""
        parts = [F.gelu(self.adapt(self.insemb_norm(insemb)))]
        if self.cfg.label_side_info:
            parts.append(self.label_side(labels, mask))
        if self.gap_side is not None:
            parts.append(self.gap_side(gap_ids))
        tokens = self.token_proj(torch.cat(parts, dim=-1))
        return tokens + self.pos[1: tokens.shape[1] + 1]

    def encode_history(self, tokens: torch.Tensor, mask: torch.Tensor) -> HistoryMemory:
        """Shared-history encoding: InsTokens attend among themselves (never to a candidate)."""
        if self.cfg.attention != "shared":
            raise RuntimeError("encode_history is only defined for attention='shared'")
        b = tokens.shape[0]
        x = torch.cat([self.null.expand(b, -1, -1), tokens], dim=1)
        # from the input, not device=: a trace freezes a factory's device into the graph
        mask = torch.cat([mask.new_ones((b, 1), dtype=torch.bool), mask], dim=1)
        for block in self.encoder:
            x = block(x, mask)
        keys, values = self.cross.project_memory(x)
        return HistoryMemory(keys, values, mask)

    # -- candidate side
    def _predict(self, fields: torch.Tensor, seq_tok: torch.Tensor, iat_out: torch.Tensor) -> torch.Tensor:
        """Logits from the candidates' features and the IAT sequence's output [C, w], joined
        where ``iat_position`` says."""
        token = self.out(iat_out)
        if self.cfg.iat_position == "before_fi":
            return self.heads(self.backbone.interact(fields, seq_tok, [token]))
        return self.heads(torch.cat([self.backbone.interact(fields, seq_tok), token], dim=1))

    def _query(self, fields: torch.Tensor, seq_tok: torch.Tensor, batch) -> torch.Tensor:
        if self.cfg.query == "compressed":
            return self.query(self.backbone.flat_features(fields, seq_tok))
        return self.query(self.backbone.embedder.lookup(batch["item"]))

    def score(self, memory: HistoryMemory, batch: dict[str, torch.Tensor],
              seq_memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [C, T] for C candidates against one encoded history (memory batch 1) or
        against one history each (memory batch C). ``seq_memory``: one behaviour sequence
        shared by the C candidates, projected once (``Backbone.seq_memory``), instead of
        ``batch["seq_items"]``."""
        fields, seq_tok = self.backbone.fields(batch, seq_memory)
        out = self.cross(self._query(fields, seq_tok, batch), memory.keys, memory.values, memory.mask)
        return self._predict(fields, seq_tok, out)

    def score_grouped(self, memory: HistoryMemory, batch: dict[str, torch.Tensor],
                      seq_memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      slots: torch.Tensor, pad_index: torch.Tensor) -> torch.Tensor:
        """``score`` of the candidates of R requests in one batch (cross-request batching):
        ``memory`` / ``seq_memory`` of batch R, request r's own padded with mask False;
        ``slots`` / ``pad_index`` say which request each candidate belongs to
        (``CrossAttention.grouped``). Row i equals ``score`` of its own request's memories."""
        bb = self.backbone
        fields = bb.embedder(batch["cat"], batch["multi"], batch["num"])
        seq_tok = bb.seq.attend_grouped(bb.embedder.lookup(batch["item"]), *seq_memory, slots, pad_index)
        out = self.cross.grouped(self._query(fields, seq_tok, batch), memory.keys, memory.values,
                                 memory.mask, slots, pad_index)
        return self._predict(fields, seq_tok, out)

    def _full(self, batch, tokens, mask) -> torch.Tensor:
        fields, seq_tok = self.backbone.fields(batch)
        q = self._query(fields, seq_tok, batch) + self.pos[0]
        x = torch.cat([q.unsqueeze(1), tokens], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.encoder:
            x = block(x, mask)
        return self._predict(fields, seq_tok, x[:, 0])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = self.history_tokens(batch["hist_emb"], batch["hist_labels"], batch["hist_mask"],
                                     gap_bucket(batch["ts_ms"], batch["hist_ts"]))
        if self.cfg.attention == "full":
            return self._full(batch, tokens, batch["hist_mask"])
        return self.score(self.encode_history(tokens, batch["hist_mask"]), batch)


