"""Multi-head attention with the two calls the SIF-Mixer needs.

`self_attend`: ordinary attention within a set (a row of sub-tokens, or a column of history
samples with a key mask). `attend_memory_and_own`: queries of candidates attend to a memory
whose keys and values were projected ONCE (the encoded history) plus to their own tokens; the
memory never sees the candidates, which is what lets one history encoding serve every candidate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., n, dim] -> q, k, v each [..., heads, n, head_dim]."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return tuple(t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2) for t in (q, k, v))

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """[..., heads, n, head_dim] -> [..., n, dim] through the output projection."""
        return self.out(o.transpose(-3, -2).flatten(-2))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self.split(x)
        return k, v

    def self_attend(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, return_keys_values: bool = False
    ):
        """x [..., n, dim]; key_mask bool broadcastable to [..., n] (True = may be attended).

        Every token may attend to itself, so a padded token (all keys masked) stays finite and
        never feeds a valid one.
        """
        q, k, v = self.split(x)
        mask = None
        if key_mask is not None:
            n = x.shape[-2]
            # the identity built from x, not torch.eye(device=): a trace freezes a factory's device
            ones = x.new_ones((n, n), dtype=torch.bool)
            eye = ones.tril() & ones.triu()
            mask = key_mask.unsqueeze(-2).unsqueeze(-3) | eye  # [..., 1(heads), n, n]
        out = self.merge(_sdpa_4d(q, k, v, mask))
        return (out, k, v) if return_keys_values else out


def _sdpa_4d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with the leading dims folded into one: AOTInductor's CPU lowering of 5-D SDPA with a
    5-D mask gives wrong results under dynamic shapes (seen with torch 2.13); the math is the same."""
    lead = q.shape[:-3]
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    if mask is not None:
        mask = mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
    return out.reshape(*lead, *out.shape[-3:])


def attend_memory_and_own(
    attention: MultiHeadAttention,
    x: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    memory_mask: torch.Tensor,
) -> torch.Tensor:
    """Candidates' tokens attend to a precomputed memory and to their own group of tokens.

    x: [B, C, G, n, dim] - per request B, candidate C, attention group G (a column, or the one
       flat group), n own tokens (1 for a column, N_s for flat attention).
    memory_keys / memory_values: [B, G_m, heads, m, head_dim] with G_m == G or G_m == 1 (one
       history column shared by every target column).
    memory_mask: bool [B, m], True where the memory slot holds a real history sample.
    returns [B, C, G, n, dim].
    """
    b, c, g, n, _ = x.shape
    q, k_own, v_own = attention.split(x)  # [B, C, G, h, n, hd]
    h, hd = attention.n_heads, attention.head_dim
    scale = 1.0 / math.sqrt(hd)
    g_m = memory_keys.shape[1]
    # fold candidates (and, for a shared memory column, the groups) into the query axis so the
    # memory is used as is, never copied per candidate
    if g_m == g:
        qm = q.permute(0, 2, 3, 1, 4, 5).reshape(b, g, h, c * n, hd)
    elif g_m == 1:
        qm = q.permute(0, 3, 1, 2, 4, 5).reshape(b, 1, h, c * g * n, hd)
    else:
        raise ValueError(f"memory has {g_m} groups, queries {g}")
    s_mem = torch.matmul(qm, memory_keys.transpose(-1, -2)) * scale  # [B, G_m, h, Q, m]
    s_mem = s_mem.masked_fill(~memory_mask[:, None, None, None, :], float("-inf"))
    if g_m == g:
        s_mem = s_mem.reshape(b, g, h, c, n, -1).permute(0, 3, 1, 2, 4, 5)
    else:
        s_mem = s_mem.reshape(b, h, c, g, n, -1).permute(0, 2, 3, 1, 4, 5)
    s_own = torch.matmul(q, k_own.transpose(-1, -2)) * scale  # [B, C, G, h, n, n]
    m = s_mem.shape[-1]
    weights = torch.softmax(torch.cat([s_mem, s_own], dim=-1), dim=-1)
    w_mem, w_own = weights[..., :m], weights[..., m:]
    if g_m == g:
        wm = w_mem.permute(0, 2, 3, 1, 4, 5).reshape(b, g, h, c * n, m)
        o_mem = torch.matmul(wm, memory_values).reshape(b, g, h, c, n, hd).permute(0, 3, 1, 2, 4, 5)
    else:
        wm = w_mem.permute(0, 3, 1, 2, 4, 5).reshape(b, 1, h, c * g * n, m)
        o_mem = torch.matmul(wm, memory_values).reshape(b, h, c, g, n, hd).permute(0, 2, 3, 1, 4, 5)
    out = o_mem + torch.matmul(w_own, v_own)
    return attention.merge(out)
