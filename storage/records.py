"""Instance records and their compact binary format (one Redis string value per record).

A record is a fixed 48-byte little-endian header followed by the payload:

  offset size  field
  0      1     format version (2; version 1 records, without label arrival times, still read)
  1      1     codec id (0 fp32, 1 fp16, 2 int8; storage.codecs)
  2      1     flags: bit0 has embedding, bit1 has codes, bit2 codes are uint16 (else uint8)
  3      1     number of tasks the label bits refer to
  4      2     dim d of the embedding (0 when absent)
  6      2     code length m (0 when absent)
  8      8     InsID (uint64)
  16     8     timestamp, ms since the epoch (int64, >= 0)
  24     8     hashed item id (int64; an unsigned hash is stored as its two's complement)
  32     8     source-model version id (uint64), either
                 lineage id (4 bytes: first 4 of blake2b(lineage name)) + ordinal (uint32), both
                 little-endian: a source model with a lineage (contract/lineage.py), or
                 first 8 bytes of blake2b(version string): a source model without one
  40     4     label-known bits: bit i set when task i has a label
  44     4     label bits: bit i = label of task i (0/1)
  48     4*T   version 2: per task, when its label arrived, ms after the timestamp (uint32;
               0 for a label that came with the instance or a task without label);
               version 1 has no such field: its labels arrived with the instance
  ...    ...   embedding payload (codec), then m codes (uint8 or uint16)

Late labels (storage/update_labels.lua) set a task's known and label bits and its arrival time
in place. A read as of time T (``decode(..., labels_as_of_ms=T)``) shows a label only if it
arrived strictly before T: a label that arrived at or after T is unknown (-1) at T. Arrival
offsets are milliseconds so that this holds to the millisecond of a request; uint32 bounds a
label's delay at 49.7 days (``ARRIVAL_MAX_MS``; the label window is validated against it).

Every record a store writes has the same size, so a reply of n joined records is decoded with one
``np.frombuffer`` over a structured dtype; records of another layout (a codec change during a
roll-out) are decoded one by one, and records of another dimension or code length are skipped and
counted as incompatible.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

from contract.history import History
from contract.lineage import check_lineage, check_ordinal
from storage.codecs import Codec, CodecError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ARRIVAL_MAX_MS = 2**32 - 1
MAX_TASKS = 32
UINT64_MAX = 2**64 - 1

FLAG_EMBEDDING = 1
FLAG_CODES = 2
FLAG_CODES_UINT16 = 4

HEADER_DTYPE = np.dtype(
    [
        ("version", "u1"),
        ("codec", "u1"),
        ("flags", "u1"),
        ("n_tasks", "u1"),
        ("dim", "<u2"),
        ("code_len", "<u2"),
        ("ins_id", "<u8"),
        ("timestamp_ms", "<i8"),
        ("item_hash", "<i8"),
        ("source_version", "<u8"),
        ("label_known", "<u4"),
        ("label_bits", "<u4"),
    ]
)
HEADER_BYTES = HEADER_DTYPE.itemsize
assert HEADER_BYTES == 48


class InvalidRecord(ValueError):
    """A record (or sequence entry) that must not be written; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str, index: int | None = None) -> None:
        self.field = field
        self.index = index
        where = f" (item {index})" if index is not None else ""
        super().__init__(f"{field}: {message}{where}")


def source_version_id(version: str) -> int:
    """Stable 64-bit id of a source-model version string (what the header stores)."""
    return int.from_bytes(hashlib.blake2b(version.encode(), digest_size=8).digest(), "little")


def lineage_id(lineage: str) -> int:
    """Stable 32-bit id of a lineage name: the low half of a lineage-stamped version id."""
    return int.from_bytes(hashlib.blake2b(lineage.encode(), digest_size=4).digest(), "little")


def lineage_version_id(lineage: str, ordinal: int) -> int:
    """The header's version id of ordinal ``ordinal`` of ``lineage``: bytes 32..35 the lineage
    id, bytes 36..39 the ordinal, so a reader filters by two compares and needs no registry."""
    return lineage_id(check_lineage(lineage)) | check_ordinal(ordinal) << 32


