"""Sub-token projection (Eq. 4 and Eq. 10): z_{g,j} = W_{g,j} x_{g,j} in R^{d_s}.

Each field becomes a small embedding (categorical: a table row; multi-valued: the mean of its
rows; numeric: value * w + b); a sub-token concatenates the embeddings of its field subset and
projects them with its own linear layer. The tokenizer uses it to make the vectors it quantizes,
and the mixer uses a second instance as the target projection P(x) of the live request.
"""
from __future__ import annotations

import torch
from torch import nn

from models.nn.sif.spec import SampleInputs, SampleSchema, split_into_subtokens


class SubTokenEncoder(nn.Module):
    def __init__(self, schema: SampleSchema, *, k: int = 4, d_s: int = 32, field_dim: int = 16) -> None:
        super().__init__()
        self.schema = schema
        self.layout = split_into_subtokens(schema, k)
        self.d_s = d_s
        self.field_dim = field_dim
        self.categorical = nn.ModuleList(nn.Embedding(f.buckets, field_dim) for f in schema.categorical)
        # one extra row per multi-valued field is the padding row (kept at zero, never trained)
        self.multi = nn.ModuleList(
            nn.Embedding(f.buckets + 1, field_dim, padding_idx=f.buckets) for f in schema.multi
        )
        self.numeric_weight = nn.Parameter(torch.randn(len(schema.numeric), field_dim) * 0.1)
        self.numeric_bias = nn.Parameter(torch.zeros(len(schema.numeric), field_dim))
        self.projections = nn.ModuleList(nn.Linear(len(t.fields) * field_dim, d_s) for t in self.layout)
        for emb in self.categorical:
            nn.init.normal_(emb.weight, std=0.1)
        for emb in self.multi:
            nn.init.normal_(emb.weight, std=0.1)
            with torch.no_grad():
                emb.weight[emb.padding_idx].zero_()
        self._column = {}
        for j, f in enumerate(schema.categorical):
            self._column[f.name] = ("categorical", j)
        for j, f in enumerate(schema.multi):
            self._column[f.name] = ("multi", j)
        for j, name in enumerate(schema.numeric):
            self._column[name] = ("numeric", j)

    @property
    def n_subtokens(self) -> int:
        return len(self.layout)

    def field_embedding(self, name: str, inputs: SampleInputs) -> torch.Tensor:
        kind, j = self._column[name]
        if kind == "categorical":
            return self.categorical[j](inputs.categorical[..., j].long())
        if kind == "multi":
            table = self.multi[j]
            ids = inputs.multi[..., j, :].long()
            valid = ids >= 0
            rows = table(torch.where(valid, ids, torch.full_like(ids, table.padding_idx)))
            count = valid.sum(-1, keepdim=True).clamp(min=1).to(rows.dtype)
            return rows.sum(-2) / count
        x = inputs.numeric[..., j].to(self.numeric_weight.dtype).unsqueeze(-1)
        return x * self.numeric_weight[j] + self.numeric_bias[j]

    def forward(self, inputs: SampleInputs) -> torch.Tensor:
        """[..., F] inputs -> sub-token vectors [..., N_s, d_s]."""
        cache: dict[str, torch.Tensor] = {}
        out = []
        for token, proj in zip(self.layout, self.projections):
            parts = []
            for name in token.fields:
                if name not in cache:
                    cache[name] = self.field_embedding(name, inputs)
                parts.append(cache[name])
            out.append(proj(torch.cat(parts, dim=-1)))
        return torch.stack(out, dim=-2)
