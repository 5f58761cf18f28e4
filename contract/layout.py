"""The layout of the records a source model writes and every reader decodes.

Records carry the source model's InsEmb AND its SIF codes, so the layout comes from the source
model's manifest (an IAT ranker reads no codes, a SIF ranker no embeddings, both decode the
same records). Plain values, hashable: a store is built once per layout and shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

CODECS = ("fp32", "fp16", "int8")
CODE_DTYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class RecordLayout:
    dim: int                       # InsEmb width (0: no embedding)
    codec: str = "fp32"            # how the InsEmb is stored
    code_length: int = 0           # SIF codes per record (0: none)
    code_dtype: str = "uint8"
    tasks: tuple[str, ...] = ()    # label bit i = task i

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec: must be one of {CODECS}, got {self.codec!r}")
        if self.code_dtype not in CODE_DTYPES:
            raise ValueError(f"code_dtype: must be one of {CODE_DTYPES}, got {self.code_dtype!r}")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any] | Any) -> "RecordLayout":
        """From a source model's manifest (a mapping or a ``contract.artifacts.Manifest``)."""
        get = manifest.get if isinstance(manifest, Mapping) else (lambda k, d=None: getattr(manifest, k, d))
        code_length = int(get("code_length", 0) or 0)
        return cls(dim=int(get("embedding_dim")), codec=get("codec", "fp32") or "fp32", code_length=code_length,
                   code_dtype=(get("code_dtype", "uint8") or "uint8") if code_length else "uint8",
                   tasks=tuple(get("tasks")))
