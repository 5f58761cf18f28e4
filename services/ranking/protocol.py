"""Typed messages of a Score call and the one validator both protocols go through.

gRPC messages and REST JSON are converted into a `ScoreQuery`, validated by
`validate_query`, served, and the `ScoreResult` converted back. Keeping one validator is
what makes the two protocols reject the same requests with the same field names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from iat.ranking.v1 import ranking_pb2
from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from contract.validation import InvalidField, check_features, check_id, check_time_ms
from services.ranking.errors import InvalidRequest, TooManyCandidates
from services.wire_types import TimeMs


@dataclass(slots=True)
class FeatureValues:
    categorical: dict[str, str] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class ScoreQuery:
    request_id: str
    user_id: str
    request_time_ms: int
    model: str
    context: FeatureValues
    item_ids: list[str]
    candidate_features: list[FeatureValues]

    @property
    def num_candidates(self) -> int:
        return len(self.item_ids)


@dataclass(slots=True)
class ScoreResult:
    request_id: str
    model: str
    model_version: str
    history_length: int
    tasks: list[str]
    scores: np.ndarray  # float32 [candidates, tasks], candidate order kept


# --- REST twins of the proto messages ------------------------------------------------
class FeaturesModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categorical: dict[str, str] = Field(default_factory=dict)
    numeric: dict[str, StrictFloat] = Field(default_factory=dict)


class CandidateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str
    features: FeaturesModel = Field(default_factory=FeaturesModel)


class ScoreRequestModel(BaseModel):
    """JSON of ScoreRequest (same field names as the proto)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = ""
    user_id: str
    request_time_ms: TimeMs
    context: FeaturesModel = Field(default_factory=FeaturesModel)
    candidates: list[CandidateModel] = Field(default_factory=list)
    model: str = ""


class ScoreResponseModel(BaseModel):
    request_id: str
    model: str
    model_version: str
    history_length: int
    tasks: list[str]
    scores: list[float]


# --- conversions ---------------------------------------------------------------------
def _query(msg) -> ScoreQuery:
    """From a proto ScoreRequest or its pydantic twin: both expose the same attribute names."""
    return ScoreQuery(
        request_id=msg.request_id,
        user_id=msg.user_id,
        request_time_ms=msg.request_time_ms,
        model=msg.model,
        context=FeatureValues(dict(msg.context.categorical), dict(msg.context.numeric)),
        item_ids=[c.item_id for c in msg.candidates],
        candidate_features=[
            FeatureValues(dict(c.features.categorical), dict(c.features.numeric))
            for c in msg.candidates
        ],
    )


def query_from_proto(msg: ranking_pb2.ScoreRequest) -> ScoreQuery:
    return _query(msg)


def query_from_model(req: ScoreRequestModel) -> ScoreQuery:
    return _query(req)


def _result_fields(res: ScoreResult) -> dict:
    return dict(
        request_id=res.request_id, model=res.model, model_version=res.model_version,
        history_length=res.history_length, tasks=res.tasks, scores=res.scores.reshape(-1).tolist(),
    )


def result_to_proto(res: ScoreResult) -> ranking_pb2.ScoreResponse:
    return ranking_pb2.ScoreResponse(**_result_fields(res))


def result_to_model(res: ScoreResult) -> ScoreResponseModel:
    return ScoreResponseModel(**_result_fields(res))


# --- validation ----------------------------------------------------------------------
def validate_query(query: ScoreQuery, *, max_candidates: int) -> None:
    """Raise InvalidRequest / TooManyCandidates naming the first offending field.

    The checks are contract.validation's, shared with the source service; feature names are
    checked against the chosen model by its featurizer.
    """
    try:
        check_id(query.request_id, "request_id", required=False)
        check_id(query.user_id, "user_id")
        check_id(query.model, "model", required=False)
        check_time_ms(query.request_time_ms, "request_time_ms")
        if query.num_candidates > max_candidates:
            raise TooManyCandidates(
                f"{query.num_candidates} candidates, the limit is {max_candidates}", "candidates"
            )
        check_features(query.context.categorical, query.context.numeric, "context")
        for i, (item_id, feats) in enumerate(zip(query.item_ids, query.candidate_features)):
            check_id(item_id, f"candidates[{i}].item_id")
            check_features(feats.categorical, feats.numeric, f"candidates[{i}].features")
    except InvalidField as err:
        raise InvalidRequest(err.message, err.field) from None
