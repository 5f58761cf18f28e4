"""The request path as it was before featurization went through cached item rows, kept as the
baseline that ``iat bench score`` times beside the served one (``assemble:previous``).

Per request it turns every candidate's protobuf maps into dicts, checks every candidate's
values, then encodes field by field and candidate by candidate in Python. Its outputs equal
the served path's (``Featurizer.encode`` is checked against the offline loader row by row, and
the bench asserts the two arrays equal before timing them).
"""
from __future__ import annotations

import math

import numpy as np

from models.runtime.featurizer import (
    MULTI_SEP,
    FeatureError,
    Featurizer,
    derived_context,
)
from services.ranking.protocol import FeatureValues, ScoreQuery, validate_query


def previous_query(msg) -> tuple[ScoreQuery, list[str], list[FeatureValues]]:
    """A ScoreQuery with its item ids and features materialised per candidate up front."""
    item_ids = [c.item_id for c in msg.candidates]
    features = [FeatureValues(dict(c.features.categorical), dict(c.features.numeric)) for c in msg.candidates]
    query = ScoreQuery(msg.request_id, msg.user_id, msg.request_time_ms, msg.model,
                       FeatureValues(dict(msg.context.categorical), dict(msg.context.numeric)),
                       msg.candidates, [None] * len(item_ids))
    query.item_ids, query.candidate_features = item_ids, features  # the cached properties, set
    return query, item_ids, features


def previous_encode(featurizer: Featurizer, user_id: str, timestamp_ms: int, item_ids: list[str],
                    context_categorical: dict, context_numeric: dict,
                    candidate_categorical: list[dict], candidate_numeric: list[dict]):
    """``Featurizer.encode`` as it was: per field, per candidate, in Python."""
    spec = featurizer.spec
    featurizer.check_names(context_categorical, context_numeric, "context")
    for i, (c, n) in enumerate(zip(candidate_categorical, candidate_numeric)):
        if c or n:
            featurizer.check_names(c, n, f"candidates[{i}].features")
    n_cand = len(item_ids)
    shared = {**derived_context(timestamp_ms, spec.context_features), **context_categorical}
    shared[spec.user_field] = user_id
    bucket = featurizer.bucket

    cat = np.empty((n_cand, len(spec.cat_fields)), dtype=np.int64)
    for j, name in enumerate(spec.cat_fields):
        if name == spec.item_field:
            cat[:, j] = [bucket(name, item) for item in item_ids]
            continue
        default = bucket(name, str(shared.get(name, "")))
        if any(name in c for c in candidate_categorical):
            cat[:, j] = [bucket(name, str(c[name])) if name in c else default for c in candidate_categorical]
        else:
            cat[:, j] = default

    multi = np.full((n_cand, len(spec.multi_fields), spec.max_multi), -1, dtype=np.int64)
    for j, name in enumerate(spec.multi_fields):
        for i in range(n_cand):
            cell = candidate_categorical[i].get(name, shared.get(name, ""))
            values = [v.strip() for v in str(cell).split(MULTI_SEP) if v.strip()][: spec.max_multi]
            for k, v in enumerate(values):
                multi[i, j, k] = bucket(name, v)

    num = np.zeros((n_cand, len(spec.num_fields)), dtype=np.float32)
    for j, name in enumerate(spec.num_fields):
        mean, std = spec.num_stats[name]
        for i in range(n_cand):
            value = candidate_numeric[i].get(name, context_numeric.get(name))
            if value is None:
                continue
            if not math.isfinite(value):
                raise FeatureError(f"numeric[{name}]", "must be a finite number")
            num[i, j] = (value - mean) / std
    return cat, multi, num


def previous_assemble(featurizer: Featurizer, msg, max_candidates: int):
    """gRPC message -> validated arrays, the previous way (what ``assemble:previous`` times)."""
    query, item_ids, features = previous_query(msg)
    validate_query(query, max_candidates=max_candidates)
    return previous_encode(featurizer, query.user_id, query.request_time_ms, item_ids,
                           query.context.categorical, query.context.numeric,
                           [f.categorical for f in features], [f.numeric for f in features])
