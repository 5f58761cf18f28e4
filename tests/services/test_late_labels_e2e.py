"""Late labels end to end: real source and ranking processes on a real Redis, models trained on
MovieLens-100K. Exposures are ingested without labels; POST /v1/labels joins them later; the
ranking history endpoint shows a label only to requests after it arrived."""
from __future__ import annotations

import re
import shutil

import httpx
import pytest

from models.data.raw import raw_instances
from models.data.schema import load_schema
from storage.connection import EmbeddedRedis

WINDOW_S = 60


@pytest.fixture(scope="module")
def stack(movielens_models, start_module_service, tmp_path_factory):
    root = tmp_path_factory.mktemp("late-labels")
    model_dir = root / "models"
    shutil.copytree(movielens_models.model_dir, model_dir)
    server = EmbeddedRedis(directory=root / "redis").start()
    env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(model_dir), "IAT_RUNTIME": "torchscript",
           "IAT_LABEL_WINDOW_S": str(WINDOW_S), "IAT_RELOAD_INTERVAL_S": "0"}
    source = start_module_service(["serve", "source"], env=env)
    ranking = start_module_service(["serve", "ranking"], env=env)
    raw = raw_instances(load_schema("movielens-100k"), movielens_models.data_dir)
    user = raw[0]["user_id"]
    mine = [dict(r, labels={}) for r in raw if r["user_id"] == user][:4]  # exposures: no labels yet
    response = httpx.post(source.base_url + "/v1/instances", json={"instances": mine}, timeout=120)
    assert response.status_code == 200, response.text
    yield source, ranking, user, mine, response.json()["ins_ids"]
    server.stop()


def post_labels(source, *updates):
    return httpx.post(source.base_url + "/v1/labels", json={"updates": list(updates)}, timeout=60)


def history_labels(ranking, user, before_ms):
    response = httpx.get(f"{ranking.base_url}/v1/users/{user}/history", params={"before_ms": before_ms}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version_mismatch"] == 0  # the records carry the source lineage the ranker reads
    return {i["ins_id"]: i["labels"] for i in body["instances"]}


def metric(service, outcome):
    text = httpx.get(service.base_url + "/metrics", timeout=30).text
    found = re.search(rf'iat_source_label_updates_total{{outcome="{outcome}"}} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_label_is_unknown_to_a_request_before_it_arrived_and_known_after(stack):
    source, ranking, user, mine, ids = stack
    arrival = mine[0]["timestamp_ms"] + 5_000
    late = max(r["timestamp_ms"] for r in mine) + 1
    assert history_labels(ranking, user, late)[ids[0]] == {}
    response = post_labels(source, {"user_id": user, "ins_id": ids[0], "labels": {"like": 1}, "arrival_ms": arrival})
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == 1 and response.json()["results"][0]["labels"] == {"like": "stored"}
    if late > arrival:  # a request after the arrival sees it...
        assert history_labels(ranking, user, late)[ids[0]] == {"like": 1}
    # ...one at the arrival or before does not: "a label that arrived after T is unknown at T"
    assert history_labels(ranking, user, arrival)[ids[0]] == {}
    assert history_labels(ranking, user, arrival + 1)[ids[0]] == {"like": 1}


def test_the_same_update_twice_stores_once(stack):
    source, ranking, user, mine, ids = stack
    update = {"user_id": user, "ins_id": ids[1], "labels": {"love": 0}, "arrival_ms": mine[1]["timestamp_ms"] + 10}
    first, second = post_labels(source, update).json(), post_labels(source, update).json()
    assert first["stored"] == 1 and second["stored"] == 0
    assert second["results"][0]["labels"] == {"love": "duplicate"}
    conflict = post_labels(source, {**update, "labels": {"love": 1}, "arrival_ms": update["arrival_ms"] + 5}).json()
    assert conflict["refused"] == 1 and conflict["results"][0]["labels"] == {"love": "conflict"}
    assert history_labels(ranking, user, update["arrival_ms"] + 1_000_000)[ids[1]] == {"love": 0}  # first wins


def test_an_update_after_the_window_is_refused_and_counted(stack):
    source, ranking, user, mine, ids = stack
    before = metric(source, "window_closed")
    closed = mine[2]["timestamp_ms"] + WINDOW_S * 1000 + 1
    body = post_labels(source, {"user_id": user, "ins_id": ids[2], "labels": {"like": 1}, "arrival_ms": closed},
                       {"user_id": user, "ins_id": "12345", "labels": {"like": 1}, "arrival_ms": closed}).json()
    assert [r["labels"] for r in body["results"]] == [{"like": "window_closed"}, {"like": "unknown"}]
    assert body["refused"] == 1 and body["unknown"] == 1 and body["stored"] == 0
    assert metric(source, "window_closed") == before + 1
    assert history_labels(ranking, user, closed + 1)[ids[2]] == {}


def test_a_bad_batch_stores_nothing_and_names_the_field(stack):
    source, ranking, user, mine, ids = stack
    good = {"user_id": user, "ins_id": ids[3], "labels": {"like": 1}, "arrival_ms": mine[3]["timestamp_ms"] + 1}
    for bad, field in (({**good, "labels": {"watch": 1}}, "updates[1].labels[watch]"),
                       ({**good, "labels": {"like": 2}}, "updates[1].labels"),
                       ({**good, "ins_id": "-3"}, "updates[1].ins_id"),
                       ({**good, "arrival_ms": -1}, "updates[1].arrival_ms")):
        response = post_labels(source, good, bad)
        assert response.status_code == 422, response.text
        assert field in response.text
    assert history_labels(ranking, user, good["arrival_ms"] + 1_000_000)[ids[3]] == {}


def history_cache_lookups(ranking) -> dict[str, float]:
    text = httpx.get(ranking.base_url + "/metrics", timeout=30).text
    return {outcome: float(m.group(1)) if (m := re.search(
        rf'iat_ranking_history_cache_lookups_total{{outcome="{outcome}"}} ([0-9.e+]+)', text)) else 0.0
        for outcome in ("hit", "miss")}


def test_a_score_after_a_label_arrived_does_not_reuse_the_history_read_before_it(stack):
    """The ranking service's history cache keys on the labels as of the read's bound: the same
    stored records read just before and just after a label arrived are two histories."""
    source, ranking, user, mine, ids = stack
    arrival = max(r["timestamp_ms"] for r in mine) + 10_000  # after every instance: all 4 are history
    response = post_labels(source, {"user_id": user, "ins_id": ids[2], "labels": {"love": 1}, "arrival_ms": arrival})
    assert response.status_code == 200, response.text

    def score(request_time_ms: int) -> tuple[list[float], int]:
        body = {"request_id": "r", "user_id": user, "model": "iat", "request_time_ms": request_time_ms,
                "candidates": [{"item_id": r["item_id"]} for r in mine]}
        answer = httpx.post(ranking.base_url + "/v1/score", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["scores"], answer.json()["history_length"]

    start = history_cache_lookups(ranking)
    score(arrival)                                    # label unknown at T = arrival
    at_arrival = history_cache_lookups(ranking)
    assert score(arrival)[1] == 4                     # the same history again: a hit
    again = history_cache_lookups(ranking)
    score(arrival + 1)                                # the same records, the label now known: a miss
    after = history_cache_lookups(ranking)
    assert at_arrival["miss"] == start["miss"] + 1
    assert again["hit"] == at_arrival["hit"] + 1 and again["miss"] == at_arrival["miss"]
    assert after["miss"] == again["miss"] + 1 and after["hit"] == again["hit"]
    assert history_labels(ranking, user, arrival + 1)[ids[2]].get("love") == 1
