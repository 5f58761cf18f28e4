"""Schema-driven loading of an interaction log into ONE columnar bundle, ``PreparedData``.

Every model in ``models/`` (base, IAT source and downstream, SIF) reads this bundle, so its
layout is a contract. ``N`` instances (one per log row), sorted by (timestamp, InsID):

=================  ====================  ====================================================
column             dtype / shape         meaning
=================  ====================  ====================================================
``user_index``     int64 [N]             0..U-1; ``user_ids[user_index]`` is the raw id
``item_ids``       object [N]            raw item id (str)
``item_hash``      int64 [N]             ``hash_bucket("<item column>", item, n_buckets)``
``ts_ms``          int64 [N]             event time, ms since epoch, non-decreasing
``ins_id``         uint64 [N]            ``hashing.ins_id(request, item, ts_ms)``
``cat``            int64 [N, F_cat]      hashed categorical ids, one column per ``cat_fields``
                                         (user id, item id, side-table and log columns, then
                                         the derived context fields hour / weekday)
``multi``          int64 [N, F_multi, M] hashed ids of multi-valued columns, padded with -1
``num``            float32 [N, F_num]    numerics, z-scored with TRAIN mean/std, missing -> 0
``labels``         float32 [N, T]        0/1 per task (``tasks``)
``split``          int8 [N]              0 train / 1 validation / 2 test, by global time
=================  ====================  ====================================================

Labels arrive after their instance: ``label_arrival_ms()`` (timestamp + the schema's
``label_delay_s``) and ``history_labels`` apply the serving rule offline, "a label that arrived
at or after T is unknown at T" (storage/records.py).

``field_groups`` maps each semantic group (user / item / context / cross) to the feature
names in it (names as in ``cat_fields`` / ``multi_fields`` / ``num_fields``).

``history_index(L)`` -> int64 [N, L]: for instance n, the row indices of the SAME user's
instances with timestamp strictly before ``ts_ms[n]``, newest first, padded with -1. This is
the only way models see the past, which is what keeps them free of future leakage: an
instance at the same millisecond as the request is never part of its history.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.data.schema import DatasetSchema, SchemaError
from models.runtime.hashing import hash_buckets, ins_id

DEFAULT_BUCKETS = 1 << 16
GROUPS = ("user", "item", "context", "cross")


@dataclass
class PreparedData:
    name: str
    tasks: list[str]
    user_ids: np.ndarray          # object [U] raw user ids
    user_index: np.ndarray        # int64 [N]
    item_ids: np.ndarray          # object [N]
    item_hash: np.ndarray         # int64 [N]
    ts_ms: np.ndarray             # int64 [N]
    ins_id: np.ndarray            # uint64 [N]
    cat: np.ndarray               # int64 [N, F_cat]
    multi: np.ndarray             # int64 [N, F_multi, M], -1 padded
    num: np.ndarray               # float32 [N, F_num]
    labels: np.ndarray            # float32 [N, T]
    split: np.ndarray             # int8 [N]
    cat_fields: list[str]
    multi_fields: list[str]
    num_fields: list[str]
    field_groups: dict[str, list[str]]
    n_buckets: int
    item_field: str
    user_field: str
    num_stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # train mean, std
    label_delay_ms: int = 0  # the schema's label_delay_s: when labels arrive after their instance
    _history_cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.ts_ms)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def split_indices(self, which: int) -> np.ndarray:
        return np.flatnonzero(self.split == which)

    def history_index(self, length: int) -> np.ndarray:
        """int64 [N, length]: same user's strictly-earlier instances, newest first, -1 padded."""
        if length not in self._history_cache:
            self._history_cache[length] = build_history_index(self.user_index, self.ts_ms, length)
        return self._history_cache[length]

    def history_length(self) -> np.ndarray:
        """int64 [N]: how many strictly-earlier instances each instance's user has."""
        if -1 not in self._history_cache:
            self._history_cache[-1] = build_history_index(self.user_index, self.ts_ms, 0, counts_only=True)
        return self._history_cache[-1]

    def label_arrival_ms(self) -> np.ndarray:
        """int64 [N]: when each instance's labels arrived (the log has no arrival times: its
        timestamp + ``label_delay_ms``)."""
        return self.ts_ms + np.int64(self.label_delay_ms)

    def history_labels(self, hist: np.ndarray, as_of_ms: np.ndarray) -> np.ndarray:
        """int8 [N, L, T]: the labels of history rows ``hist`` ([N, L], -1 padded) as known at
        ``as_of_ms`` ([N], e.g. each instance's timestamp): -1 for padding and for a label that
        arrived at or after that time, the serving rule. With no delay every earlier instance's
        label is known (strictly-earlier histories), as before."""
        rows = np.clip(hist, 0, None)
        known = (hist >= 0) & (self.label_arrival_ms()[rows] < np.asarray(as_of_ms, np.int64)[:, None])
        return np.where(known[..., None], self.labels[rows].astype(np.int8), np.int8(-1)).astype(np.int8)

    def with_arrays(self, **arrays) -> "PreparedData":
        """A copy with some columns replaced (history caches dropped)."""
        return replace(self, _history_cache={}, **arrays)

    def subset_users(self, keep_users: np.ndarray) -> "PreparedData":
        """Only the instances of the given user indices (user indices are kept as they are)."""
        rows = np.flatnonzero(np.isin(self.user_index, keep_users))
        return replace(self, user_index=self.user_index[rows], item_ids=self.item_ids[rows],
                       item_hash=self.item_hash[rows], ts_ms=self.ts_ms[rows],
                       ins_id=self.ins_id[rows], cat=self.cat[rows], multi=self.multi[rows],
                       num=self.num[rows], labels=self.labels[rows], split=self.split[rows],
                       _history_cache={})


