"""Stable hashing shared by training and serving.

Everything here is deterministic across processes and machines (blake2b of a canonical
string); Python's ``hash()`` is salted per process and must never be used for features.
"""
from __future__ import annotations

import hashlib

import numpy as np

_SEP = "\x1f"  # unit separator: cannot appear in a CSV/TSV cell by accident


def _canonical(part: object) -> str:
    if isinstance(part, bool):
        return "1" if part else "0"
    if isinstance(part, (int, np.integer)):
        return str(int(part))
    if isinstance(part, (float, np.floating)):
        value = float(part)
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(part, bytes):
        return part.decode("utf-8", "surrogateescape")
    return str(part)


def stable_hash64(*parts: object) -> int:
    """Unsigned 64-bit hash of the parts' canonical strings (blake2b, 8-byte digest).

    Integers and integral floats hash alike (``3`` and ``3.0``), so a value read as a
    number by one loader and as text by another still lands in the same bucket.
    """
    text = _SEP.join(_canonical(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


def ins_id(request_id: str, item_id: str, timestamp_ms: int) -> int:
    """InsID: stable 64-bit id of one training instance (IAT section 3.5).

    Datasets without a request id (MovieLens) use ``f"{user}:{timestamp}"``.
    """
    return stable_hash64("insid", request_id, item_id, int(timestamp_ms))


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
