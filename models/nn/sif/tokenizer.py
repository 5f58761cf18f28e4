"""The Sample Tokenizer (HGAQ): raw sample -> sub-tokens -> residual VQ codes (a Token Sample).

Defaults: k = 4 fields per sub-token, d_s = 32, R = 3 levels, K = 256 codes per level. K = 256
makes every index one byte, so a Token Sample is N_s * R bytes (uint8) - with the paper's own
R and K; 3 levels already bring the reconstruction error down by an order of magnitude on the
MovieLens schema, and a fourth byte per sub-token buys little there.

It runs where InsEmbs are made (the source side): `tokenize` is the deterministic eval-mode
entry point whose codes are stored next to the InsEmb. The label-supervised auxiliary pCTR head
(Eq. 7) reads the RVQ reconstruction so that labels shape the codebook: its input carries the
value of q with gradients to both the chosen code vectors and (straight-through) the encoder.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from models.nn.sif.rvq import ResidualVQ
from models.nn.sif.spec import SampleInputs, SampleSchema, validate_inputs
from models.nn.sif.subtokens import SubTokenEncoder


class TokenizerOutput(NamedTuple):
    z: torch.Tensor  # sub-token vectors before quantization [..., N_s, d_s]
    quantized: torch.Tensor  # q, value of the reconstruction with gradients to codes and encoder
    codes: torch.Tensor  # int64 [..., N_s, R]
    commit_loss: torch.Tensor
    aux_logits: torch.Tensor  # [..., T] auxiliary pCTR head (Eq. 7)
    level_error: torch.Tensor  # [R]


def codes_dtype_for(codebook_size: int) -> np.dtype:
    if codebook_size <= 256:
        return np.dtype(np.uint8)
    if codebook_size <= 65536:
        return np.dtype(np.uint16)
    raise ValueError(f"codebook_size {codebook_size} does not fit 16-bit codes")


class SampleTokenizer(nn.Module):
    def __init__(
        self,
        schema: SampleSchema,
        *,
        k: int = 4,
        d_s: int = 32,
        levels: int = 3,
        codebook_size: int = 256,
        field_dim: int = 16,
        n_tasks: int = 1,
        aux_hidden: int = 64,
        commitment_beta: float = 0.25,
        reseed_dead_codes: bool = True,
    ) -> None:
        super().__init__()
        self.schema = schema
        self.k = k
        self.encoder = SubTokenEncoder(schema, k=k, d_s=d_s, field_dim=field_dim)
        self.layout = self.encoder.layout
        self.quantizer = ResidualVQ(
            len(self.layout),
            d_s,
            levels=levels,
            codebook_size=codebook_size,
            commitment_beta=commitment_beta,
            reseed_dead_codes=reseed_dead_codes,
        )
        self.aux_head = nn.Sequential(
            nn.Linear(len(self.layout) * d_s, aux_hidden), nn.ReLU(), nn.Linear(aux_hidden, n_tasks)
        )

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def n_subtokens(self) -> int:
        return len(self.layout)

    @property
    def levels(self) -> int:
        return self.quantizer.levels

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def d_s(self) -> int:
        return self.quantizer.dim

    @property
    def codes_dtype(self) -> np.dtype:
        return codes_dtype_for(self.codebook_size)

    @property
    def token_bytes(self) -> int:
        return self.n_subtokens * self.levels * self.codes_dtype.itemsize

    def subtoken_index(self, group: str) -> list[int]:
        return [i for i, t in enumerate(self.layout) if t.group == group]

    # ---- training ------------------------------------------------------------------------
    def forward(self, inputs: SampleInputs) -> TokenizerOutput:
        lead = inputs.leading_shape()
        z = self.encoder(inputs)
        flat = z.reshape(-1, self.n_subtokens, self.d_s)
        if self.training and not bool(self.quantizer.initialised):
            self.quantizer.init_from_data(flat)
        rvq = self.quantizer(flat)
        # value q; gradient reaches the chosen codes (label supervision, Eq. 7) and the encoder
        quantized = rvq.quantized + (flat - flat.detach())
        aux = self.aux_head(quantized.reshape(flat.shape[0], -1))
        return TokenizerOutput(
            z,
            quantized.reshape(*lead, self.n_subtokens, self.d_s),
            rvq.codes.reshape(*lead, self.n_subtokens, self.levels),
            rvq.commit_loss,
            aux.reshape(*lead, -1),
            rvq.level_error,
        )

    # ---- serving side --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, inputs: SampleInputs) -> torch.Tensor:
        """Dense sub-token vectors z [..., N_s, d_s] (eval mode; the `dense_raw` ablation's history)."""
        validate_inputs(self.schema, inputs)
        was_training = self.training
        self.eval()
        try:
            return self.encoder(inputs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def quantize(self, inputs: SampleInputs, batch_size: int = 4096, exact: bool = True) -> torch.Tensor:
        """int64 codes [..., N_s, R], deterministic: eval mode, float64, ties to the lower index.

        exact=False quantizes in float32 (faster; for refreshing codes during training only).
        """
        validate_inputs(self.schema, inputs)
        was_training = self.training
        self.eval()
        try:
            lead = inputs.leading_shape()
            n = int(np.prod(lead)) if len(lead) else 1
            flat = SampleInputs(
                inputs.categorical.reshape(n, inputs.categorical.shape[-1]),
                inputs.numeric.reshape(n, inputs.numeric.shape[-1]),
                None if inputs.multi is None else inputs.multi.reshape(n, *inputs.multi.shape[-2:]),
            )
            # float64 keeps batch-dependent rounding of the projection far below any real margin
            encoder64 = _float64_copy(self.encoder) if exact else self.encoder
            quantizer64 = _float64_copy(self.quantizer) if exact else self.quantizer
            out = []
            for start in range(0, n, batch_size):
                part = flat.index(slice(start, start + batch_size))
                if exact:
                    part = SampleInputs(part.categorical, part.numeric.double(), part.multi)
                out.append(quantizer64(encoder64(part)).codes)
            codes = torch.cat(out) if out else torch.zeros(0, self.n_subtokens, self.levels, dtype=torch.long)
            return codes.reshape(*lead, self.n_subtokens, self.levels)
        finally:
            self.train(was_training)

    def tokenize(self, inputs: SampleInputs) -> np.ndarray:
        """Token Samples: codes [B, N_s * R] as uint8 (K <= 256) or uint16, sub-token-major."""
        codes = self.quantize(inputs)
        return codes.reshape(*codes.shape[:-2], -1).numpy().astype(self.codes_dtype)


def codes_from_token_samples(token_samples, n_subtokens: int, levels: int) -> torch.Tensor:
    """Stored Token Samples (uint8/uint16 [..., N_s * R], numpy or torch) -> int64 [..., N_s, R]."""
    array = np.asarray(token_samples)
    if array.shape[-1] != n_subtokens * levels:
        raise ValueError(f"codes: expected last dimension {n_subtokens * levels} (N_s * R), got {array.shape[-1]}")
    return torch.from_numpy(array.astype(np.int64)).reshape(*array.shape[:-1], n_subtokens, levels)


def _float64_copy(module: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(module)
    clone.double().eval()
    return clone
