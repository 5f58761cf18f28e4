"""Smoke tests of the load tests and benchmarks: the locustfile's users build valid requests,
`iat bench score` / `iat bench ingest` run end to end on tiny settings and write their JSON, and
the report renders its section of RESULTS.md. The benchmarks themselves run under `make bench`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.ranking.protocol import (
    ScoreRequestModel,
    query_from_model,
    query_from_proto,
    validate_query,
)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # loadtests/ is not an installed package
    sys.path.insert(0, str(REPO))
IAT = [sys.executable, "-c", "from cli import main; raise SystemExit(main())"]

# Locust monkey-patches the whole process with gevent on import: the locustfile is exercised in a
# child process, which prints the requests its users built.
LOCUST_PROBE = r"""
import json, sys
sys.path.insert(0, "loadtests")
import locustfile
from locust.env import Environment
from google.protobuf.json_format import MessageToDict
env = Environment(user_classes=[locustfile.GrpcScoreUser, locustfile.RestScoreUser, locustfile.IngestUser],
                  host="http://ranking.example:8000")
for user_class in env.user_classes:  # what Locust's runner does with --host when it starts
    user_class.host = env.host
grpc_user = locustfile.GrpcScoreUser(env)
rest_user = locustfile.RestScoreUser(env)
rest_user.on_start()
ingest_user = locustfile.IngestUser(env)
print(json.dumps({
    "grpc_target": grpc_user.target,
    "source_url": ingest_user.client.base_url,
    "grpc": [m.SerializeToString().hex() for m, _ in grpc_user.requests[:8]],
    "rest": [next(rest_user._next) for _ in range(8)],
    "ingest": [next(ingest_user._instances) for _ in range(4)],
    "users": len(locustfile.workload().user_ids),
}))
"""


def _data_dir(movielens_models) -> Path:
    return Path(movielens_models.data_dir)


@pytest.fixture(scope="module")
def locust_probe(movielens_models):
    env = {**os.environ, "IAT_DATA_DIR": str(_data_dir(movielens_models).parent), "IAT_LOADTEST_MAX_USERS": "20"}
    env.pop("IAT_GRPC_TARGET", None)
    env.pop("IAT_SOURCE_URL", None)
    done = subprocess.run([sys.executable, "-c", LOCUST_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_locust_targets_derive_from_the_host(locust_probe):
    assert locust_probe["grpc_target"] == "ranking.example:50051"
    assert locust_probe["source_url"] == "http://ranking.example:8001"
    assert locust_probe["users"] == 20


def test_locust_users_build_valid_score_requests(locust_probe, movielens_models):
    from iat.ranking.v1 import ranking_pb2

    from models.runtime.featurizer import FeatureSpec, Featurizer
    from models.runtime.loader import latest_version

    manifest = json.loads((latest_version(movielens_models.model_dir, "iat") / "manifest.json").read_text())
    featurizer = Featurizer(FeatureSpec.from_json(manifest["schema"]))
    queries = [query_from_model(ScoreRequestModel(**body)) for body in locust_probe["rest"]]
    queries += [query_from_proto(ranking_pb2.ScoreRequest.FromString(bytes.fromhex(h))) for h in locust_probe["grpc"]]
    history_users = set()
    for q in queries:
        validate_query(q, max_candidates=2000)  # raises on anything the service would reject
        assert 100 <= q.num_candidates <= 500
        assert all(f.categorical for f in q.candidate_features), "real items carry their features"
        featurizer.encode(q.user_id, q.request_time_ms, q.item_ids, q.context.categorical, q.context.numeric,
                          [f.categorical for f in q.candidate_features], [f.numeric for f in q.candidate_features])
        history_users.add(q.user_id)
    assert len(history_users) > 3, "requests spread over users"


def test_locust_ingest_user_posts_valid_instances(locust_probe, movielens_models):
    from services.source.protocol import IngestRequest

    request = IngestRequest(instances=locust_probe["ingest"])
    assert len(request.instances) == 4
    assert all(i.labels for i in request.instances)


@pytest.fixture(scope="module")
def bench_outputs(movielens_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "IAT_DATA_DIR": str(_data_dir(movielens_models).parent), "IAT_API_TOKEN": ""}
    score_cmd = IAT + ["bench", "score", "--quick-models", str(movielens_models.model_dir), "--work-dir", str(root / "score"),
                       "--history-len", "64", "--candidates", "3,7", "--history", "0,4,80", "--budget", "0.05",
                       "--min-reps", "2", "--max-reps", "3", "--warmup", "1", "--saturation-s", "0.3",
                       "--concurrency", "2", "--workers", "1,2",
                       "--json", str(root / "score.json"), "--profile", str(root / "profile.txt")]
    done = subprocess.run(score_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ingest_cmd = IAT + ["bench", "ingest", "--model-dir", str(movielens_models.model_dir), "--work-dir", str(root / "ingest"),
                        "--batch-sizes", "1,4", "--instances", "8", "--seconds", "2", "--concurrency", "2",
                        "--json", str(root / "ingest.json")]
    done = subprocess.run(ingest_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return root


def test_bench_score_writes_every_cell_method_and_ratio(bench_outputs):
    result = json.loads((bench_outputs / "score.json").read_text())
    cells = {(r["candidates"], r["history"], r["method"]): r for r in result["rows"]}
    for c in (3, 7):
        for n in (0, 4, 80):
            for method in ("fetch", "assemble", "model", "inproc", "grpc", "rest"):
                row = cells[(c, n, method)]
                assert 0 < row["p50_ms"] <= row["p99_ms"], row
    assert result["model"]["max_history"] == 64  # n = 80 is capped at L (the gRPC call checks it)
    assert {(t["candidates"], t["history"], t["protocol"]) for t in result["throughput"]} == {
        (c, n, p) for c in (3, 7) for n in (0, 4, 80) for p in ("grpc", "rest")}
    assert all(t["errors"] == 0 and t["completed"] > 0 for t in result["throughput"])
    assert len(result["ratios"]) == 6 and all(r["grpc_over_floor_p50"] > 0 for r in result["ratios"])
    assert result["profile"]["calls"] >= 20 and (bench_outputs / "profile.txt").stat().st_size > 0
    # --workers 1,2: each count at saturation at the largest n, the forward timed around each run
    scaling = {(r["workers"], r["candidates"]): r for r in result["scaling"]}
    assert set(scaling) == {(w, c) for w in (1, 2) for c in (3, 7)}
    for (workers, _), row in scaling.items():
        assert row["history"] == 80 and row["errors"] == 0 and row["workers_answering"] == workers, row
        assert all(ms > 0 for ms in row["forward_before_after_ms"]) and row["ceiling_rps"] > 0, row
        assert row["server_cpus"] > 0 and row["load_generator_cpus"] > 0 and row["redis_cpus"] >= 0, row


def test_bench_ingest_writes_rates_and_shares(bench_outputs):
    result = json.loads((bench_outputs / "ingest.json").read_text())
    rows = {(r["mode"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in ("direct", "asgi", "http") for b in (1, 4)}
    for (mode, _), row in rows.items():
        assert row["instances"] > 0 and row["instances_per_s"] > 0
        if mode != "http":
            shares = [row[k] for k in ("share_model", "share_store", "share_featurize", "share_framework")]
            assert all(s >= 0 for s in shares) and sum(shares) == pytest.approx(1.0, abs=0.02)
            assert row["share_model"] > 0


def test_report_renders_and_replaces_only_its_section(bench_outputs, tmp_path):
    from loadtests.report import END, START, render, write_section

    score = json.loads((bench_outputs / "score.json").read_text())
    ingest = json.loads((bench_outputs / "ingest.json").read_text())
    def one(p50):
        return [{"user": "bench-h4", "length": 4, "p50_ms": p50, "p95_ms": 0.3, "p99_ms": 0.4}]

    # three rounds: Feast / ours 10x, 8x, 12x -> the median of the rounds' ratios, 10x, and their range
    fetch = {"rounds": [{"ours": one(0.2), "feast": one(2.0)}, {"ours": one(0.25), "feast": one(2.0)},
                        {"ours": one(0.1), "feast": one(1.2)}], "feast": "x"}
    results = {"meta": {"command": "python -m loadtests.report", "date": "today", "cpus": 2, "python": "3.11"},
               "score": score, "ingest": ingest, "fetch": fetch}
    section = render(results)
    assert section.startswith(START) and section.endswith(END)
    assert "grpc p50 / p95 / p99 ms" in section and "Throughput at saturation" in section
    assert "| bench-h4 | 4 | 3 | 0.20 | 2.00 | 10.0x | 8.0-12.0x |" in section  # Feast / ours per round
    assert "Profile of one Score" in section and "| direct | 1 |" in section
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\n## Store reads\n\nkeep me\n")
    write_section(results_md, section)
    write_section(results_md, section.replace("today", "tomorrow"))
    text = results_md.read_text()
    assert "keep me" in text and text.count(START) == 1 and "tomorrow" in text and "(today)" not in text


@pytest.mark.slow
@pytest.mark.timeout(900)  # the subprocess's own deadline is 540 s; the session's models may be trained first
def test_make_loadtest_runs_locust_headless_and_writes_csvs(movielens_models, tmp_path):
    """Locust runs until every kind of request has answered a few times, not for a fixed time: a
    fixed 6 s (later 60 s) run on a loaded machine ended before any Score had answered. The
    duration is only a deadline, generous."""
    env = {**os.environ, "IAT_DATA_DIR": str(_data_dir(movielens_models).parent)}
    wanted = 5
    cmd = [sys.executable, "-m", "loadtests.run", "--quick-models", str(movielens_models.model_dir), "--out", str(tmp_path),
           "--until-requests", str(wanted), "--duration", "300s", "--users", "3", "--spawn-rate", "3",
           "--max-users", "5"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "locust-summary.json").read_text())
    answered: dict[str, int] = {}
    for row in summary["stats"]:
        kind = row["Name"].split(" ", 1)[0]
        answered[kind] = answered.get(kind, 0) + int(row["Request Count"]) - int(row["Failure Count"])
    for kind in ("Score", "/v1/score", "/v1/instances"):
        assert answered.get(kind, 0) >= wanted, (kind, answered)
    total = next(r for r in summary["stats"] if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    cache = summary["meta"]["history_cache"]  # read from the ranking service's /metrics
    assert cache["hits"] + cache["misses"] >= wanted and 0 <= cache["hit_rate"] <= 1
    # the Scores read the histories the seeding wrote through the source service (not all empty)
    from prometheus_client.parser import text_string_to_metric_families
    lengths = {s.name: s.value for f in text_string_to_metric_families((tmp_path / "ranking-metrics.txt").read_text())
               for s in f.samples if s.name.startswith("iat_ranking_history_length")}
    assert lengths["iat_ranking_history_length_sum"] > 0, lengths


def test_bench_models_read_what_the_quick_source_writes(movielens_models, tmp_path):
    """The serving-size bench model accepts the records of the quick export's source model (its
    lineage), as the quick ranking model does: the load test seeds through the source service."""
    from contract.artifacts import Manifest, read_json
    from harness.bench_ranking import build_bench_models
    from models.runtime.loader import latest_version

    built = build_bench_models(movielens_models.model_dir, tmp_path / "bench", history_len=64)
    quick = Manifest.model_validate(read_json(latest_version(movielens_models.model_dir, "iat") / "manifest.json", "m"))
    bench = Manifest.model_validate(read_json(latest_version(built, "iat") / "manifest.json", "m"))
    assert bench.accepted_sources() == quick.accepted_sources()


def test_history_cache_figures_read_the_rate_and_p50_by_outcome():
    """From a real prometheus_client exposition: the hit rate, and each outcome's p50 from the
    fine buckets within one bucket's width (x1.25) of the true median."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from loadtests.run import history_cache_figures
    from services import metrics

    registry = CollectorRegistry()
    lookups = Counter("iat_ranking_history_cache_lookups_total", "", ["outcome"], registry=registry)
    latency = Histogram("iat_ranking_score_by_history_cache_seconds", "", ["outcome"], registry=registry,
                        buckets=metrics.SCORE_BY_HISTORY_CACHE._upper_bounds[:-1])
    lookups.labels("hit").inc(30)
    lookups.labels("miss").inc(10)
    for k in range(30):
        latency.labels("hit").observe(0.010 + 0.0002 * k)   # median 12.9 ms
    for k in range(10):
        latency.labels("miss").observe(0.040 + 0.001 * k)   # median 44.5 ms
    figures = history_cache_figures(generate_latest(registry).decode())
    assert (figures["hits"], figures["misses"]) == (30, 10) and figures["hit_rate"] == 0.75
    assert figures["hit_requests"] == 30 and figures["miss_requests"] == 10
    assert 12.9 / 1.25 <= figures["hit_p50_ms"] <= 12.9 * 1.25
    assert 44.5 / 1.25 <= figures["miss_p50_ms"] <= 44.5 * 1.25