def build_history_index(user_index: np.ndarray, ts_ms: np.ndarray, length: int,
                        counts_only: bool = False) -> np.ndarray:
    n = len(ts_ms)
    order = np.lexsort((np.arange(n), ts_ms, user_index))  # by user, then time
    u_sorted, t_sorted = user_index[order], ts_ms[order]
    pos = np.arange(n)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = u_sorted[1:] != u_sorted[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    new_tie = new_user.copy()
    new_tie[1:] |= t_sorted[1:] != t_sorted[:-1]
    tie_start = np.maximum.accumulate(np.where(new_tie, pos, 0))  # first row with this (user, ts)
    count_sorted = tie_start - user_start
    if counts_only:
        counts = np.empty(n, dtype=np.int64)
        counts[order] = count_sorted
        return counts
    hist = np.full((n, length), -1, dtype=np.int64)
    if length == 0:
        return hist
    src = tie_start[:, None] - 1 - np.arange(length)[None, :]
    valid = src >= user_start[:, None]
    hist_sorted = np.where(valid, order[np.clip(src, 0, None)], -1)
    hist[order] = hist_sorted
    return hist


def read_table(path: Path, sep: str, what: str) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=sep)
        try:
            header = next(reader)
        except StopIteration:
            raise SchemaError(f"{what}: {path} is empty") from None
        header = [h.split(":", 1)[0].strip() for h in header]
        rows = [r for r in reader if r]
    return header, rows


def _column(header: list[str], rows: list[list[str]], name: str, what: str) -> np.ndarray:
    if name not in header:
        raise SchemaError(f"{what}: column '{name}' not found (columns: {header})")
    i = header.index(name)
    return np.array([r[i].strip() if i < len(r) else "" for r in rows], dtype=object)


