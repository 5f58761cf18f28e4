"""The trained-instance archive: every instance the trainer trained on, kept on disk (not in
Redis) for offline training and backfill.

Redis holds what serving needs: each user's newest ``IAT_MAX_SEQUENCE_LENGTH`` records, and a
trimmed member's record is deleted with the trim (storage/write_instances.lua). The full
history lives here instead: at each checkpoint the trainer writes the instances trained since
the previous one as one segment, ``segment-<first row:012d>-<end row:012d>.npz`` (numpy,
compressed), BEFORE the checkpoint that covers them. A segment is written to a temporary name
and renamed, so it is whole or absent; after a kill between a segment and its checkpoint the
resumed trainer trains the same rows again and writes the same segment name again (the rows
are the same instances in the same order), so every trained instance is in exactly one
segment. ``read_archive`` joins the segments in row order.

Columns: ``user_id`` (str), ``ins_id`` (uint64), ``ts_ms`` (int64), ``item_hash`` (int64),
``cat`` [n, F_cat], ``multi`` [n, F_multi, M], ``num`` [n, F_num], ``labels`` [n, T] (as
trained: a label the window closed on is the policy's 0), and ``tasks``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

SEGMENT = re.compile(r"^segment-(\d{12})-(\d{12})\.npz$")
COLUMNS = ("user_id", "ins_id", "ts_ms", "item_hash", "cat", "multi", "num", "labels")


def write_segment(directory: Path, first: int, columns: dict[str, np.ndarray], tasks: list[str]) -> Path | None:
    """Rows ``first`` .. ``first + n - 1`` of the trained log; None when there are none."""
    n = len(columns["ts_ms"])
    if n == 0:
        return None
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"columns: missing {missing}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"segment-{first:012d}-{first + n:012d}.npz"
    tmp = directory / f".{path.name}.tmp"
    with tmp.open("wb") as fh:
        np.savez_compressed(fh, tasks=np.array(tasks), **{c: np.asarray(columns[c]) for c in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def read_archive(directory: Path) -> dict[str, np.ndarray]:
    """Every archived instance in the order trained (segments joined by their row ranges)."""
    segments = sorted((int(m.group(1)), int(m.group(2)), p) for p in Path(directory).glob("segment-*.npz")
                      if (m := SEGMENT.match(p.name)))
    expected = 0
    parts: list[dict] = []
    tasks = None
    for first, end, path in segments:
        if first != expected:
            raise ValueError(f"{path.name}: starts at row {first}, the archive holds rows up to {expected}")
        with np.load(path, allow_pickle=False) as z:
            parts.append({c: z[c] for c in COLUMNS})
            tasks = [str(t) for t in z["tasks"]]
        expected = end
    if not parts:
        return {"tasks": np.array([]), **{c: np.array([]) for c in COLUMNS}}
    return {"tasks": np.array(tasks), **{c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}}
