"""DIN baseline (Zhou et al., KDD 2018, "Deep Interest Network"): the candidate item attends
to the user's behaviour sequence through DIN's activation unit, the attended interest vector
joins the field embeddings, and an MLP predicts every task.

The same inputs as the base ranking model (``base.BaseRanker``): the same field embeddings and
the same behaviour sequence of strictly earlier instances (item ids, each with its past labels
as side info where ``ModelConfig.seq_label_side_info``), the same user-feature dropout; only
the network differs (no token-mixing feature interaction, no Transformer). As in the DIN paper
the attention weights are not softmax-normalised (their sum keeps the intensity of the user's
interest); padding slots get weight 0.
"""
from __future__ import annotations

import torch
from torch import nn

from models.nn.base import FeatureShape, ModelConfig, hide_user_features
from models.nn.features import FeatureEmbedder, LabelEmbedding

ACTIVATION_HIDDEN = (80, 40)   # DIN's activation unit
MLP_HIDDEN = (200, 80)         # DIN's prediction MLP


class DINAttention(nn.Module):
    """Activation unit: weight_j = MLP([q, k_j, q - k_j, q * k_j]), interest = sum_j weight_j k_j
    over the valid slots (``mask``), no softmax."""

    def __init__(self, dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = 4 * dim
        for hidden in ACTIVATION_HIDDEN:
            # one slope per layer: PReLU's per-channel form reads dim 1, here the sequence
            layers += [nn.Linear(width, hidden), nn.PReLU()]
            width = hidden
        self.unit = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, e], keys [B, S, e], mask [B, S] (True: a real behaviour) -> [B, e]."""
        q = query.unsqueeze(1).expand_as(keys)
        w = self.unit(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
        # masked by zeroing (not -inf): without softmax a padded slot must contribute nothing,
        # whatever its key holds
        w = torch.where(mask, w, torch.zeros_like(w))
        return (w.unsqueeze(-1) * keys).sum(1)


class DINRanker(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: FeatureShape):
        super().__init__()
        self.cfg = cfg
        e = cfg.emb_dim
        self.embedder = FeatureEmbedder(shape.n_cat, shape.n_multi, shape.n_num, shape.n_buckets, e)
        self.seq_labels = (LabelEmbedding(shape.n_tasks, e, cfg.unknown_label_rate)
                           if cfg.seq_label_side_info else None)
        self.attention = DINAttention(e)
        layers: list[nn.Module] = []
        width = (self.embedder.n_fields + 1) * e
        for hidden in MLP_HIDDEN:
            layers += [nn.Linear(width, hidden), nn.PReLU(hidden)]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, shape.n_tasks))
        self.register_buffer("user_cols", torch.tensor(shape.user_cat_columns, dtype=torch.long),
                             persistent=False)

    def interest(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The candidate's attention over the behaviour sequence [B, e]."""
        items = batch["seq_items"]
        valid = items >= 0
        keys = self.embedder.lookup(items)
        if self.seq_labels is not None:
            keys = keys + self.seq_labels(batch["seq_labels"], valid)
        return self.attention(self.embedder.lookup(batch["item"]), keys, valid)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cat = batch["cat"]
        p = self.cfg.user_feature_dropout
        if self.training and p > 0 and len(self.user_cols):
            cat = hide_user_features(cat, self.user_cols, p)
        fields = self.embedder(cat, batch["multi"], batch["num"])
        return self.mlp(torch.cat([fields.flatten(1), self.interest(batch)], dim=1))