def split_version_id(version_id) -> tuple:
    """(lineage id, ordinal) of header version ids (ints or a uint64 array). A record of a source
    model without lineage splits into a meaningless pair: another lineage to every reader."""
    if isinstance(version_id, np.ndarray):
        ids = version_id.astype(np.uint64)
        return ids & np.uint64(0xFFFFFFFF), ids >> np.uint64(32)
    return int(version_id) & 0xFFFFFFFF, int(version_id) >> 32


@dataclass
class InstanceRecord:
    ins_id: int
    user_id: str
    timestamp_ms: int
    embedding: np.ndarray | None = None  # float32 [d]
    codes: np.ndarray | None = None  # uint8 or uint16 [m]
    labels: dict[str, int] = field(default_factory=dict)  # task -> 0/1
    item_hash: int = 0
    source_version: str = ""
    # The writing source model's lineage and ordinal (contract/lineage.py); None: a source model
    # without lineage, whose records carry the hash of ``source_version`` instead.
    source_lineage: str | None = None
    source_ordinal: int = 0


def validate_user_id(user_id: object, index: int | None = None) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise InvalidRecord("user_id", f"must be a non-empty string, got {user_id!r}", index)
    return user_id


def validate_ins_id(ins_id: object, index: int | None = None) -> int:
    if isinstance(ins_id, (bool, float)) or not isinstance(ins_id, (int, np.integer)):
        raise InvalidRecord("ins_id", f"must be an unsigned 64-bit int, got {ins_id!r}", index)
    if not 0 <= int(ins_id) <= UINT64_MAX:
        raise InvalidRecord("ins_id", f"{ins_id} is outside [0, 2**64)", index)
    return int(ins_id)


def validate_timestamp(timestamp_ms: object, index: int | None = None, name: str = "timestamp_ms") -> int:
    if isinstance(timestamp_ms, (bool, float)) or not isinstance(timestamp_ms, (int, np.integer)):
        raise InvalidRecord(name, f"must be an int (ms since the epoch), got {timestamp_ms!r}", index)
    if int(timestamp_ms) < 0:
        raise InvalidRecord(name, f"must be >= 0, got {timestamp_ms}", index)
    if int(timestamp_ms) >= 2**53:
        # Redis sorted-set scores are doubles: larger ints would lose precision.
        raise InvalidRecord(name, f"must be < 2**53, got {timestamp_ms}", index)
    return int(timestamp_ms)


