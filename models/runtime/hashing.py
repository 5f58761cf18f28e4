"""Stable hashing shared by training and serving.

Everything here is deterministic across processes and machines (blake2b of a canonical
string); Python's ``hash()`` is salted per process and must never be used for features.
"""
from __future__ import annotations

import numpy as np

# The InsID and the hash live in the online contract (contract/ids.py); re-exported here
# because training and the featurizer hash through this module.
from contract.ids import ins_id, stable_hash64

__all__ = ["hash_bucket", "hash_buckets", "ins_id", "stable_hash64"]


def hash_bucket(field: str, value: object, n_buckets: int) -> int:
    """Bucket in ``[0, n_buckets)`` of a categorical value; the field name salts the hash
    so that equal values of different fields (user 1, item 1) do not share an embedding."""
    if n_buckets <= 0:
        raise ValueError(f"n_buckets must be positive, got {n_buckets}")
    return stable_hash64("feat", field, value) % n_buckets


def hash_buckets(field: str, values, n_buckets: int) -> np.ndarray:
    """Vectorised ``hash_bucket`` over many values; distinct values are hashed once."""
    values = np.asarray(values, dtype=object)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.int64)
    uniques, inverse = np.unique(values.astype(str), return_inverse=True)
    table = np.fromiter((hash_bucket(field, v, n_buckets) for v in uniques), dtype=np.int64,
                        count=len(uniques))
    return table[inverse].reshape(values.shape)
