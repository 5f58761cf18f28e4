"""The committed gRPC stubs match proto/ and the contract of DESIGN.md section 7."""
from services import protogen


def test_generated_stubs_are_fresh():
    stale = protogen.stale_files()
    assert stale == [], f"stale generated stubs {stale}: run `make proto`"


def test_contract_field_numbers():
    from iat.ranking.v1 import ranking_pb2

    req = ranking_pb2.ScoreRequest.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in req.items()} == {
        "request_id": 1, "user_id": 2, "request_time_ms": 3,
        "context": 4, "candidates": 5, "model": 6,
    }
    resp = ranking_pb2.ScoreResponse.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in resp.items()} == {
        "request_id": 1, "model": 2, "model_version": 3,
        "history_length": 4, "tasks": 5, "scores": 6,
    }
    svc = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"]
    assert svc.full_name == "iat.ranking.v1.RankingService"
    assert svc.methods_by_name["Score"].input_type.name == "ScoreRequest"
