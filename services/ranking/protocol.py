"""Typed messages of a Score call and the one validator both protocols go through.

gRPC messages and REST JSON are converted into a `ScoreQuery`, validated by
`validate_query`, served, and the `ScoreResult` converted back. Keeping one validator is
what makes the two protocols reject the same requests with the same field names. The serving
path checks the request's header (`validate_header`) and each candidate once per content
(`check_candidate`, on an item-cache miss); when anything fails, `validate_query` names the
field, so the error is the same as when every candidate is checked every time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from iat.ranking.v1 import ranking_pb2
from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from contract.validation import InvalidField, check_features, check_id, check_time_ms
from services.ranking.errors import InvalidRequest, TooManyCandidates
from services.ranking.wire import MalformedCandidate, ScoreRequestWire, parse_candidate
from services.wire_types import TimeMs


@dataclass(slots=True)
class FeatureValues:
    categorical: dict[str, str] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class ScoreQuery:
    """One Score request. The candidates stay as received (proto messages or their pydantic
    twins), each with a content key (``candidate_keys``) that the serving path looks up in
    its item-encoding cache; ``item_ids`` / ``candidate_features`` are built from them only
    when asked for (the reference validator and the error path)."""

    request_id: str
    user_id: str
    request_time_ms: int
    model: str
    context: FeatureValues
    candidates: Sequence
    candidate_keys: list

    @property
    def num_candidates(self) -> int:
        return len(self.candidate_keys)

    @cached_property
    def item_ids(self) -> list[str]:
        return [c.item_id for c in self.candidates]

    @cached_property
    def candidate_features(self) -> list[FeatureValues]:
        return [FeatureValues(dict(c.features.categorical), dict(c.features.numeric)) for c in self.candidates]

    def _view(self) -> tuple:
        return (self.request_id, self.user_id, self.request_time_ms, self.model, self.context,
                self.item_ids, self.candidate_features)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScoreQuery) and self._view() == other._view()


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
def _query(msg, keys: list, candidates: Sequence | None = None) -> ScoreQuery:
    """From a proto ScoreRequest (or ScoreRequestWire) or its pydantic twin: they expose the
    same attribute names."""
    return ScoreQuery(
        request_id=msg.request_id,
        user_id=msg.user_id,
        request_time_ms=msg.request_time_ms,
        model=msg.model,
        context=FeatureValues(dict(msg.context.categorical), dict(msg.context.numeric)),
        candidates=msg.candidates if candidates is None else candidates,
        candidate_keys=keys,
    )


class WireCandidates(Sequence):
    """A request's candidates as their wire bytes, parsed into messages only when asked for
    (the reference validator and the error path); a malformed one is named there."""

    __slots__ = ("_raw", "_parsed")

    def __init__(self, raw: list[bytes]) -> None:
        self._raw, self._parsed = raw, None

    def _messages(self) -> list:
        if self._parsed is None:
            parsed = []
            for i, raw in enumerate(self._raw):
                try:
                    parsed.append(parse_candidate(raw))
                except MalformedCandidate as err:
                    raise InvalidRequest(str(err), f"candidates[{i}]") from None
            self._parsed = parsed
        return self._parsed

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i):
        return self._messages()[i]


def query_from_proto(msg: ranking_pb2.ScoreRequest | ScoreRequestWire) -> ScoreQuery:
    # A candidate's wire bytes are its content key. The gRPC router hands over a
    # ScoreRequestWire, whose candidates are those bytes already (no Python per candidate);
    # a parsed ScoreRequest is serialized back, one C call per candidate. (Maps may serialize
    # in another order for equal content: a cache miss, never a wrong hit.)
    if isinstance(msg, ScoreRequestWire):
        keys = list(msg.candidates)
        return _query(msg, keys, WireCandidates(keys))
    return _query(msg, list(map(_SERIALIZE_CANDIDATE, msg.candidates)))


def query_from_model(req: ScoreRequestModel) -> ScoreQuery:
    keys = [(c.item_id, tuple(c.features.categorical.items()), tuple(c.features.numeric.items()))
            for c in req.candidates]
    return _query(req, keys)


_SERIALIZE_CANDIDATE = ranking_pb2.Candidate.SerializeToString


def candidate_from_key(key) -> tuple[str, dict[str, str], dict[str, float]]:
    """(item_id, categorical, numeric) of a ``candidate_keys`` entry (on an item-cache miss)."""
    if isinstance(key, bytes):
        try:
            c = parse_candidate(key)
        except MalformedCandidate as err:  # named by index on the error path (WireCandidates)
            raise InvalidField(str(err), "candidates") from None
        return c.item_id, dict(c.features.categorical), dict(c.features.numeric)
    item_id, categorical, numeric = key
    return item_id, dict(categorical), dict(numeric)


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
def validate_header(query: ScoreQuery, *, max_candidates: int) -> None:
    """Everything ``validate_query`` checks but the candidates (checked one by one, and only
    on an item-cache miss, by ``check_candidate``)."""
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
    except InvalidField as err:
        raise InvalidRequest(err.message, err.field) from None


def check_candidate(item_id: str, categorical: dict, numeric: dict) -> None:
    """One candidate's model-independent checks; raises InvalidField (a relative field name:
    the error path re-runs ``validate_query`` for the request's exact one)."""
    check_id(item_id, "item_id")
    check_features(categorical, numeric, "features")


def validate_query(query: ScoreQuery, *, max_candidates: int) -> None:
    """Raise InvalidRequest / TooManyCandidates naming the first offending field.

    The checks are contract.validation's, shared with the source service; feature names are
    checked against the chosen model by its featurizer.
    """
    validate_header(query, max_candidates=max_candidates)
    try:
        for i, (item_id, feats) in enumerate(zip(query.item_ids, query.candidate_features)):
            check_id(item_id, f"candidates[{i}].item_id")
            check_features(feats.categorical, feats.numeric, f"candidates[{i}].features")
    except InvalidField as err:
        raise InvalidRequest(err.message, err.field) from None
