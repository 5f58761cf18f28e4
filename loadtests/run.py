"""`make loadtest`: the three services on loopback, seeded with real users, under Locust for a
bounded time; Locust's CSVs and a summary under ``loadtests/out/``.

    python -m loadtests.run --duration 60s --users 8 --spawn-rate 4

Steps: an embedded redis-server (unix socket); ``iat serve sequencer|source|ranking`` on free
loopback ports; the first ``--max-users`` MovieLens users (sorted ids) replayed through the source
service in time order (the sequencer builds their sequences); then ``locust --headless`` with
``loadtests/locustfile.py`` (gRPC, REST and ingest users at once) against them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

from harness.bench_ranking import (
    MovieLensWorkload,
    build_bench_models,
    default_data_dir,
    default_quick_models,
)
from harness.machine import MachineSampler, machine_markdown
from harness.processes import ServiceProcess, free_port


def start_service(kind: str, env: dict, log_dir: Path, extra: list[str] = ()) -> ServiceProcess:
    """``iat serve <kind>`` on loopback, waited on until /readyz answers."""
    return ServiceProcess(["serve", kind, "--host", "127.0.0.1", *extra], log_path=log_dir / f"{kind}.log",
                          env=env).wait("/readyz", timeout_s=90)


def seed(source_url: str, redis_url: str, instances: list[dict], batch: int = 512) -> float:
    """Replay through the source service; wait until the sequencer has caught up. Seconds taken."""
    from harness.sequencing import service_stream, wait_sequenced
    from storage.connection import connect

    start = time.perf_counter()
    with httpx.Client(base_url=source_url, timeout=300) as client:
        for k in range(0, len(instances), batch):
            response = client.post("/v1/instances", json={"instances": instances[k:k + batch]})
            response.raise_for_status()
    redis = connect(redis_url)
    wait_sequenced(service_stream(redis), timeout_s=300, poll_s=0.1)  # every partition
    redis.close()
    return time.perf_counter() - start


def read_stats(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a Prometheus histogram (cumulative (upper bound, count) pairs, +Inf
    last), linear within the bucket it falls in (as PromQL's histogram_quantile)."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def history_cache_figures(metrics_text: str) -> dict:
    """The ranking service's history-cache lookups (hit / miss) and its Score latency (in the
    service, stage 'total') p50 by outcome, from its /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    lookups: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "iat_ranking_history_cache_lookups_total":
                lookups[sample.labels["outcome"]] = sample.value
            elif sample.name == "iat_ranking_score_by_history_cache_seconds_bucket":
                buckets.setdefault(sample.labels["outcome"], []).append((float(sample.labels["le"]), sample.value))
    hits, misses = lookups.get("hit", 0.0), lookups.get("miss", 0.0)
    out = {"hits": int(hits), "misses": int(misses),
           "hit_rate": hits / (hits + misses) if hits + misses else None}
    for outcome, pairs in buckets.items():
        pairs.sort()
        p50 = _quantile(pairs, 0.5)
        out[f"{outcome}_requests"] = int(pairs[-1][1])
        out[f"{outcome}_p50_ms"] = None if p50 is None else 1e3 * p50
    return out


def history_cache_markdown(figures: dict) -> str:
    if figures.get("hit_rate") is None:
        return "History cache: no lookups."

    def p50(outcome: str) -> str:
        v = figures.get(f"{outcome}_p50_ms")
        return "-" if v is None else f"{v:.1f} ms ({figures.get(outcome + '_requests', 0)} Scores)"

    return (f"History cache (ranking /metrics after the run): {figures['hits']} hits, {figures['misses']} misses, "
            f"hit rate {figures['hit_rate']:.1%}; Score p50 in the service (stage total, from "
            f"`iat_ranking_score_by_history_cache_seconds`, x1.25 buckets, interpolated): hit {p50('hit')}, "
            f"miss {p50('miss')}, no lookup {p50('none')}.")


