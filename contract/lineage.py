"""Which source-model records a downstream model reads: a lineage from an oldest version on.

A source model belongs to a *lineage*, a name fixed when its architecture is created: a
retrained version of the same architecture keeps it, a new architecture starts a new one. Its
*ordinal* orders the versions of a lineage (monotonic: publish time in seconds). A downstream
model trained on the InsEmbs of ordinal n reads the records of its lineage written by ordinal n
or later (a source trained in streaming keeps publishing), never another lineage's
(docs/source-versions.md). Plain values, no storage format: storage/records.py stamps them.
"""
from __future__ import annotations

from dataclasses import dataclass

ORDINAL_MAX = 2**32 - 1  # the record header keeps an ordinal in 4 bytes


def check_lineage(name: object, field: str = "lineage") -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field}: must be a non-empty string, got {name!r}")
    return name


def check_ordinal(ordinal: object, field: str = "ordinal") -> int:
    if isinstance(ordinal, bool) or not isinstance(ordinal, int) or not 0 <= ordinal <= ORDINAL_MAX:
        raise ValueError(f"{field}: must be an int in [0, {ORDINAL_MAX}], got {ordinal!r}")
    return ordinal


@dataclass(frozen=True)
class SourceLineage:
    """Accept the records of ``lineage`` written by a version of ordinal >= ``min_ordinal``."""

    lineage: str
    min_ordinal: int = 0

    def __post_init__(self) -> None:
        check_lineage(self.lineage)
        check_ordinal(self.min_ordinal, "min_ordinal")
