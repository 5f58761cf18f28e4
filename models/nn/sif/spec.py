"""The raw-sample schema the Sample Tokenizer reads, and its split into sub-tokens (HGAQ, Eq. 2-4).

The tokenizer does not depend on the data loader: a caller describes its columns here (which
categorical, multi-valued and numeric fields exist, in the order of the input tensors, and which
semantic group each belongs to) and the layout of sub-tokens follows from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

SEMANTIC_GROUPS = ("user", "item_id", "item", "context", "cross")


@dataclass(frozen=True)
class CategoricalField:
    """A categorical column whose ids are already hashed into [0, buckets)."""

    name: str
    buckets: int


@dataclass(frozen=True)
class FeatureGroup:
    """A semantic group (Eq. 2): the fields it holds, by name."""

    name: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class SubToken:
    """One sub-token (Eq. 4): slot `slot` of group `group`, over a non-overlapping field subset."""

    group: str
    slot: int
    fields: tuple[str, ...]


@dataclass(frozen=True)
class SampleSchema:
    """Columns of the tokenizer's input tensors, in tensor order, and their semantic groups.

    categorical: ids [..., F_cat]; multi: padded ids [..., F_multi, M] with -1 as padding;
    numeric: values [..., F_num] (the caller normalises them; they are used as given).
    """

    categorical: tuple[CategoricalField, ...] = ()
    multi: tuple[CategoricalField, ...] = ()
    numeric: tuple[str, ...] = ()
    groups: tuple[FeatureGroup, ...] = ()
    item_id_field: str | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.categorical] + [f.name for f in self.multi] + list(self.numeric)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"field {name!r} is declared twice in the sample schema")
            seen.add(name)
        for f in (*self.categorical, *self.multi):
            if f.buckets < 1:
                raise ValueError(f"field {f.name!r}: buckets must be >= 1, got {f.buckets}")
        grouped: set[str] = set()
        for group in self.groups:
            for name in group.fields:
                if name not in seen:
                    raise ValueError(f"group {group.name!r} names unknown field {name!r}")
                if name in grouped:
                    raise ValueError(f"field {name!r} is in more than one group")
                grouped.add(name)
        if self.item_id_field is not None:
            owners = [g for g in self.groups if self.item_id_field in g.fields]
            if not owners or len(owners[0].fields) != 1:
                raise ValueError(
                    f"item id field {self.item_id_field!r} must sit alone in its own group (HGAQ keeps"
                    " high-cardinality identity features in a singleton group)"
                )

    def kind_of(self, name: str) -> str:
        if any(f.name == name for f in self.categorical):
            return "categorical"
        if any(f.name == name for f in self.multi):
            return "multi"
        if name in self.numeric:
            return "numeric"
        raise KeyError(name)

    def field_count(self) -> int:
        return sum(len(g.fields) for g in self.groups)


def split_into_subtokens(schema: SampleSchema, k: int = 4) -> tuple[SubToken, ...]:
    """Adaptive sub-tokenization (Eq. 3): group g with f_g fields gets n_g = ceil(f_g / k) sub-tokens.

    The fields are split into n_g contiguous subsets whose sizes differ by at most one, so that no
    sub-token is starved while another carries k fields. Empty groups produce no sub-token.
    """
    if k < 1:
        raise ValueError(f"k (fields per sub-token) must be >= 1, got {k}")
    layout: list[SubToken] = []
    for group in schema.groups:
        f_g = len(group.fields)
        if f_g == 0:
            continue
        n_g = math.ceil(f_g / k)
        base, extra = divmod(f_g, n_g)
        start = 0
        for slot in range(n_g):
            size = base + (1 if slot < extra else 0)
            layout.append(SubToken(group.name, slot, tuple(group.fields[start : start + size])))
            start += size
    if not layout:
        raise ValueError("the sample schema has no grouped fields: nothing to tokenize")
    return tuple(layout)


class SampleInputs(NamedTuple):
    """One batch of raw samples as tensors; leading dimensions are free (e.g. [B] or [B, C])."""

    categorical: torch.Tensor  # int64 [..., F_cat]
    numeric: torch.Tensor  # float [..., F_num]
    multi: torch.Tensor | None = None  # int64 [..., F_multi, M], -1 = padding

    def leading_shape(self) -> torch.Size:
        return self.categorical.shape[:-1]

    def index(self, idx) -> "SampleInputs":
        return SampleInputs(
            self.categorical[idx], self.numeric[idx], None if self.multi is None else self.multi[idx]
        )


def validate_inputs(schema: SampleSchema, inputs: SampleInputs) -> None:
    """Raise a ValueError naming the offending field for malformed inputs (shape or id range)."""
    cat, num, multi = inputs
    if cat.shape[-1] != len(schema.categorical):
        raise ValueError(f"categorical: expected {len(schema.categorical)} columns, got {cat.shape[-1]}")
    if num.shape[-1] != len(schema.numeric):
        raise ValueError(f"numeric: expected {len(schema.numeric)} columns, got {num.shape[-1]}")
    if cat.shape[:-1] != num.shape[:-1]:
        raise ValueError(f"categorical and numeric leading shapes differ: {tuple(cat.shape)} vs {tuple(num.shape)}")
    if cat.dtype.is_floating_point:
        raise ValueError(f"categorical: ids must be integers, got {cat.dtype}")
    if cat.numel():
        flat = cat.reshape(-1, cat.shape[-1])
        lo, hi = flat.min(0).values, flat.max(0).values
        for j, f in enumerate(schema.categorical):
            if lo[j] < 0 or hi[j] >= f.buckets:
                raise ValueError(
                    f"categorical field {f.name!r}: ids must lie in [0, {f.buckets}), got [{int(lo[j])}, {int(hi[j])}]"
                )
    if num.numel() and not torch.isfinite(num).all():
        bad = (~torch.isfinite(num.reshape(-1, num.shape[-1]))).any(0).nonzero().flatten().tolist()
        raise ValueError(f"numeric field {schema.numeric[bad[0]]!r} holds a non-finite value")
    if schema.multi:
        if multi is None:
            raise ValueError(f"multi: fields {[f.name for f in schema.multi]} declared but no multi tensor given")
        if multi.shape[:-2] != cat.shape[:-1] or multi.shape[-2] != len(schema.multi):
            raise ValueError(
                f"multi: expected shape {tuple(cat.shape[:-1])} + ({len(schema.multi)}, M), got {tuple(multi.shape)}"
            )
        if multi.numel():
            flat = multi.reshape(-1, multi.shape[-2], multi.shape[-1])
            for j, f in enumerate(schema.multi):
                col = flat[:, j]
                if col.min() < -1 or col.max() >= f.buckets:
                    raise ValueError(
                        f"multi field {f.name!r}: ids must lie in [0, {f.buckets}) or be -1 (padding)"
                    )
