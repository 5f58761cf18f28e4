"""gRPC and REST requests become the same ScoreQuery and fail validation the same way."""
import math

import numpy as np
import pytest
from iat.ranking.v1 import ranking_pb2

from services.ranking.errors import InvalidRequest, TooManyCandidates
from services.ranking.protocol import (
    ScoreRequestModel,
    ScoreResult,
    query_from_model,
    query_from_proto,
    result_to_model,
    result_to_proto,
    validate_query,
)

REQUEST = {
    "request_id": "r1",
    "user_id": "42",
    "request_time_ms": 890_000_000_000,
    "context": {"categorical": {"device": "ios"}, "numeric": {"hour": 13.0}},
    "candidates": [
        {"item_id": "7", "features": {"categorical": {"genre": "a|b"}, "numeric": {}}},
        {"item_id": "9", "features": {"categorical": {}, "numeric": {"price": 1.5}}},
    ],
    "model": "iat",
}


def _proto(d=REQUEST):
    return ranking_pb2.ScoreRequest(
        request_id=d["request_id"], user_id=d["user_id"], request_time_ms=d["request_time_ms"],
        context=ranking_pb2.Features(**d["context"]), model=d["model"],
        candidates=[
            ranking_pb2.Candidate(item_id=c["item_id"], features=ranking_pb2.Features(**c["features"]))
            for c in d["candidates"]
        ],
    )


def test_both_protocols_give_the_same_query():
    a = query_from_proto(_proto())
    b = query_from_model(ScoreRequestModel.model_validate(REQUEST))
    assert a == b
    assert a.item_ids == ["7", "9"]
    assert a.candidate_features[0].categorical == {"genre": "a|b"}
    validate_query(a, max_candidates=10)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda q: setattr(q, "user_id", ""), "user_id"),
        (lambda q: setattr(q, "user_id", "x" * 600), "user_id"),
        (lambda q: setattr(q, "request_time_ms", -5), "request_time_ms"),
        (lambda q: setattr(q, "request_time_ms", 0), "request_time_ms"),
        (lambda q: setattr(q, "request_time_ms", 2**62), "request_time_ms"),
        (lambda q: q.item_ids.__setitem__(1, ""), "candidates[1].item_id"),
        (lambda q: q.candidate_features[1].numeric.__setitem__("price", math.nan), "candidates[1].features.numeric[price]"),
        (lambda q: q.context.numeric.__setitem__("hour", math.inf), "context.numeric[hour]"),
        (lambda q: setattr(q, "model", "m\x00"), "model"),
    ],
)
def test_bad_fields_are_named(mutate, field):
    q = query_from_model(ScoreRequestModel.model_validate(REQUEST))
    mutate(q)
    with pytest.raises(InvalidRequest) as err:
        validate_query(q, max_candidates=10)
    assert err.value.field == field
    assert field in str(err.value)


def test_too_many_candidates_is_resource_exhausted():
    q = query_from_proto(_proto())
    with pytest.raises(TooManyCandidates) as err:
        validate_query(q, max_candidates=1)
    assert err.value.grpc_code.name == "RESOURCE_EXHAUSTED"
    assert err.value.field == "candidates"


def test_result_keeps_row_major_candidate_order():
    scores = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=np.float32)
    res = ScoreResult("r", "iat", "v1", 3, ["like", "love"], scores)
    msg = result_to_proto(res)
    assert list(msg.scores) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert result_to_model(res).scores == pytest.approx(list(msg.scores))


def test_the_wire_view_gives_the_same_query_without_parsing_candidates():
    """The gRPC router reads ScoreRequestWire: the same query, each candidate's key its bytes."""
    from services.ranking.wire import ScoreRequestWire

    message = _proto()
    wire = ScoreRequestWire.FromString(message.SerializeToString())
    a, b = query_from_proto(wire), query_from_proto(message)
    assert a.candidate_keys == [c.SerializeToString() for c in message.candidates] == b.candidate_keys
    assert a == b and a.item_ids == ["7", "9"]
    validate_query(a, max_candidates=10)


def test_a_malformed_candidate_on_the_wire_is_named():
    from services.ranking.wire import ScoreRequestWire

    raw = _proto().SerializeToString() + b"\x2a\x03\xff\xff\xff"  # field 5, 3 bytes that are no Candidate
    query = query_from_proto(ScoreRequestWire.FromString(raw))
    assert query.num_candidates == 3
    with pytest.raises(InvalidRequest) as err:
        validate_query(query, max_candidates=10)
    assert err.value.field == "candidates[2]"
