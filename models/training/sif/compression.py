"""Storage compression ratio (Eq. 19): raw sample bytes / stored token bytes, from the real schema.

The raw sample is every grouped field stored as a 4-byte value (an int32 id or a float32), a
multi-valued field as its mean number of ids times 4 bytes (the paper's B_raw counts float32
fields; we count the whole snapshot including the item id, since the item id group is
quantized too). Token bytes are what a representation actually stores per history sample.
"""
from __future__ import annotations

import numpy as np

from models.nn.sif.spec import SampleSchema

RAW_VALUE_BYTES = 4


def raw_sample_bytes(schema: SampleSchema, mean_multi_length: dict[str, float] | None = None) -> float:
    mean_multi_length = mean_multi_length or {}
    total = 0.0
    for group in schema.groups:
        for name in group.fields:
            width = mean_multi_length.get(name, 1.0) if schema.kind_of(name) == "multi" else 1.0
            total += RAW_VALUE_BYTES * width
    return total


def token_sample_bytes(n_subtokens: int, levels: int, codebook_size: int) -> int:
    """HGAQ: N_s * R indices, one byte each for K <= 256, two for K <= 65536."""
    itemsize = 1 if codebook_size <= 256 else 2
    return n_subtokens * levels * itemsize


def dense_sample_bytes(n_subtokens: int, d_s: int, dtype=np.float32) -> int:
    """The dense ablation stores the sub-token vectors themselves."""
    return n_subtokens * d_s * np.dtype(dtype).itemsize


def compression_ratio(raw_bytes: float, token_bytes: float) -> float:
    if token_bytes <= 0:
        raise ValueError(f"token_bytes must be positive, got {token_bytes}")
    return float(raw_bytes) / float(token_bytes)