def _to_float(values: np.ndarray, what: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    for k, v in enumerate(values):
        if v == "" or v is None:
            out[k] = np.nan
            continue
        try:
            out[k] = float(v)
        except ValueError:
            raise SchemaError(f"{what}: value {v!r} in row {k + 1} is not a number") from None
    return out


def _first_per_ins_id(header: list[str], rows: list[list[str]], log) -> list[list[str]]:
    """The rows whose (request, item, timestamp) - the InsID's parts - is seen first."""
    keys = [_column(header, rows, c, f"log.{what}") for c, what in
            ((log.request or log.user, "request" if log.request else "user"), (log.item, "item"),
             (log.timestamp, "timestamp"))]
    seen: set[tuple[str, str, str]] = set()
    keep = []
    for k, key in enumerate(zip(*keys)):
        if key not in seen:
            seen.add(key)
            keep.append(rows[k])
    return keep


def _bucketize(header: list[str], rows: list[list[str]], spec, what: str) -> np.ndarray:
    values = _to_float(_column(header, rows, spec.column, what), what)
    return np.array([spec.bucket(v) for v in values], dtype=object)


def split_by_time(ts_ms: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """0/1/2 by global time quantiles; equal timestamps always fall in the same split."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1: {fractions}")
    n = len(ts_ms)
    sorted_ts = np.sort(ts_ms)
    t_val = sorted_ts[min(n - 1, int(math.floor(n * fractions[0])))]
    t_test = sorted_ts[min(n - 1, int(math.floor(n * (fractions[0] + fractions[1]))))]
    split = np.zeros(n, dtype=np.int8)
    split[ts_ms >= t_val] = 1
    split[ts_ms >= t_test] = 2
    return split


def load_dataset(schema: DatasetSchema, data_dir: str | Path, *,
                 n_buckets: int = DEFAULT_BUCKETS, max_multi: int = 8,
                 split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> PreparedData:
    """Read the schema's files under ``data_dir`` and encode them into a ``PreparedData``."""
    data_dir = Path(data_dir)
    log = schema.log
    header, rows = read_table(data_dir / log.path, log.sep, "log")
    if not rows:
        raise SchemaError(f"log: {data_dir / log.path} has no rows")
    if log.dedupe:
        rows = _first_per_ins_id(header, rows, log)
    users = _column(header, rows, log.user, "log.user")
    items = _column(header, rows, log.item, "log.item")
    ts_raw = _to_float(_column(header, rows, log.timestamp, "log.timestamp"), "log.timestamp")
    if np.isnan(ts_raw).any():
        raise SchemaError(f"log.timestamp: column '{log.timestamp}' has empty values")
    ts_ms = (ts_raw * (1000.0 if log.timestamp_unit == "s" else 1.0)).astype(np.int64)
    n = len(rows)

    # Columns by feature name, with their semantic group.
    cat_cols: dict[str, np.ndarray] = {log.user: users, log.item: items}
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    groups["user"].append(log.user)
    groups["item"].append(log.item)
    num_cols: dict[str, np.ndarray] = {}
    multi_cols: dict[str, tuple[np.ndarray, str]] = {}
    for name in log.categorical:
        cat_cols[name] = _column(header, rows, name, "log.categorical")
        groups["context"].append(name)
    for name in log.numeric:
        num_cols[name] = _to_float(_column(header, rows, name, "log.numeric"), f"log.numeric '{name}'")
        groups["context"].append(name)
    for name, sep in log.multi.items():
        multi_cols[name] = (_column(header, rows, name, "log.multi"), sep)
        groups["context"].append(name)
    for name, spec in log.buckets.items():
        cat_cols[name] = _bucketize(header, rows, spec, f"log.buckets.{name}")
        groups["context"].append(name)

    for t_i, table in enumerate(schema.tables):
        what = f"tables[{t_i}] ({table.path})"
        t_header, t_rows = read_table(data_dir / table.path, table.sep, what)
        keys = _column(t_header, t_rows, table.key, f"{what}.key")
        if table.key not in header:
            raise SchemaError(f"{what}.key: column '{table.key}' is not in the log (columns: {header})")
        lookup = {k: i for i, k in enumerate(keys)}
        log_keys = _column(header, rows, table.key, f"{what}.key")
        pos = np.array([lookup.get(k, -1) for k in log_keys], dtype=np.int64)
        missing = pos < 0

        def joined(col: np.ndarray) -> np.ndarray:
            out = col[np.clip(pos, 0, None)]
            out[missing] = ""
            return out

        for name in table.categorical:
            cat_cols[name] = joined(_column(t_header, t_rows, name, f"{what}.categorical"))
            groups[table.group].append(name)
        for name in table.numeric:
            num_cols[name] = _to_float(joined(_column(t_header, t_rows, name, f"{what}.numeric")),
                                       f"{what}.numeric '{name}'")
            groups[table.group].append(name)
        for name, sep in table.multi.items():
            multi_cols[name] = (joined(_column(t_header, t_rows, name, f"{what}.multi")), sep)
            groups[table.group].append(name)
        for name, spec in table.buckets.items():
            cat_cols[name] = joined(_bucketize(t_header, t_rows, spec, f"{what}.buckets.{name}"))
            groups[table.group].append(name)

    labels = np.zeros((n, len(schema.labels)), dtype=np.float32)
    for t, lab in enumerate(schema.labels):
        values = _to_float(_column(header, rows, lab.column, f"labels[{t}].column"),
                           f"labels[{t}] '{lab.name}'")
        if lab.min is None:
            bad = ~np.isin(values, (0.0, 1.0))
            if bad.any():
                raise SchemaError(f"labels[{t}] '{lab.name}': column '{lab.column}' must be 0/1 "
                                  f"when no 'min' is given (row {int(np.argmax(bad)) + 1})")
            labels[:, t] = values
        else:
            labels[:, t] = np.nan_to_num(values, nan=-np.inf) >= lab.min

    # Derived context from the timestamp (UTC, so training and serving agree).
    if schema.context_features:
        stamps = [datetime.fromtimestamp(t / 1000.0, tz=timezone.utc) for t in ts_ms]
        for name in schema.context_features:
            cat_cols[name] = np.array([str(d.hour if name == "hour" else d.weekday()) for d in stamps],
                                      dtype=object)
            groups["context"].append(name)

    # InsIDs, then the canonical order: by time, ties by InsID. The online store orders equal
    # timestamps by InsID too (sorted-set members), so histories built here and histories read
    # from Redis list tied instances in the same order (order matters to the models).
    request = (_column(header, rows, log.request, "log.request") if log.request
               else np.array([f"{u}:{t_raw}" for u, t_raw in
                              zip(users, _column(header, rows, log.timestamp, "log"))], dtype=object))
    ins_unsorted = np.fromiter((ins_id(r, i, t) for r, i, t in zip(request, items, ts_ms)),
                               dtype=np.uint64, count=n)
    order = np.lexsort((ins_unsorted, ts_ms))
    ts_ms = ts_ms[order]
    split = split_by_time(ts_ms, split_fractions)
    user_ids, user_index = np.unique(users[order].astype(str), return_inverse=True)
    user_ids = user_ids.astype(object)

    cat_fields = list(cat_cols)
    cat = np.stack([hash_buckets(f, cat_cols[f][order], n_buckets) for f in cat_fields], axis=1)

    multi_fields = list(multi_cols)
    multi = np.full((n, len(multi_fields), max_multi), -1, dtype=np.int64)
    for j, name in enumerate(multi_fields):
        col, sep = multi_cols[name]
        col = col[order]
        rows_at, slots, values = [], [], []
        for k, cell in enumerate(col):
            vals = [v.strip() for v in str(cell).split(sep) if v.strip()][:max_multi]
            rows_at.extend([k] * len(vals))
            slots.extend(range(len(vals)))
            values.extend(vals)
        if values:  # one hashing call per field: distinct values are hashed once
            multi[rows_at, j, slots] = hash_buckets(name, values, n_buckets)

    num_fields = list(num_cols)
    num = np.zeros((n, len(num_fields)), dtype=np.float32)
    stats: dict[str, tuple[float, float]] = {}
    train = split == 0
    for j, name in enumerate(num_fields):
        col = num_cols[name][order]
        ref = col[train & ~np.isnan(col)]
        mean = float(ref.mean()) if len(ref) else 0.0
        std = float(ref.std()) if len(ref) > 1 else 1.0
        std = std if std > 1e-12 else 1.0
        stats[name] = (mean, std)
        num[:, j] = np.nan_to_num((col - mean) / std, nan=0.0)

    items_sorted = items[order]
    ins = ins_unsorted[order]
    return PreparedData(
        name=schema.name, tasks=schema.tasks, user_ids=user_ids,
        user_index=user_index.astype(np.int64), item_ids=items_sorted,
        item_hash=cat[:, cat_fields.index(log.item)].copy(), ts_ms=ts_ms, ins_id=ins, cat=cat,
        multi=multi, num=num, labels=labels[order], split=split, cat_fields=cat_fields,
        multi_fields=multi_fields, num_fields=num_fields, field_groups=groups,
        n_buckets=n_buckets, item_field=log.item, user_field=log.user, num_stats=stats,
        label_delay_ms=schema.label_delay_ms)