@pytest.mark.slow  # a benchmark harness end to end (make test runs it)
def test_the_naive_peer_runs_its_whole_forward(movielens_models, redis_server, tmp_path):
    """The naive peer re-encodes the history per candidate: its model must not take the served
    model's user/candidate halves (it did, silently, once those existed)."""
    from harness.bench_ranking import build_bench_models
    from harness.peers.naive_server import create_app

    app = create_app(build_bench_models(movielens_models.model_dir, tmp_path / "models", history_len=64), redis_server)
    model = app.state.model
    assert model.runtime == "torchscript-naive" and not model.reuses_user_state


@pytest.mark.slow  # a benchmark harness end to end (make test runs it)
def test_bench_floor_writes_flops_floor_and_per_round_ratios(movielens_models, tmp_path):
    """`iat bench floor` (run by `make bench`): FLOPs of the served and the naive model, the
    attainable GEMM rate, and forward / floor as the median of its rounds."""
    from harness.bench_ranking import build_bench_models

    models = build_bench_models(movielens_models.model_dir, tmp_path / "models", history_len=64)
    out = tmp_path / "floor.json"
    cmd = IAT + ["bench", "floor", "--model-dir", str(models), "--candidates", "3,9", "--history", "20",
                 "--budget", "0.05", "--gemm-budget", "0.02", "--rounds", "3", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["candidates"] for r in rows] == [3, 9]
    for r in rows:
        assert r["naive_flops"] > r["flops"] > 0 and r["attainable_gflops"] > 0
        assert len(r["forward_over_floor_rounds"]) == 3
        assert r["forward_over_floor"] == sorted(r["forward_over_floor_rounds"])[1]


