"""Instance ids (InsID) and the stable 64-bit hash they are made of.

``ins_id`` is a stable 64-bit hash of (request id, item id, timestamp) (IAT section 3.5) over
an unambiguous encoding of the parts: two different tuples of parts never hash the same input
bytes, whatever characters the ids contain. Everything here is deterministic across processes
and machines (blake2b); Python's ``hash()`` is salted per process and must never be used.
"""
from __future__ import annotations

import hashlib
import numbers

SEPARATOR = "\x1f"  # joins the parts in the compact form (see ``encode_parts``)
FRAMED = b"\xff"  # first byte of the length-prefixed form; never occurs in UTF-8 text


def canonical(part: object) -> str:
    """The text a part is hashed as. Integers and integral floats read alike (``3``, ``3.0``,
    ``"3"``), so a value read as a number by one loader and as text by another hashes the same."""
    if isinstance(part, bool):
        return "1" if part else "0"
    if isinstance(part, numbers.Integral):
        return str(int(part))
    if isinstance(part, numbers.Real):
        value = float(part)
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(part, bytes):
        return part.decode("utf-8", "surrogateescape")
    return str(part)


def encode_parts(*parts: object) -> bytes:
    """Bytes that identify the tuple of the parts' canonical texts: distinct tuples, distinct bytes.

    Two forms, chosen per tuple:
    - compact: the texts joined by ``SEPARATOR``, UTF-8, used when there is at least one part
      and no text contains the separator or a lone surrogate. This is the encoding every InsID
      and feature bucket had before, so ids already stored (and buckets already trained) keep
      their values, and a rolling upgrade never gives one instance two ids. Splitting on the
      separator recovers the texts, so this form is unambiguous on the tuples it is used for.
    - framed: ``FRAMED``, then per text its UTF-8 length (8 bytes, little-endian) and its
      bytes (lone surrogates kept as their own 3-byte sequences, so "\\udcc3\\udca9" is not "é").
      A length-prefixed sequence decodes one way only, and its first byte (0xff) never starts
      a compact encoding (valid UTF-8), so the two forms never meet.
    """
    texts = [canonical(p) for p in parts]
    if texts and not any(SEPARATOR in t for t in texts):
        try:
            return SEPARATOR.join(texts).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: only the framed form keeps it distinct
            pass
    out = bytearray(FRAMED)
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(8, "little")
        out += data
    return bytes(out)


def stable_hash64(*parts: object) -> int:
    """Unsigned 64-bit hash (blake2b, 8-byte digest) of ``encode_parts(*parts)``."""
    digest = hashlib.blake2b(encode_parts(*parts), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


def ins_id(request_id: str, item_id: str, timestamp_ms: int) -> int:
    """InsID: stable 64-bit id of one training instance (IAT section 3.5).

    Datasets without a request id (MovieLens) use ``f"{user}:{timestamp}"``.
    """
    return stable_hash64("insid", request_id, item_id, int(timestamp_ms))
