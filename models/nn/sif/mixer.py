"""The SIF-Mixer (Eq. 9-16), split so that the user's history is encoded once per request.

Rows are samples, columns are sub-token positions. A block applies (i) token-level MHA along
each row, (ii) sample-level MHA along each column, (iii) a position-wise FFN, each pre-LN with a
residual. History rows (codebook sum + recency, Eq. 9) attend among themselves only; the target
row (the per-sub-token projection P(x) of the live request, Eq. 10) attends to the history
rows' keys/values of every block and to itself. Hence:

    memory = encode_history(codes [B, L, N_s, R], recency [B, L], mask [B, L])
    logits = score(memory, candidates)          # [B, C, T] (or [C, T] for one request)

and a candidate's score does not depend on the other candidates or on anything the history does
not hold. Variants for the ablations (history_mode):
  "factored" - the SIF-Mixer itself;
  "pooled"   - each history sample mean-pooled to one vector, then attention across samples;
  "flat"     - all history sub-tokens flattened into one sequence with ordinary attention;
history_columns keeps only some sub-token positions in the history rows (item id only).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from models.nn.sif.attention import MultiHeadAttention, attend_memory_and_own
from models.nn.sif.spec import SampleInputs, SampleSchema
from models.nn.sif.subtokens import SubTokenEncoder

HISTORY_MODES = ("factored", "pooled", "flat")


class HistoryMemory(NamedTuple):
    """One request's encoded history: per block the keys and values the target row attends to."""

    keys: torch.Tensor  # [n_blocks, B, G_m, heads, m, head_dim]
    values: torch.Tensor  # same
    mask: torch.Tensor  # bool [B, m]


