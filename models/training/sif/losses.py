"""The SIF training objective (Eq. 17-18): L_rank + a L_aux + b L_commit + c L_align.

L_commit comes from the residual quantizer (codebook + beta * commitment, per level);
L_align = ||P(x) - sg(q)||^2 pulls the target projection onto the codebook reconstruction of the
same request, so that the target row and the history rows live in one space at serving time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    aux: float = 0.5  # a
    commit: float = 1.0  # b
    align: float = 0.1  # c


def ranking_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over samples and tasks; logits and labels [..., T]."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def auxiliary_pctr_loss(aux_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 7: the tokenizer's pCTR head on the RVQ reconstruction, BCE against the sample's labels."""
    return F.binary_cross_entropy_with_logits(aux_logits, labels.to(aux_logits.dtype))


def alignment_loss(projected: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Eq. 18: mean over sub-tokens of ||P(x) - sg(q)||^2; projected and reconstruction [..., N_s, d_s]."""
    return (projected - reconstruction.detach()).pow(2).sum(-1).mean()


def total_loss(
    rank: torch.Tensor,
    *,
    aux: torch.Tensor | None = None,
    commit: torch.Tensor | None = None,
    align: torch.Tensor | None = None,
    weights: LossWeights = LossWeights(),
) -> torch.Tensor:
    loss = rank
    if aux is not None:
        loss = loss + weights.aux * aux
    if commit is not None:
        loss = loss + weights.commit * commit
    if align is not None:
        loss = loss + weights.align * align
    return loss