@dataclass(frozen=True)
class RecordFormat:
    """The binary format of one layout's records (``contract.layout.RecordLayout``): dim and codec,
    code length and dtype, task names; encodes and decodes them."""

    dim: int
    codec: Codec
    code_length: int = 0
    code_dtype: np.dtype = np.dtype(np.uint16)
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.dim <= 65535:
            raise ValueError(f"dim: must be in [0, 65535], got {self.dim}")
        if not 0 <= self.code_length <= 65535:
            raise ValueError(f"code_length: must be in [0, 65535], got {self.code_length}")
        if np.dtype(self.code_dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(f"code_dtype: must be uint8 or uint16, got {self.code_dtype}")
        if len(self.tasks) > MAX_TASKS or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: at most {MAX_TASKS} distinct names, got {self.tasks}")

    @cached_property
    def flags(self) -> int:
        flags = FLAG_EMBEDDING if self.dim else 0
        if self.code_length:
            flags |= FLAG_CODES
            if np.dtype(self.code_dtype) == np.uint16:
                flags |= FLAG_CODES_UINT16
        return flags

    @cached_property
    def record_dtype(self) -> np.dtype:
        fields = [(name, HEADER_DTYPE.fields[name][0]) for name in HEADER_DTYPE.names]
        fields.append(("label_arrival", "<u4", (len(self.tasks),)))
        fields.append(("embedding", "u1", (self.codec.payload_bytes(self.dim) if self.dim else 0,)))
        code_type = "<u2" if np.dtype(self.code_dtype) == np.uint16 else "u1"
        fields.append(("codes", code_type, (self.code_length,)))
        return np.dtype(fields)

    @cached_property
    def record_bytes(self) -> int:
        return self.record_dtype.itemsize

    # ---- writing ---------------------------------------------------------------------------

    def encode(self, records: Sequence[InstanceRecord]) -> list[bytes]:
        """One bytes value per record; every record is validated before anything is returned."""
        n = len(records)
        out = np.zeros(n, dtype=self.record_dtype)
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        task_bit = {task: 1 << i for i, task in enumerate(self.tasks)}
        for i, rec in enumerate(records):
            if not isinstance(rec, InstanceRecord):
                raise InvalidRecord("record", f"expected InstanceRecord, got {type(rec).__name__}", i)
            validate_user_id(rec.user_id, i)
            out["ins_id"][i] = validate_ins_id(rec.ins_id, i)
            out["timestamp_ms"][i] = validate_timestamp(rec.timestamp_ms, i)
            out["item_hash"][i] = self._item_hash(rec.item_hash, i)
            if not isinstance(rec.source_version, str):
                raise InvalidRecord("source_version", f"must be a string, got {rec.source_version!r}", i)
            out["source_version"][i] = self._source_id(rec, i)
            known = bits = 0
            if not isinstance(rec.labels, dict):
                raise InvalidRecord("labels", f"must be a dict task -> 0/1, got {type(rec.labels).__name__}", i)
            for task, value in rec.labels.items():
                if task not in task_bit:
                    raise InvalidRecord("labels", f"unknown task {task!r}; this store's tasks are {self.tasks}", i)
                if isinstance(value, bool):
                    value = int(value)
                if not isinstance(value, (int, np.integer)) or value not in (0, 1):
                    raise InvalidRecord("labels", f"label of {task!r} must be 0 or 1, got {value!r}", i)
                known |= task_bit[task]
                bits |= task_bit[task] if value else 0
            out["label_known"][i] = known
            out["label_bits"][i] = bits
            vectors[i] = self._embedding(rec.embedding, i)
            if self.code_length:
                out["codes"][i] = self._codes(rec.codes, i)
            elif rec.codes is not None:
                raise InvalidRecord("codes", "this store keeps no codes (code_length=0)", i)
        if self.dim:
            try:
                out["embedding"] = self.codec.encode(vectors)
            except CodecError as exc:
                raise InvalidRecord("embedding", str(exc)) from exc
        out["version"] = FORMAT_VERSION
        out["codec"] = self.codec.id
        out["flags"] = self.flags
        out["n_tasks"] = len(self.tasks)
        out["dim"] = self.dim
        out["code_len"] = self.code_length
        raw = out.tobytes()
        size = self.record_bytes
        return [raw[i * size:(i + 1) * size] for i in range(n)]

    @staticmethod
    def _source_id(rec: InstanceRecord, index: int) -> int:
        if rec.source_lineage is None:
            return source_version_id(rec.source_version)
        try:
            return lineage_version_id(rec.source_lineage, rec.source_ordinal)
        except ValueError as exc:
            name, message = str(exc).split(": ", 1)
            raise InvalidRecord("source_" + name, message, index) from None

    @staticmethod
    def _item_hash(value: object, index: int) -> int:
        if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
            raise InvalidRecord("item_hash", f"must be an int, got {value!r}", index)
        value = int(value)
        if not -(2**63) <= value <= UINT64_MAX:
            raise InvalidRecord("item_hash", f"{value} does not fit 64 bits", index)
        return value - 2**64 if value >= 2**63 else value

    def _embedding(self, embedding: object, index: int) -> np.ndarray:
        if not self.dim:
            if embedding is not None:
                raise InvalidRecord("embedding", "this store keeps no embeddings (dim=0)", index)
            return np.zeros(0, np.float32)
        if embedding is None:
            raise InvalidRecord("embedding", f"missing; this store needs a float vector of dim {self.dim}", index)
        vector = np.asarray(embedding)
        if vector.dtype.kind not in "fiu":
            raise InvalidRecord("embedding", f"must be numeric, got dtype {vector.dtype}", index)
        if vector.shape != (self.dim,):
            raise InvalidRecord("embedding", f"wrong dimension: shape {vector.shape}, expected ({self.dim},)", index)
        vector = vector.astype(np.float32)
        if not np.isfinite(vector).all():
            raise InvalidRecord("embedding", "has a NaN or inf value", index)
        return vector

    def _codes(self, codes: object, index: int) -> np.ndarray:
        if codes is None:
            raise InvalidRecord("codes", f"missing; this store needs {self.code_length} codes", index)
        array = np.asarray(codes)
        if array.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise InvalidRecord("codes", f"must be a uint8 or uint16 array, got dtype {array.dtype}", index)
        if array.itemsize > np.dtype(self.code_dtype).itemsize:
            raise InvalidRecord("codes", f"dtype {array.dtype} does not fit this store's {np.dtype(self.code_dtype)}", index)
        if array.shape != (self.code_length,):
            raise InvalidRecord("codes", f"wrong length: shape {array.shape}, expected ({self.code_length},)", index)
        return array

    # ---- reading ---------------------------------------------------------------------------

    def decode(self, blob: bytes, count: int, labels_as_of_ms: int | None = None) -> History:
        """Columns of ``count`` records joined in ``blob`` (in order). ``labels_as_of_ms``: a
        label that arrived at or after it reads as unknown (-1); None: every stored label."""
        rows = self._uniform_rows(blob, count)
        if rows is not None:
            return self._columns(rows, self.codec.decode(rows["embedding"], self.dim) if self.dim else None,
                                 labels_as_of_ms)
        return self._decode_mixed(blob, count, labels_as_of_ms)

    def _uniform_rows(self, blob: bytes, count: int) -> np.ndarray | None:
        """The ``count`` records of ``blob`` as one structured array when every one is of this
        layout, else None (none, or a layout change under way: ``_decode_mixed`` walks them)."""
        size = self.record_bytes
        if not count or len(blob) != count * size:
            return None
        # The first 8 bytes (version, codec, flags, n_tasks, dim, code_len) of every record
        # equal this layout's: one comparison of one uint64 column (a strided view, whatever
        # the record size) instead of six field comparisons.
        leading = np.ndarray((count,), dtype="<u8", buffer=blob, strides=(size,))
        if not (leading == self._leading_word).all():
            return None
        return np.frombuffer(blob, dtype=self.record_dtype, count=count)

    @cached_property
    def _leading_word(self) -> np.uint64:
        header = np.zeros(1, dtype=HEADER_DTYPE)
        header["version"], header["codec"], header["flags"] = FORMAT_VERSION, self.codec.id, self.flags
        header["n_tasks"], header["dim"], header["code_len"] = len(self.tasks), self.dim, self.code_length
        return header.view("<u8")[0]

    def labels_of(self, blob: bytes, count: int, labels_as_of_ms: int | None = None) -> np.ndarray | None:
        """``decode(blob, count, labels_as_of_ms).labels`` without decoding anything else, or None
        when the records are not all of this layout (``decode``'s slow path would drop some).
        What a reader needs to tell two reads apart when it keeps what it decoded before."""
        if not count:
            return np.zeros((0, len(self.tasks)), dtype=np.int8)
        rows = self._uniform_rows(blob, count)
        return None if rows is None else self._labels(rows, labels_as_of_ms)

    def _labels(self, rows: np.ndarray, labels_as_of_ms: int | None) -> np.ndarray:
        n_tasks = len(self.tasks)
        if not n_tasks:
            return np.zeros((len(rows), 0), dtype=np.int8)
        shifts = np.arange(n_tasks, dtype=np.uint32)
        known = ((rows["label_known"][:, None] >> shifts) & 1) == 1
        value = (rows["label_bits"][:, None] >> shifts) & 1
        if labels_as_of_ms is not None:
            arrived = rows["timestamp_ms"][:, None] + rows["label_arrival"].astype(np.int64)
            known &= arrived < labels_as_of_ms
        return np.where(known, value, -1).astype(np.int8)

    def _columns(self, rows: np.ndarray, embeddings: np.ndarray | None, labels_as_of_ms: int | None = None,
                 incompatible: int = 0) -> History:
        n = len(rows)
        labels = self._labels(rows, labels_as_of_ms)
        if embeddings is None:
            embeddings = np.zeros((n, self.dim), dtype=np.float32)
        codes = np.array(rows["codes"], dtype=self.code_dtype) if self.code_length else None
        return History(
            ins_ids=np.array(rows["ins_id"], dtype=np.uint64),
            timestamps_ms=np.array(rows["timestamp_ms"], dtype=np.int64),
            embeddings=embeddings,
            codes=codes,
            labels=labels,
            item_hashes=np.array(rows["item_hash"], dtype=np.int64),
            source_versions=np.array(rows["source_version"], dtype=np.uint64),
            incompatible=incompatible,
        )

    def _decode_mixed(self, blob: bytes, count: int, labels_as_of_ms: int | None = None) -> History:
        """Slow path: walk records one by one (a layout change is under way)."""
        mine = np.zeros(count, dtype=self.record_dtype)
        vectors = np.zeros((count, self.dim), dtype=np.float32)
        kept = 0
        incompatible = 0
        offset = 0
        for _ in range(count):
            if offset + HEADER_BYTES > len(blob):
                raise ValueError("truncated record reply")
            header = np.frombuffer(blob, dtype=HEADER_DTYPE, count=1, offset=offset)[0]
            flags = int(header["flags"])
            dim = int(header["dim"])
            code_len = int(header["code_len"])
            try:
                codec = Codec.from_id(int(header["codec"]))
            except ValueError:
                raise ValueError(f"record with unknown codec id {int(header['codec'])}") from None
            emb_bytes = codec.payload_bytes(dim) if flags & FLAG_EMBEDDING else 0
            code_item = 2 if flags & FLAG_CODES_UINT16 else 1
            code_bytes = code_len * code_item if flags & FLAG_CODES else 0
            version = int(header["version"])
            arrival_bytes = 4 * int(header["n_tasks"]) if version >= 2 else 0
            end = offset + HEADER_BYTES + arrival_bytes + emb_bytes + code_bytes
            compatible = (
                version in READABLE_VERSIONS
                and dim == self.dim
                and bool(flags & FLAG_EMBEDDING) == bool(self.dim)
                and (code_len if flags & FLAG_CODES else 0) == self.code_length
            )
            if compatible:
                for name in HEADER_DTYPE.names:
                    mine[kept][name] = header[name]
                if arrival_bytes:  # version 1: every label arrived with the instance (0)
                    arrivals = np.frombuffer(blob, dtype="<u4", count=arrival_bytes // 4, offset=offset + HEADER_BYTES)
                    shared = min(len(arrivals), len(self.tasks))
                    mine[kept]["label_arrival"][:shared] = arrivals[:shared]
                start = offset + HEADER_BYTES + arrival_bytes
                if self.dim:
                    payload = np.frombuffer(blob, dtype=np.uint8, count=emb_bytes, offset=start)
                    vectors[kept] = codec.decode(payload.reshape(1, -1), dim)[0]
                if self.code_length:
                    code_type = "<u2" if code_item == 2 else "u1"
                    mine[kept]["codes"] = np.frombuffer(blob, dtype=code_type, count=code_len, offset=start + emb_bytes)
                kept += 1
            else:
                incompatible += 1
            offset = end
        return self._columns(mine[:kept], vectors[:kept] if self.dim else None, labels_as_of_ms, incompatible)
