"""One user's history: the single type the store returns, the runtimes read and tests build.

Arrays, not objects (few allocations per request), newest first. The store fills every field;
the ranking model reads embeddings or codes, labels, item hashes and timestamps; the source
model reads only item hashes and timestamps (``History.items_only``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class History:
    embeddings: np.ndarray                 # float32 [n, d] (d = 0 where no InsEmbs are needed)
    labels: np.ndarray                     # int8 [n, T]: 1, 0, or -1 when the task had no label
    item_hashes: np.ndarray                # int64 [n]
    timestamps_ms: np.ndarray              # int64 [n], newest first
    codes: np.ndarray | None = None        # uint8/uint16 [n, m]; None when no SIF codes are kept
    ins_ids: np.ndarray | None = None      # uint64 [n]
    source_versions: np.ndarray | None = None  # uint64 [n] (storage.records.source_version_id)
    missing: int = 0           # in the sequence, record gone (TTL)
    version_mismatch: int = 0  # skipped: written by another source-model version
    incompatible: int = 0      # skipped: another embedding dim or code length
    skipped: list | None = None  # what a read examined and did not use, with the reason (on request)

    def __len__(self) -> int:
        return int(self.timestamps_ms.shape[0])

    @classmethod
    def empty(cls, dim: int, n_tasks: int, code_length: int = 0, code_dtype=np.uint8) -> "History":
        return cls(np.zeros((0, dim), np.float32), np.zeros((0, n_tasks), np.int8), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros((0, code_length), code_dtype) if code_length else None,
                   np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    @classmethod
    def items_only(cls, timestamps_ms: np.ndarray, item_hashes: np.ndarray,
                   ins_ids: np.ndarray | None = None) -> "History":
        """What a source model reads of a history: its items and their times."""
        n = len(timestamps_ms)
        return cls(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int8), np.asarray(item_hashes, np.int64),
                   np.asarray(timestamps_ms, np.int64), None, ins_ids)

    def select(self, keep: np.ndarray, **counts: int) -> "History":
        """The rows where ``keep`` is True (order kept); ``counts`` update the skip counters."""
        def pick(a):
            return a[keep] if a is not None else None

        return replace(self, embeddings=self.embeddings[keep], labels=self.labels[keep],
                       item_hashes=self.item_hashes[keep], timestamps_ms=self.timestamps_ms[keep],
                       codes=pick(self.codes), ins_ids=pick(self.ins_ids),
                       source_versions=pick(self.source_versions), **counts)
