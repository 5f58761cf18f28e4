"""Online featurization: one raw request -> the same arrays the offline loader builds.

Training reads a log column-wise (``models.data.prepared.load_dataset``); serving gets one request with
a user, a timestamp, shared context features and many candidates. Both must produce identical
ids and values, or the served model sees inputs it was never trained on (training/serving
skew). ``FeatureSpec`` carries everything the encoding needs (field order, hashing, the train
split's numeric statistics, derived context fields) and is stored in the model's manifest;
``Featurizer`` applies it to raw values. A test checks it against the loader row by row.

Raw values follow DESIGN.md section 7: feature names are the schema's column names; the user
and item ids come from the request itself; multi-valued values are joined with ``|``; the
derived context fields (hour, weekday, UTC) are computed here from the request time and must
not be sent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from models.runtime.hashing import hash_bucket

MULTI_SEP = "|"


class FeatureError(ValueError):
    """A raw feature that cannot be encoded; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class FeatureSpec:
    """What the featurizer needs, JSON-serialisable (it goes into manifest.json)."""

    user_field: str
    item_field: str
    cat_fields: list[str]
    multi_fields: list[str]
    num_fields: list[str]
    num_stats: dict[str, tuple[float, float]]
    n_buckets: int
    max_multi: int
    context_features: list[str]
    field_groups: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_prepared(cls, data, max_multi: int | None = None, context_features=("hour", "weekday")) -> "FeatureSpec":
        derived = [f for f in data.cat_fields if f in context_features]
        return cls(
            user_field=data.user_field, item_field=data.item_field,
            cat_fields=list(data.cat_fields), multi_fields=list(data.multi_fields),
            num_fields=list(data.num_fields),
            num_stats={k: (float(m), float(s)) for k, (m, s) in data.num_stats.items()},
            n_buckets=int(data.n_buckets),
            max_multi=int(max_multi if max_multi is not None else data.multi.shape[2]),
            context_features=derived, field_groups={k: list(v) for k, v in data.field_groups.items()},
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "FeatureSpec":
        raw = dict(raw)
        raw["num_stats"] = {k: (float(v[0]), float(v[1])) for k, v in raw["num_stats"].items()}
        return cls(**raw)

    @property
    def settable_fields(self) -> set[str]:
        """Names a request may send (ids come from the request; derived fields are computed)."""
        return (set(self.cat_fields) | set(self.multi_fields) | set(self.num_fields)) - {
            self.user_field, self.item_field, *self.context_features
        }


def derived_context(timestamp_ms: int, names) -> dict[str, str]:
    """The context fields the loader derives from a timestamp (UTC), as strings."""
    stamp = datetime.fromtimestamp(timestamp_ms / 1000.0, tz=timezone.utc)
    return {n: str(stamp.hour if n == "hour" else stamp.weekday()) for n in names}


class Featurizer:
    """Encodes raw requests with a ``FeatureSpec``; caches bucket ids per (field, value)."""

    def __init__(self, spec: FeatureSpec, cache_size: int = 1 << 20) -> None:
        self.spec = spec
        self._cache: dict[tuple[str, str], int] = {}
        self._cache_size = cache_size
        self._cat_set = set(spec.cat_fields)
        self._multi_set = set(spec.multi_fields)
        self._num_set = set(spec.num_fields)
        self._settable = spec.settable_fields

    def bucket(self, field_name: str, value: str) -> int:
        key = (field_name, value)
        hit = self._cache.get(key)
        if hit is None:
            hit = hash_bucket(field_name, value, self.spec.n_buckets)
            if len(self._cache) < self._cache_size:
                self._cache[key] = hit
        return hit

    def check_names(self, categorical: dict, numeric: dict, where: str) -> None:
        for name in categorical:
            if name not in self._settable or name in self._num_set:
                raise FeatureError(f"{where}.categorical[{name}]", self._why_unknown(name))
        for name in numeric:
            if name not in self._settable or name not in self._num_set:
                raise FeatureError(f"{where}.numeric[{name}]", self._why_unknown(name))

    def _why_unknown(self, name: str) -> str:
        spec = self.spec
        if name in (spec.user_field, spec.item_field):
            return "is taken from the request's user_id / item_id, do not send it as a feature"
        if name in spec.context_features:
            return "is derived from request_time_ms by the service, do not send it"
        if name in self._num_set:
            return "is numeric: send it in 'numeric'"
        if name in self._cat_set or name in self._multi_set:
            return "is categorical: send it in 'categorical'"
        return f"unknown feature (this model reads {sorted(self._settable)})"

    def encode(
        self,
        user_id: str,
        timestamp_ms: int,
        item_ids: list[str],
        context_categorical: dict[str, str],
        context_numeric: dict[str, float],
        candidate_categorical: list[dict[str, str]],
        candidate_numeric: list[dict[str, float]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (cat int64 [C, F_cat], multi int64 [C, F_multi, M], num float32 [C, F_num]).

        Candidate features override context features of the same name. Missing categorical
        values encode as the empty string and missing numerics as the train mean, exactly as
        the loader encodes a failed side-table join.
        """
        spec = self.spec
        self.check_names(context_categorical, context_numeric, "context")
        for i, (c, n) in enumerate(zip(candidate_categorical, candidate_numeric)):
            if c or n:
                self.check_names(c, n, f"candidates[{i}].features")
        n_cand = len(item_ids)
        shared = {**derived_context(timestamp_ms, spec.context_features), **context_categorical}
        shared[spec.user_field] = user_id

        cat = np.empty((n_cand, len(spec.cat_fields)), dtype=np.int64)
        for j, name in enumerate(spec.cat_fields):
            if name == spec.item_field:
                cat[:, j] = [self.bucket(name, item) for item in item_ids]
                continue
            default = self.bucket(name, str(shared.get(name, "")))
            if any(name in c for c in candidate_categorical):
                cat[:, j] = [self.bucket(name, str(c[name])) if name in c else default
                             for c in candidate_categorical]
            else:
                cat[:, j] = default

        multi = np.full((n_cand, len(spec.multi_fields), spec.max_multi), -1, dtype=np.int64)
        for j, name in enumerate(spec.multi_fields):
            for i in range(n_cand):
                cell = candidate_categorical[i].get(name, shared.get(name, ""))
                values = [v.strip() for v in str(cell).split(MULTI_SEP) if v.strip()][: spec.max_multi]
                for k, v in enumerate(values):
                    multi[i, j, k] = self.bucket(name, v)

        num = np.zeros((n_cand, len(spec.num_fields)), dtype=np.float32)
        for j, name in enumerate(spec.num_fields):
            mean, std = spec.num_stats[name]
            for i in range(n_cand):
                value = candidate_numeric[i].get(name, context_numeric.get(name))
                if value is None:
                    continue  # missing: the train mean, i.e. 0 after z-scoring
                if not math.isfinite(value):
                    raise FeatureError(f"numeric[{name}]", "must be a finite number")
                num[i, j] = (value - mean) / std
        return cat, multi, num
