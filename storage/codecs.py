"""Vector codecs for stored InsEmbs: fp32, fp16 and int8 with a per-vector scale.

All work in bulk on float32 arrays [n, d] <-> uint8 payload arrays [n, payload_bytes], little-endian.
Error bounds (checked by the tests):
  fp32: exact.
  fp16: |x - x'| <= 2**-11 * |x| for |x| >= 2**-14 (fp16 normal range), and <= 2**-24 below it;
        values with |x| > 65504 do not fit and are rejected.
  int8: scale = max|x| / 127 per vector (stored as float32 before the bytes), q = round(x / scale);
        |x - x'| <= scale / 2 (+ float32 rounding), i.e. at most max|x| / 254 per element.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)


class CodecError(ValueError):
    """A vector the codec cannot represent (wrong shape, NaN/inf, out of range)."""


@dataclass(frozen=True)
class Codec:
    """``Codec("fp32" | "fp16" | "int8")``; ``payload_bytes(d)`` is the stored size of one vector."""

    name: str

    IDS = {"fp32": 0, "fp16": 1, "int8": 2}

    def __post_init__(self) -> None:
        if self.name not in self.IDS:
            raise ValueError(f"codec: unknown codec {self.name!r}; expected one of {sorted(self.IDS)}")

    @property
    def id(self) -> int:
        return self.IDS[self.name]

    @classmethod
    def from_id(cls, codec_id: int) -> "Codec":
        for name, value in cls.IDS.items():
            if value == codec_id:
                return cls(name)
        raise ValueError(f"codec: unknown codec id {codec_id}")

    @property
    def bytes_per_value(self) -> int:
        return {"fp32": 4, "fp16": 2, "int8": 1}[self.name]

    @property
    def bytes_per_vector_overhead(self) -> int:
        """int8 stores its float32 scale beside the values."""
        return 4 if self.name == "int8" else 0

    def payload_bytes(self, dim: int) -> int:
        return dim * self.bytes_per_value + self.bytes_per_vector_overhead

    def check(self, vectors: np.ndarray) -> np.ndarray:
        """float32 [n, d] copy of ``vectors``, or CodecError for NaN/inf/out-of-range values."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2:
            raise CodecError(f"expected a 2-D array [n, d], got shape {x.shape}")
        finite = np.isfinite(x)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0])
            raise CodecError(f"row {row} has a NaN or inf value")
        if self.name == "fp16" and x.size and np.abs(x).max() > FP16_MAX:
            row = int(np.argwhere(np.abs(x) > FP16_MAX)[0][0])
            raise CodecError(f"row {row} has a value beyond fp16 range (|x| > {FP16_MAX})")
        return x

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """uint8 [n, payload_bytes(d)] for float32 [n, d] (validated first)."""
        x = self.check(vectors)
        n, d = x.shape
        if self.name == "fp32":
            return x.astype("<f4", copy=False).view(np.uint8).reshape(n, 4 * d)
        if self.name == "fp16":
            return x.astype("<f2").view(np.uint8).reshape(n, 2 * d)
        # int8: a zero vector gets scale 0 and decodes to zeros.
        scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32) if d else np.zeros(n, np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
        out = np.empty((n, 4 + d), dtype=np.uint8)
        out[:, :4] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
        out[:, 4:] = q.view(np.uint8)
        return out

    def decode(self, payload: np.ndarray, dim: int) -> np.ndarray:
        """float32 [n, dim] from uint8 [n, payload_bytes(dim)] (any row stride)."""
        p = np.asarray(payload, dtype=np.uint8)
        n = p.shape[0]
        if p.shape[1] != self.payload_bytes(dim):
            raise CodecError(f"payload of {p.shape[1]} bytes, expected {self.payload_bytes(dim)} for {self.name} d={dim}")
        p = np.ascontiguousarray(p)
        if self.name == "fp32":
            return p.view("<f4").reshape(n, dim).astype(np.float32, copy=True)
        if self.name == "fp16":
            return p.view("<f2").reshape(n, dim).astype(np.float32)
        scale = p[:, :4].copy().view("<f4").reshape(n, 1).astype(np.float32)
        return p[:, 4:].view(np.int8).astype(np.float32) * scale


CODECS = tuple(Codec.IDS)