def test_saturation_accounts_for_the_service_the_load_generator_redis_and_idle(redis_server, redis_client):
    """`iat bench score --workers`: where the machine's CPUs went during a saturation run."""
    from harness.bench_ranking import _cpu_accounts, _cpus_cells, _local_redis_pid

    redis_pid = _local_redis_pid(redis_server)
    assert redis_pid == int(redis_client.info("server")["process_id"])
    service = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"])
    try:
        before = _cpu_accounts(service.pid, redis_pid)
        redis_client.eval("local i = 0 while i < 30000000 do i = i + 1 end return i", 0)  # Redis busy
        spin = time.thread_time() + 0.3
        while time.thread_time() < spin:  # this process (the load generator) busy
            pass
        deadline = time.monotonic() + 60  # a loaded machine may give the service little CPU: wait for it
        while _cpu_accounts(service.pid, redis_pid)["service"] - before["service"] < 0.05 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = _cpu_accounts(service.pid, redis_pid)
    finally:
        service.kill()
        service.wait()
    spent = {k: after[k] - before[k] for k in after}
    assert spent["redis"] >= 0.05 and spent["load_generator"] >= 0.25 and spent["service"] >= 0.05, spent
    assert spent["idle"] >= 0.0
    assert _cpus_cells({"load_generator_cpus": 0.14, "redis_cpus": None, "idle_cpus": 0.2,
                        "share_of_ceiling_left": 0.7}) == "0.14 | - | 0.20 | 70% |"
