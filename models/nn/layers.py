"""Building blocks: pre-LN attention blocks on SDPA, target attention (DIN / Transformer),
the RankMixer-style token-mixing feature-interaction block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttentionBlock(nn.Module):
    """Pre-LN Transformer block. ``allowed`` is a bool mask [B, S, S] (True = may attend)
    or a key mask [B, S]; every query row must allow at least one key."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = allowed[:, None, None, :] if allowed.dim() == 2 else allowed[:, None]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
        return x + self.ffn(self.norm2(x))


class CrossAttention(nn.Module):
    """Queries attend to a memory whose keys/values are projected once (``project_memory``),
    so one encoded history can serve any number of queries (candidates)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_m = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, d = memory.shape
        k, v = self.kv(self.norm_m(memory)).view(b, s, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k, v  # [B, H, S, dh]

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
        """query [C, dim]; keys/values [B, H, S, dh] with B == C (one memory per query) or
        B == 1 (one memory shared by every query); key_mask [B, S]."""
        c, d = query.shape
        q = self.q(self.norm_q(query))
        mask = key_mask[:, None, None, :]
        if keys.shape[0] == 1:
            # One shared memory: the C queries are one multi-query attention over it, instead
            # of C single-query attentions over C copies of the same keys and values.
            q = q.view(1, c, self.heads, d // self.heads).transpose(1, 2)           # [1, H, C, dh]
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            att = att.transpose(1, 2).reshape(c, d)
        else:
            q = q.view(c, self.heads, 1, d // self.heads)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).reshape(c, d)
        x = query + self.out(att)
        return x + self.ffn(self.norm2(x))

    def grouped(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor, slots: torch.Tensor, pad_index: torch.Tensor) -> torch.Tensor:
        """``forward`` for the candidates of R requests at once, each reading its own memory:
        query [C, dim] (the requests' candidates, concatenated); keys/values [R, H, S, dh] and
        key_mask [R, S] (request r's memory, padded to S with mask False); pad_index [R, W]
        (row of query at request r's slot j, any row where r has fewer than W candidates);
        slots [C] (r * W + j of each row). Per request this is the shared-memory multi-query
        attention of ``forward``; the rows outside the attention run as one batch."""
        d = query.shape[1]
        r, w = pad_index.shape
        q = self.q(self.norm_q(query))
        q = q[pad_index].view(r, w, self.heads, d // self.heads).transpose(1, 2)   # [R, H, W, dh]
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask[:, None, None, :])
        att = att.transpose(1, 2).reshape(r * w, d)[slots]                         # [C, d]
        x = query + self.out(att)
        return x + self.ffn(self.norm2(x))


class TargetAttention(nn.Module):
    """Candidate item attends to the behaviour sequence; ``kind`` "transformer" (scaled dot
    product with positions, multi-head) or "din" (DIN's MLP scorer over [q, k, q-k, q*k])."""

    def __init__(self, dim: int, max_len: int, kind: str = "transformer", heads: int = 2):
        super().__init__()
        if kind not in ("transformer", "din"):
            raise ValueError(f"seq_encoder must be 'transformer' or 'din', got {kind!r}")
        self.kind = kind
        self.null = nn.Parameter(torch.zeros(1, 1, dim))  # always-valid key: empty histories
        if kind == "transformer":
            self.pos = nn.Parameter(torch.randn(max_len + 1, dim) * 0.02)
            self.attn = CrossAttention(dim, heads, 2 * dim)
        else:
            self.scorer = nn.Sequential(nn.Linear(4 * dim, 32), nn.GELU(), nn.Linear(32, 1))

    def memory(self, seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a target attends to, from the sequence [B, S, dim] alone: (keys, values, mask
        [B, 1 + S]); "transformer": keys/values projected [B, H, 1 + S, dh]; "din": the sequence
        itself [B, 1 + S, dim], twice. A sequence shared by many targets is done once (B == 1)."""
        b = seq.shape[0]
        seq = torch.cat([self.null.expand(b, -1, -1), seq], dim=1)
        # from the input, not device=: a trace freezes a factory's device into the graph
        mask = torch.cat([mask.new_ones((b, 1), dtype=torch.bool), mask], dim=1)
        if self.kind == "transformer":
            k, v = self.attn.project_memory(seq + self.pos[: seq.shape[1]])
            return k, v, mask
        return seq, seq, mask

    def attend(self, target: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """target [C, dim] against ``memory(...)`` of batch C or 1 -> [C, dim]."""
        if self.kind == "transformer":
            return self.attn(target, keys, values, mask)
        seq = keys.expand(target.shape[0], -1, -1)  # DIN scores every (target, element) pair
        q = target.unsqueeze(1).expand_as(seq)
        w = self.scorer(torch.cat([q, seq, q - seq, q * seq], dim=-1)).squeeze(-1)
        w = w.masked_fill(~mask, float("-inf")).softmax(dim=1)
        return (w.unsqueeze(-1) * seq).sum(1)

    def attend_grouped(self, target: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor, slots: torch.Tensor, pad_index: torch.Tensor) -> torch.Tensor:
        """``attend`` for the targets of R requests, each against its own ``memory`` (batch R;
        ``slots`` / ``pad_index`` as in ``CrossAttention.grouped``)."""
        if self.kind == "transformer":
            return self.attn.grouped(target, keys, values, mask, slots, pad_index)
        owner = torch.div(slots, pad_index.shape[1], rounding_mode="floor")  # each target's request
        return self.attend(target, keys[owner], values[owner], mask[owner])

    def forward(self, target: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(target, *self.memory(seq, mask))


class TokenMixerBlock(nn.Module):
    """RankMixer-style block: parameter-free token mixing (each token split into T chunks,
    chunk j of every token gathered into new token j) then a per-token FFN; residual + LN."""

    def __init__(self, n_tokens: int, dim: int, ffn_mult: int = 2):
        super().__init__()
        if dim % n_tokens:
            raise ValueError(f"token width {dim} must be divisible by the token count {n_tokens}")
        self.t = n_tokens
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = ffn_mult * dim
        self.w1 = nn.Parameter(torch.randn(n_tokens, dim, hidden) * dim ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(n_tokens, hidden))
        self.w2 = nn.Parameter(torch.randn(n_tokens, hidden, dim) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(n_tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        mixed = x.view(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + mixed)
        # The per-token FFN as batched GEMMs over the token axis, on a [t, b, d] view: the bias
        # of the first and the residual and bias of the second ride in the GEMMs (baddbmm), so
        # no permute copies and no separate adds (einsum copied both operands and its output).
        xt = x.transpose(0, 1)
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), xt, self.w1))
        y = torch.baddbmm(xt + self.b2.unsqueeze(1), h, self.w2)
        return self.norm2(y.transpose(0, 1))
