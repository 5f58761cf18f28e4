"""Base ranking model (IAT Eq. 1-3): field tokens + behaviour sequence -> token-mixing
feature interaction -> per-task heads. ``Backbone`` is shared by every ranking model here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.nn.features import FeatureEmbedder, LabelEmbedding
from models.nn.layers import TargetAttention, TokenMixerBlock

if TYPE_CHECKING:  # a dataset only describes its shape here; networks never load data
    from models.data.prepared import PreparedData


@dataclass
class ModelConfig:
    emb_dim: int = 16            # per-field embedding width
    seq_len: int = 50            # hand-crafted item-id behaviour sequence length
    seq_encoder: str = "transformer"  # or "din"
    n_feature_tokens: int = 8    # RankMixer tokens made from the features
    token_chunk: int = 8         # token width = (feature tokens + extra tokens) * chunk
    fi_blocks: int = 2
    head_hidden: int = 64
    insemb_dim: int = 64         # d: the InsEmb
    sit_layers: int = 2
    sit_heads: int = 2
    sit_ffn: int = 128
    history_len: int = 256       # L: downstream IAT sequence length
    adapt_dim: int = 96          # d' > d
    side_dim: int = 8
    iat_width: int = 32
    iat_layers: int = 1
    iat_heads: int = 2
    attention: str = "shared"    # "shared" (serving) or "full" (paper)
    label_side_info: bool = True
    # The ranking models' behaviour sequence carries each past item's labels too (the side info
    # the IAT sequence has), so base and IAT rows differ by the InsEmbs, not by who sees labels.
    seq_label_side_info: bool = True
    # Training-time rate of history labels shown as unknown (-1), the rate at which ingest
    # stores instances whose labels have not arrived (nn.features.LabelEmbedding).
    unknown_label_rate: float = 0.05
    query: str = "compressed"    # "compressed" (Eq. 11) or "id" (candidate item id only)
    # Where the IAT output joins the ranking model (IAT Tab. 4): "before_fi" (the paper's
    # choice: one more token into the feature interaction) or "after_fi" (concatenated with the
    # feature interaction's output, before the task heads).
    iat_position: str = "before_fi"
    # The InsTokens' "other" side info (IAT Tab. 4 "w/o other sideinfo", App. A.1: task-related
    # timestamps): here each past instance's age at request time. Labels are label_side_info.
    gap_side_info: bool = True
    dropout: float = 0.0
    # Training-time probability of hiding an instance's user-level categorical features (user
    # id and user side table). Most test users of a time split are new: a model that leans on
    # memorised user ids in training under-uses the history it will have to rely on.
    user_feature_dropout: float = 0.7  # chosen on validation AUC (see models/RESULTS.md)


@dataclass(frozen=True)
class FeatureShape:
    n_cat: int
    n_multi: int
    n_num: int
    n_tasks: int
    n_buckets: int
    user_cat_columns: tuple[int, ...] = ()

    @classmethod
    def of(cls, data: PreparedData) -> "FeatureShape":
        user_cols = tuple(i for i, f in enumerate(data.cat_fields) if f in data.field_groups["user"])
        return cls(data.cat.shape[1], data.multi.shape[1], data.num.shape[1], len(data.tasks),
                   data.n_buckets, user_cols)


def hide_user_features(cat: torch.Tensor, user_cols: torch.Tensor, p: float) -> torch.Tensor:
    """``cat`` with each row's user-level columns set absent (-1) with probability ``p``
    (training only, never traced: ``ModelConfig.user_feature_dropout``)."""
    hide = torch.rand(cat.shape[0], 1, device=cat.device) < p
    cat = cat.clone()
    cat[:, user_cols] = torch.where(hide, torch.full_like(cat[:, user_cols], -1), cat[:, user_cols])
    return cat


class TaskHeads(nn.Module):
    """One small MLP per task; output logits [B, T] (Eq. 2)."""

    def __init__(self, in_dim: int, n_tasks: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
            for _ in range(n_tasks))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(h) for head in self.heads], dim=-1)


class Backbone(nn.Module):
    """h = FI(Seq(S), X) (Eq. 1), with room for ``n_extra_tokens`` more tokens (IAT's output)."""

    def __init__(self, cfg: ModelConfig, shape: FeatureShape, n_extra_tokens: int = 0,
                 seq_labels: bool = False):
        super().__init__()
        self.cfg = cfg
        e = cfg.emb_dim
        self.embedder = FeatureEmbedder(shape.n_cat, shape.n_multi, shape.n_num, shape.n_buckets, e)
        # past labels on the behaviour sequence (batch["seq_labels"] [B, S, T]); source models
        # embed an instance from its items only and leave it off
        self.seq_labels = LabelEmbedding(shape.n_tasks, e, cfg.unknown_label_rate) if seq_labels else None
        self.seq = TargetAttention(e, cfg.seq_len, cfg.seq_encoder)
        self.n_tokens = cfg.n_feature_tokens + n_extra_tokens
        self.token_dim = self.n_tokens * cfg.token_chunk
        self.flat_dim = (self.embedder.n_fields + 1) * e
        self.tokenizer = nn.Sequential(nn.LayerNorm(self.flat_dim),
                                       nn.Linear(self.flat_dim, cfg.n_feature_tokens * self.token_dim))
        self.fi = nn.ModuleList(TokenMixerBlock(self.n_tokens, self.token_dim) for _ in range(cfg.fi_blocks))
        self.out_dim = self.n_tokens * self.token_dim
        self.n_extra = n_extra_tokens
        self.register_buffer("user_cols", torch.tensor(shape.user_cat_columns, dtype=torch.long),
                             persistent=False)

    def seq_memory(self, seq_items: torch.Tensor, seq_labels: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The behaviour sequence [B, S] of item ids (-1 pad), with its past labels [B, S, T]
        where this backbone reads them, embedded and projected for the target attention
        (``TargetAttention.memory``); B == 1 serves any number of targets."""
        valid = seq_items >= 0
        seq = self.embedder.lookup(seq_items)
        if self.seq_labels is not None:
            seq = seq + self.seq_labels(seq_labels, valid)
        return self.seq.memory(seq, valid)

    def fields(self, batch: dict[str, torch.Tensor],
               seq_memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(field embeddings [B, F, e], behaviour-sequence token [B, e]). ``seq_memory``: the
        ``seq_memory`` of one sequence shared by all B rows (serving), instead of
        ``batch["seq_items"]``, one sequence per row (training)."""
        cat = batch["cat"]
        p = self.cfg.user_feature_dropout
        if self.training and p > 0 and len(self.user_cols):
            cat = hide_user_features(cat, self.user_cols, p)
        fields = self.embedder(cat, batch["multi"], batch["num"])
        target = self.embedder.lookup(batch["item"])
        if seq_memory is None:
            labels = batch["seq_labels"] if self.seq_labels is not None else None
            seq_memory = self.seq_memory(batch["seq_items"], labels)
        return fields, self.seq.attend(target, *seq_memory)

    def flat_features(self, fields: torch.Tensor, seq_tok: torch.Tensor) -> torch.Tensor:
        return torch.cat([fields.flatten(1), seq_tok], dim=1)

    def interact(self, fields: torch.Tensor, seq_tok: torch.Tensor,
                 extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        b = fields.shape[0]
        tokens = self.tokenizer(self.flat_features(fields, seq_tok)).view(b, -1, self.token_dim)
        if extra:
            tokens = torch.cat([tokens] + [t.unsqueeze(1) for t in extra], dim=1)
        for block in self.fi:
            tokens = block(tokens)
        return tokens.flatten(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        fields, seq_tok = self.fields(batch)
        return self.interact(fields, seq_tok)


class BaseRanker(nn.Module):
    """The base model row: Eq. 1-3."""

    def __init__(self, cfg: ModelConfig, shape: FeatureShape):
        super().__init__()
        self.backbone = Backbone(cfg, shape, seq_labels=cfg.seq_label_side_info)
        self.heads = TaskHeads(self.backbone.out_dim, shape.n_tasks, cfg.head_hidden)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads(self.backbone(batch))
