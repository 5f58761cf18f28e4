"""Residual vector quantization with one codebook stack per sub-token (Eq. 5).

r_0 = z; c_l = argmin_c ||r_{l-1} - C_l[c]||; r_l = r_{l-1} - C_l[c_l]; q = sum_l C_l[c_l].

Codebooks are learned by gradient (VQ-VAE codebook + commitment terms, per level on the
residual), initialised from data (k-means on the first batch's residuals) and kept alive by
re-seeding dead codes: a code whose running usage falls below a threshold is moved onto a
recent residual of its level, so that it starts winning assignments again. Without the re-seed a
codebook trained by gradient alone typically ends with most of its K codes never chosen.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class RVQOutput(NamedTuple):
    quantized: torch.Tensor  # q = sum of the chosen code vectors, [N, N_s, d]
    codes: torch.Tensor  # int64 [N, N_s, R]
    commit_loss: torch.Tensor  # scalar: codebook + beta * commitment, summed over levels
    level_error: torch.Tensor  # [R]: mean ||z - q_{<=l}||^2 after each level (detached)


def _nearest(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """residual [N, S, d], codebook [S, K, d] -> index [N, S] of the nearest code.

    torch.argmin returns the first minimum, so an exact tie goes to the lower index. The eval
    path (`SampleTokenizer.quantize`) runs this in float64, where the rounding that depends on
    how a batch is blocked (~1e-16 relative) is far below any real gap between two codes, so a
    sample gets the same codes alone or in any batch.
    """
    dist = (
        residual.pow(2).sum(-1, keepdim=True)
        - 2 * torch.einsum("nsd,skd->nsk", residual, codebook)
        + codebook.pow(2).sum(-1).unsqueeze(0)
    )
    return dist.argmin(-1)


def _gather_codes(codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """codebook [S, K, d], index [N, S] -> vectors [N, S, d]."""
    # positions 0..S-1 made from ``index``, not torch.arange(device=): a trace freezes a
    # factory's device into the exported graph
    s = index.new_ones(codebook.shape[0]).cumsum(0) - 1
    return codebook[s.unsqueeze(0), index]


class ResidualVQ(nn.Module):
    def __init__(
        self,
        n_subtokens: int,
        dim: int,
        *,
        levels: int = 3,
        codebook_size: int = 256,
        commitment_beta: float = 0.25,
        reseed_dead_codes: bool = True,
        usage_decay: float = 0.95,
        dead_threshold: float = 0.03,
        recent_keep: int = 1024,
    ) -> None:
        super().__init__()
        if levels < 1 or codebook_size < 2:
            raise ValueError(f"need levels >= 1 and codebook_size >= 2, got {levels}, {codebook_size}")
        self.n_subtokens, self.dim, self.levels, self.codebook_size = n_subtokens, dim, levels, codebook_size
        self.commitment_beta = commitment_beta
        self.reseed_enabled = reseed_dead_codes
        self.usage_decay = usage_decay
        # a code is dead when its share of assignments is below dead_threshold / K
        self.dead_threshold = dead_threshold
        self.recent_keep = recent_keep
        # later levels quantize smaller residuals: start them smaller
        scale = torch.tensor([0.5**l for l in range(levels)]).view(1, levels, 1, 1)
        self.codebooks = nn.Parameter(torch.randn(n_subtokens, levels, codebook_size, dim) * scale)
        self.register_buffer("usage", torch.full((n_subtokens, levels, codebook_size), 1.0 / codebook_size))
        self.register_buffer("initialised", torch.tensor(False))
        self._recent: torch.Tensor | None = None  # [n, S, R, d] residual inputs of the last batch

    # ---- lookups -------------------------------------------------------------------------
    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., S, R] (any integer dtype) -> q [..., S, d] = sum over levels of the code vectors."""
        codes = codes.long()
        lead = codes.shape[:-2]
        flat = codes.reshape(-1, self.n_subtokens, self.levels)
        q = self.codebooks.new_zeros(flat.shape[0], self.n_subtokens, self.dim)
        for level in range(self.levels):
            q = q + _gather_codes(self.codebooks[:, level], flat[..., level])
        return q.reshape(*lead, self.n_subtokens, self.dim)

    # ---- quantization --------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, iterations: int = 8, generator: torch.Generator | None = None) -> None:
        """k-means initialisation, level by level, on the residuals of z [N, S, d]."""
        residual = z.detach().to(self.codebooks.dtype)
        n = residual.shape[0]
        for level in range(self.levels):
            pick = torch.randint(0, n, (self.codebook_size,), generator=generator) if n < self.codebook_size else torch.randperm(n, generator=generator)[: self.codebook_size]
            centroids = residual[pick].transpose(0, 1).clone()  # [S, K, d]
            for _ in range(iterations):
                index = _nearest(residual, centroids)  # [N, S]
                sums = torch.zeros_like(centroids)
                counts = torch.zeros(centroids.shape[:2], dtype=residual.dtype)
                for s in range(self.n_subtokens):
                    sums[s].index_add_(0, index[:, s], residual[:, s])
                    counts[s].index_add_(0, index[:, s], torch.ones(n, dtype=residual.dtype))
                filled = counts > 0
                centroids[filled] = sums[filled] / counts[filled].unsqueeze(-1)
            self.codebooks[:, level] = centroids
            residual = residual - _gather_codes(centroids, _nearest(residual, centroids))
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor) -> RVQOutput:
        """z [N, S, d] -> RVQOutput. In training mode also updates code usage statistics."""
        if z.dim() != 3 or z.shape[1:] != (self.n_subtokens, self.dim):
            raise ValueError(f"z: expected [N, {self.n_subtokens}, {self.dim}], got {tuple(z.shape)}")
        residual = z
        quantized = torch.zeros_like(z)
        codes = []
        commit = z.new_zeros(())
        errors = []
        recent = []
        for level in range(self.levels):
            book = self.codebooks[:, level]
            index = _nearest(residual.detach(), book.detach())
            chosen = _gather_codes(book, index)
            if self.training:
                commit = commit + (residual.detach() - chosen).pow(2).sum(-1).mean()
                commit = commit + self.commitment_beta * (residual - chosen.detach()).pow(2).sum(-1).mean()
                self._update_usage(level, index)
                recent.append(residual.detach())
            quantized = quantized + chosen
            residual = residual - chosen
            codes.append(index)
            errors.append((z.detach() - quantized.detach()).pow(2).sum(-1).mean())
        if self.training and recent:
            stack = torch.stack(recent, dim=2)  # [N, S, R, d]
            keep = torch.randperm(stack.shape[0])[: self.recent_keep]
            self._recent = stack[keep]
        return RVQOutput(quantized, torch.stack(codes, dim=-1), commit, torch.stack(errors))

    @torch.no_grad()
    def _update_usage(self, level: int, index: torch.Tensor) -> None:
        counts = self.usage.new_zeros(self.n_subtokens, self.codebook_size)
        counts.scatter_add_(1, index.t(), torch.ones_like(index.t(), dtype=self.usage.dtype))
        share = counts / max(1, index.shape[0])
        self.usage[:, level].mul_(self.usage_decay).add_((1 - self.usage_decay) * share)

    @torch.no_grad()
    def reseed_dead_codes(self) -> int:
        """Move dead codes onto recent residuals of their level; call after the optimizer step.

        Returns how many codes were re-seeded. Their usage is reset to the uniform share so that a
        re-seeded code gets time to win assignments before it can be judged dead again.
        """
        if not self.reseed_enabled or self._recent is None:
            return 0
        recent = self._recent
        dead = self.usage < (self.dead_threshold / self.codebook_size)
        total = 0
        for s, level in dead.any(-1).nonzero().tolist():
            slots = dead[s, level].nonzero().flatten()
            pick = torch.randint(0, recent.shape[0], (slots.numel(),))
            noise = 0.01 * recent[:, s, level].std() * torch.randn(slots.numel(), self.dim)
            self.codebooks[s, level, slots] = recent[pick, s, level] + noise
            self.usage[s, level, slots] = 1.0 / self.codebook_size
            total += slots.numel()
        return total