def recency_bucket(delta_seconds: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket of (request time - history time) on a log2 scale of seconds: 0 = under a second."""
    delta = delta_seconds.to(torch.float64).clamp(min=0)
    return torch.floor(torch.log2(1 + delta)).clamp(max=n_buckets - 1).long()


class SIFBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln_token = nn.LayerNorm(dim)
        self.token_attn = MultiHeadAttention(dim, n_heads)
        self.ln_sample = nn.LayerNorm(dim)
        self.sample_attn = MultiHeadAttention(dim, n_heads)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))


class SIFMixer(nn.Module):
    def __init__(
        self,
        schema: SampleSchema,
        codebooks: torch.Tensor | None,
        *,
        k: int = 4,
        d_s: int = 32,
        n_blocks: int = 2,
        n_heads: int = 4,
        ffn_dim: int = 64,
        field_dim: int = 16,
        n_tasks: int = 1,
        head_hidden: int = 64,
        recency_buckets: int = 32,
        history_mode: str = "factored",
        history_columns: Sequence[int] | None = None,
        history_outcomes: bool = True,
        train_codebooks: bool = True,
        dropout: float = 0.0,
        unknown_outcome_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if history_mode not in HISTORY_MODES:
            raise ValueError(f"history_mode must be one of {HISTORY_MODES}, got {history_mode!r}")
        self.target_projection = SubTokenEncoder(schema, k=k, d_s=d_s, field_dim=field_dim)  # P(x)
        self.layout = self.target_projection.layout
        n_s = len(self.layout)
        if codebooks is not None:
            if codebooks.dim() != 4 or codebooks.shape[0] != n_s or codebooks.shape[-1] != d_s:
                raise ValueError(f"codebooks: expected [{n_s}, R, K, {d_s}], got {tuple(codebooks.shape)}")
            if train_codebooks:
                self.codebooks = nn.Parameter(codebooks.detach().clone())
            else:
                self.register_buffer("codebooks", codebooks.detach().clone())
        else:
            self.codebooks = None
        columns = list(range(n_s)) if history_columns is None else list(history_columns)
        if not columns or any(c < 0 or c >= n_s for c in columns):
            raise ValueError(f"history_columns must be sub-token indices in [0, {n_s}), got {columns}")
        if len(columns) not in (1, n_s) and history_mode == "factored":
            raise ValueError("factored attention needs all history columns or exactly one")
        self.register_buffer("history_columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.history_mode = history_mode
        self.n_subtokens, self.d_s, self.n_tasks = n_s, d_s, n_tasks
        self.n_heads = n_heads
        self.recency_buckets = recency_buckets
        self.column_embedding = nn.Parameter(torch.zeros(n_s, d_s))
        self.recency_embedding = nn.Embedding(recency_buckets, d_s)
        self.target_embedding = nn.Parameter(torch.zeros(d_s))
        # per task three values: unknown (-1: ingest had no label), 0, 1; in training each
        # history outcome is shown as unknown at ``unknown_outcome_rate`` so the unknown rows
        # are trained at the rate the store holds them
        self.outcome_embedding = nn.Embedding(3 * n_tasks, d_s) if history_outcomes else None
        self.unknown_outcome_rate = unknown_outcome_rate
        # index tensors as buffers, not torch.arange in forward: they follow .to(device), whereas a
        # trace would freeze the device a factory call ran on into the exported graph
        self.register_buffer("outcome_offsets", 3 * torch.arange(n_tasks), persistent=False)
        if codebooks is not None:
            self.register_buffer("code_subtoken", torch.arange(n_s).view(n_s, 1), persistent=False)
            self.register_buffer("code_level", torch.arange(codebooks.shape[1]).view(1, -1), persistent=False)
        for p in (self.column_embedding, self.target_embedding):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.recency_embedding.weight, std=0.02)
        if self.outcome_embedding is not None:
            nn.init.normal_(self.outcome_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(SIFBlock(d_s, n_heads, ffn_dim, dropout) for _ in range(n_blocks))
        self.ln_out = nn.LayerNorm(d_s)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_s, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1)) for _ in range(n_tasks)
        )

    # ---- inputs --------------------------------------------------------------------------
    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: codes [..., N_s, R] (any integer dtype) -> sum of code vectors [..., N_s, d_s]."""
        if self.codebooks is None:
            raise ValueError("this mixer has no codebooks (dense history); pass history rows instead of codes")
        codes = codes.long()
        if codes.shape[-2:] != self.codebooks.shape[:1] + self.codebooks.shape[1:2]:
            raise ValueError(
                f"codes: expected [..., {self.codebooks.shape[0]}, {self.codebooks.shape[1]}] (N_s, R), got {tuple(codes.shape)}"
            )
        k = self.codebooks.shape[2]
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"codes: indices must lie in [0, {k})")
        return self.codebooks[self.code_subtoken, self.code_level, codes].sum(-2)

    def project_target(self, target: SampleInputs) -> torch.Tensor:
        """P(x): the live request's sub-tokens in codebook space, [..., N_s, d_s] (Eq. 10)."""
        return self.target_projection(target)

    # ---- history -------------------------------------------------------------------------
    def encode_history(
        self,
        codes: torch.Tensor,
        recency: torch.Tensor,
        mask: torch.Tensor,
        outcomes: torch.Tensor | None = None,
    ) -> HistoryMemory:
        """codes [B, L, N_s, R] as stored (uint8/uint16/int64), recency buckets [B, L], mask bool [B, L]."""
        mask = mask.bool()
        safe = torch.where(mask[..., None, None], codes.long(), torch.zeros_like(codes, dtype=torch.long))
        return self.encode_history_rows(self.reconstruct(safe), recency, mask, outcomes)

    def encode_history_rows(
        self,
        rows: torch.Tensor,
        recency: torch.Tensor,
        mask: torch.Tensor,
        outcomes: torch.Tensor | None = None,
    ) -> HistoryMemory:
        """History from dense rows [B, L, N_s, d_s] (codebook sums, or raw z for the dense ablation).

        outcomes: optional labels of the history samples [B, L, T] in {1, 0, -1 unknown} (the
        behavioural outcome the raw sample records, when known before the request).
        """
        b, length = rows.shape[:2]
        if mask.shape != (b, length) or recency.shape != (b, length):
            raise ValueError(f"mask and recency: expected [{b}, {length}], got {tuple(mask.shape)} and {tuple(recency.shape)}")
        mask = mask.bool()
        cols = self.history_columns
        x = rows[:, :, cols] + self.column_embedding[cols]
        x = x + self.recency_embedding(recency.long().clamp(0, self.recency_buckets - 1)).unsqueeze(2)
        if outcomes is not None and self.outcome_embedding is not None:
            values = outcomes.long().clamp(-1, 1)
            rate = self.unknown_outcome_rate
            if self.training and rate > 0:
                hide = (torch.rand(values.shape[:-1], device=values.device) < rate).unsqueeze(-1)
                hide = hide | (torch.rand(values.shape, device=values.device) < rate)
                values = torch.where(hide, torch.full_like(values, -1), values)
            x = x + self.outcome_embedding(values + 1 + self.outcome_offsets).sum(-2).unsqueeze(2)
        x = x * mask[..., None, None]
        if self.history_mode == "pooled":
            x = x.mean(2, keepdim=True)
        keys, values = [], []
        if self.history_mode == "flat":
            h = x.reshape(b, 1, length * x.shape[2], self.d_s)
            token_mask = mask.repeat_interleave(x.shape[2], dim=1)
            for i, block in enumerate(self.blocks):
                normed = block.ln_sample(h)
                out, k, v = block.sample_attn.self_attend(normed, token_mask[:, None, :], return_keys_values=True)
                keys.append(k)
                values.append(v)
                if i == len(self.blocks) - 1:
                    break  # the last block's history output is never read: only its keys/values
                h = h + out
                h = h + block.ffn(block.ln_ffn(h))
            return HistoryMemory(torch.stack(keys), torch.stack(values), token_mask)
        h = x  # [B, L, H, d]
        for i, block in enumerate(self.blocks):
            h = h + block.token_attn.self_attend(block.ln_token(h))
            column = block.ln_sample(h).transpose(1, 2)  # [B, H, L, d]
            out, k, v = block.sample_attn.self_attend(column, mask[:, None, :], return_keys_values=True)
            keys.append(k)
            values.append(v)
            if i == len(self.blocks) - 1:
                break
            h = h + out.transpose(1, 2)
            h = h + block.ffn(block.ln_ffn(h))
        return HistoryMemory(torch.stack(keys), torch.stack(values), mask)

    # ---- candidates ----------------------------------------------------------------------
    def score(self, memory: HistoryMemory, target: SampleInputs) -> torch.Tensor:
        """Logits for candidates: target leading shape [B, C] -> [B, C, T]; [C] (with B = 1) -> [C, T]."""
        return self.score_rows(memory, self.project_target(target))

    def score_rows(self, memory: HistoryMemory, target_rows: torch.Tensor) -> torch.Tensor:
        single_request = target_rows.dim() == 3
        if single_request:
            if memory.mask.shape[0] != 1:
                raise ValueError("target without a request axis needs a memory of exactly one request")
            target_rows = target_rows.unsqueeze(0)
        b, c, n_s, d = target_rows.shape
        if b != memory.mask.shape[0]:
            raise ValueError(f"target has {b} requests, memory {memory.mask.shape[0]}")
        t = target_rows + self.column_embedding + self.target_embedding
        for i, block in enumerate(self.blocks):
            if self.history_mode != "flat":
                t = t + block.token_attn.self_attend(block.ln_token(t))
            normed = block.ln_sample(t)
            grouped = normed.unsqueeze(2) if self.history_mode == "flat" else normed.unsqueeze(3)
            out = attend_memory_and_own(block.sample_attn, grouped, memory.keys[i], memory.values[i], memory.mask)
            t = t + out.reshape(b, c, n_s, d)
            t = t + block.ffn(block.ln_ffn(t))
        pooled = self.ln_out(t).mean(-2)  # mean over the target row's sub-tokens (Eq. 15)
        logits = torch.cat([head(pooled) for head in self.heads], dim=-1)
        return logits[0] if single_request else logits

    def forward(
        self,
        codes: torch.Tensor,
        recency: torch.Tensor,
        mask: torch.Tensor,
        target: SampleInputs,
        outcomes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One candidate per request (training): target leading shape [B] -> logits [B, T]."""
        memory = self.encode_history(codes, recency, mask, outcomes)
        return self.score(memory, target.index((slice(None), None))).squeeze(1)