def summary_markdown(stats: list[dict], meta: dict) -> str:
    run = (f"until {meta['until_requests']} answers of each kind (deadline {meta['duration']})"
           if meta.get("until_requests") else meta["duration"])
    machine = (" " + machine_markdown(meta["machine"])) if meta.get("machine") else ""
    lines = [f"Locust {run} headless, {meta['users']} users (Locust class weights gRPC:REST:ingest = 3:1:1), "
             f"{meta['max_users']} seeded MovieLens users, {meta['candidates']} candidates, model {meta['model']}; "
             f"{meta['cpus']} CPUs shared by Locust, Redis and the three services.{machine}", "",
             "| type | name | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for row in stats:
        lines.append(f"| {row['Type'] or ''} | {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
                     f"{float(row['Requests/s']):.1f} | {row['50%']} | {row['95%']} | {row['99%']} |")
    if meta.get("history_cache"):
        lines += ["", history_cache_markdown(meta["history_cache"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="60s", help="run time; with --until-requests, the deadline")
    parser.add_argument("--until-requests", type=int, default=0,
                        help="stop once gRPC Score, REST score and ingest each have this many successful "
                             "answers (0: run for --duration); not reaching it by --duration fails the run (exit 3)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--max-users", type=int, default=150, help="MovieLens users seeded and requested")
    parser.add_argument("--candidates", default="100,500")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: serving-size models (L=256) built "
                        "beside --quick-models' source model")
    parser.add_argument("--quick-models", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("loadtests/out"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per service")
    args = parser.parse_args(argv)

    from storage.connection import EmbeddedRedis

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = default_data_dir()
    model_dir = args.model_dir or build_bench_models(args.quick_models or default_quick_models(), out / "bench-score" / "models")
    work = MovieLensWorkload(data_dir)
    users = set(work.user_ids[:args.max_users])
    instances = [i for i in work.instances if i["user_id"] in users]
    redis = EmbeddedRedis(directory=(out / "redis").resolve()).start()
    env = {"REDIS_URL": redis.url, "IAT_MODEL_DIR": str(model_dir), "IAT_API_TOKEN": "", "IAT_RELOAD_INTERVAL_S": "0",
           "OMP_NUM_THREADS": str(args.threads)}
    services: list[ServiceProcess] = []
    try:
        services.append(start_service("sequencer", env, out))
        source = start_service("source", env, out)
        services.append(source)
        grpc_port = free_port()
        ranking = start_service("ranking", env, out, ["--grpc-port", str(grpc_port)])
        services.append(ranking)
        seconds = seed(source.base_url, redis.url, instances)
        print(f"seeded {len(instances)} instances of {len(users)} users in {seconds:.1f}s", flush=True)
        prefix = out / "locust"
        locust_env = {**os.environ, "IAT_GRPC_TARGET": f"127.0.0.1:{grpc_port}", "IAT_SOURCE_URL": source.base_url,
                      "IAT_LOADTEST_MAX_USERS": str(args.max_users), "IAT_LOADTEST_CANDIDATES": args.candidates,
                      "IAT_DATA_DIR": str(data_dir.parent), "IAT_LOADTEST_UNTIL_REQUESTS": str(args.until_requests)}
        locust_env.pop("IAT_API_TOKEN", None)
        cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
               "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration, "--host", ranking.base_url,
               "--csv", str(prefix), "--only-summary", "--stop-timeout", "10"]
        print(" ".join(cmd), flush=True)
        with MachineSampler() as machine:
            rc = subprocess.call(cmd, env=locust_env)
        if rc not in (0, 1):  # 1: some requests failed (reported in the CSVs); 3: --until-requests not met
            return rc
        ranking_metrics = httpx.get(ranking.base_url + "/metrics", timeout=30).text
        (out / "ranking-metrics.txt").write_text(ranking_metrics)  # the whole exposition, for later reading
        cache = history_cache_figures(ranking_metrics)
    finally:
        for s in reversed(services):
            s.stop()
        redis.stop()
    manifest = json.loads(next((Path(model_dir) / "iat").glob("*/manifest.json")).read_text())
    meta = {"duration": args.duration, "until_requests": args.until_requests, "users": args.users, "spawn_rate": args.spawn_rate, "max_users": args.max_users,
            "candidates": args.candidates.replace(",", "-"), "cpus": os.cpu_count(), "python": platform.python_version(),
            "model": f"iat L={manifest['max_history']} ({manifest['training']['dataset']})",
            "command": "python -m loadtests.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "locust_command": " ".join(cmd), "machine": machine.summary(), "history_cache": cache}
    stats = read_stats(Path(f"{prefix}_stats.csv"))
    text = summary_markdown(stats, meta)
    (out / "locust-summary.md").write_text(text + "\n")
    (out / "locust-summary.json").write_text(json.dumps({"meta": meta, "stats": stats}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
