"""Hostile HTTP input: schemathesis generates requests from each service's own OpenAPI document
(valid and invalid bodies, parameters and paths) against real processes. Never a 5xx; every
4xx from the API's validation names the field; a rejected ingest writes nothing.

Budgets are bounded (``MAX_EXAMPLES`` per operation and mode) so this stays well under a minute.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from storage.connection import EmbeddedRedis, connect
from tests.conftest import free_port

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 60
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def services(movielens_models, start_module_service, tmp_path_factory):
    server = EmbeddedRedis(directory=tmp_path_factory.mktemp("redis-fuzz")).start()
    env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(movielens_models.model_dir), "IAT_API_TOKEN": TOKEN,
           "IAT_RELOAD_INTERVAL_S": "0", "IAT_INGEST_MAX_REQUEST": "64", "IAT_MAX_CANDIDATES": "200"}
    source = start_module_service(["serve", "source"], env=env)
    ranking = start_module_service(["serve", "ranking", "--grpc-port", str(free_port())], env=env)
    client = connect(server.url, cluster=False)
    yield {"source": source, "ranking": ranking, "client": client}
    client.close()
    server.stop()


def _schema(base_url, path_regex):
    return schemathesis.openapi.from_url(base_url + "/openapi.json").include(path_regex=path_regex)


@pytest.fixture(scope="module")
def source_schema(services):
    return _schema(services["source"].base_url, "^/v1/instances$")


@pytest.fixture(scope="module")
def ranking_schema(services):
    return _schema(services["ranking"].base_url, "^/v1/")


def _check(case, response):
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    if response.status_code in (400, 413, 422):
        body = response.json()
        if response.status_code == 422:  # validation: one field path, also in the message
            assert body["error"] == "INVALID_ARGUMENT" and body["field"], body
            assert body["field"] in body["message"], body


def _fuzz(schema, base_url, each):
    """Run ``each(case, response)`` over valid and invalid cases of every operation in ``schema``."""
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES * len(operations), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        each(case, case.call(base_url=base_url, headers=AUTH, timeout=30))

    run()
    return operations


def test_source_openapi_fuzz(services, source_schema):
    client = services["client"]
    seen = []

    def each(case, response):
        _check(case, response)
        seen.append(response.status_code)
        if response.status_code != 200:
            assert client.dbsize() == before[0], "a rejected ingest wrote to the store"
        before[0] = client.dbsize()

    before = [client.dbsize()]
    _fuzz(source_schema, services["source"].base_url, each)
    assert 422 in seen  # the invalid cases did reach validation


def test_ranking_openapi_fuzz(services, ranking_schema):
    seen = []

    def each(case, response):
        _check(case, response)
        seen.append((case.path, response.status_code))

    operations = _fuzz(ranking_schema, services["ranking"].base_url, each)
    assert {op.path for op in operations} == {"/v1/score", "/v1/users/{user_id}/history"}
    assert {p for p, _ in seen} == {"/v1/score", "/v1/users/{user_id}/history"}
