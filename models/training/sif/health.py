"""Codebook health figures the experiment reports: usage, perplexity and reconstruction error per level."""
from __future__ import annotations

import math

import torch

from models.nn.sif.rvq import ResidualVQ


def code_perplexity(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """codes [N, S] -> perplexity exp(H) of each column's code distribution, [S] (1 .. K)."""
    counts = torch.zeros(codes.shape[1], codebook_size, dtype=torch.float64)
    counts.scatter_add_(1, codes.t().long(), torch.ones(codes.t().shape, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(1)
    return torch.exp(entropy)


@torch.no_grad()
def codebook_health(quantizer: ResidualVQ, z: torch.Tensor, codes: torch.Tensor | None = None) -> dict:
    """Health of a residual quantizer on sub-token vectors z [N, N_s, d] (and their codes, if known).

    Per level l: `usage` = share of the K codes chosen at least once (mean over sub-tokens),
    `perplexity` = exp(entropy) of the code distribution (mean over sub-tokens; K at best),
    `relative_error` = E||z - q_{<=l}||^2 / E||z||^2 (falls with l when the levels work).
    """
    z = z.detach().reshape(-1, quantizer.n_subtokens, quantizer.dim).to(quantizer.codebooks.dtype)
    if codes is None:
        was_training = quantizer.training
        quantizer.eval()
        codes = quantizer(z).codes
        quantizer.train(was_training)
    codes = codes.reshape(-1, quantizer.n_subtokens, quantizer.levels).long()
    k = quantizer.codebook_size
    energy = z.pow(2).sum(-1).mean().clamp(min=1e-12)
    partial = torch.zeros_like(z)
    levels = []
    for level in range(quantizer.levels):
        index = codes[..., level]
        used = torch.zeros(quantizer.n_subtokens, k, dtype=torch.bool)
        used.scatter_(1, index.t(), True)
        s = torch.arange(quantizer.n_subtokens)
        partial = partial + quantizer.codebooks[s.unsqueeze(0), level, index]
        levels.append(
            {
                "level": level,
                "usage": float(used.float().mean(1).mean()),
                "perplexity": float(code_perplexity(index, k).mean()),
                "relative_error": float((z - partial).pow(2).sum(-1).mean() / energy),
            }
        )
    return {
        "codebook_size": k,
        "levels": levels,
        "bits_per_code": math.ceil(math.log2(k)),
        "samples": int(z.shape[0]),
    }
