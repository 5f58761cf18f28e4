"""Soak: concurrent ingest and scoring against real processes for a long time (`make soak`).

Starts a redis-server, `iat serve sequencer|source|ranking` on loopback, then for ``--duration``
seconds replays MovieLens instances through POST /v1/instances at ``--ingest-rate`` instances/s
(cycling through the data with fresh request ids and shifted timestamps, so sequences keep
growing and get trimmed) while ``--score-threads`` clients call gRPC Score at ``--score-rate``
requests/s in all for users already ingested. Every ``--sample-s`` it records the RSS of each
service process and of Redis, the stream lag, and the errors and Score latencies of that window.

Pass: no errors, RSS growth of each service from the first sample after warm-up to the end
within ``--max-rss-growth-mb``, stream lag at most ``--max-lag``. Writes a JSON of every sample
(``--out``) and prints a Markdown table. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from harness.processes import ServiceProcess, ensure_quick_models, free_port
from harness.sequencing import service_stream
from models.data.raw import raw_instances
from models.data.schema import load_schema
from services.config import Settings
from storage.connection import EmbeddedRedis, connect

USER_SIDE = ("age", "gender", "occupation", "zip_code")
DAY_MS = 86_400_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Service(ServiceProcess):
    """``iat serve <name>`` for the soak, named for its RSS column."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path) -> None:
        self.name = name
        super().__init__(["serve", name, *args], log_path=log_dir / f"{name}.log", env=env)
        self.url = self.base_url

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        self.wait("/readyz", timeout_s)


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.score_ms: list[float] = []
        self.score_errors: dict[str, int] = {}
        self.ingested = 0
        self.ingest_errors: dict[str, int] = {}
        self.ingest_ms: list[float] = []

    def take(self) -> dict:
        with self.lock:
            out = {"score_ms": self.score_ms, "ingest_ms": self.ingest_ms, "ingested": self.ingested}
            self.score_ms, self.ingest_ms = [], []
            return out


def cycled(instances: list[dict], cycle: int, span_ms: int) -> list[dict]:
    """Cycle ``cycle`` of the data: new request ids, timestamps moved past the previous cycle."""
    if cycle == 0:
        return instances
    shift = cycle * (span_ms + DAY_MS)
    return [{**i, "request_id": f"{i['request_id']}#c{cycle}", "timestamp_ms": i["timestamp_ms"] + shift}
            for i in instances]


def ingest_loop(url: str, instances: list[dict], rate: float, batch: int, stop: threading.Event,
                counters: Counters, scorable: list) -> None:
    span_ms = instances[-1]["timestamp_ms"] - instances[0]["timestamp_ms"]
    cycle, pos = 0, 0
    data = instances
    interval = batch / rate
    next_at = time.monotonic()
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            if pos >= len(data):
                cycle, pos = cycle + 1, 0
                data = cycled(instances, cycle, span_ms)
            chunk = data[pos:pos + batch]
            t0 = time.perf_counter()
            try:
                response = client.post(url + "/v1/instances", json={"instances": chunk})
                code = str(response.status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            elapsed = (time.perf_counter() - t0) * 1000
            with counters.lock:
                if code == "200":
                    counters.ingested += len(chunk)
                    counters.ingest_ms.append(elapsed)
                    scorable.append(chunk[-1])
                else:
                    counters.ingest_errors[code] = counters.ingest_errors.get(code, 0) + 1
            if code == "200":
                pos += batch
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))


def score_loop(target: str, rate: float, candidates: int, stop: threading.Event, counters: Counters,
               scorable: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    interval = 1.0 / rate
    next_at = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        while not stop.is_set():
            if not scorable:
                stop.wait(0.1)
                continue
            inst = scorable[int(rng.integers(len(scorable)))]
            cat = inst["features"]["categorical"]
            request = ranking_pb2.ScoreRequest(
                request_id="soak", user_id=inst["user_id"], request_time_ms=inst["timestamp_ms"] + 1, model="iat",
                context=ranking_pb2.Features(categorical={k: cat[k] for k in USER_SIDE if k in cat}),
                candidates=[ranking_pb2.Candidate(item_id=str(int(i))) for i in rng.integers(1, 1683, candidates)])
            t0 = time.perf_counter()
            try:
                stub.Score(request, timeout=2.0)
                with counters.lock:
                    counters.score_ms.append((time.perf_counter() - t0) * 1000)
            except grpc.RpcError as err:
                with counters.lock:
                    name = err.code().name
                    counters.score_errors[name] = counters.score_errors.get(name, 0) + 1
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS growth is measured from here")
    parser.add_argument("--ingest-rate", type=float, default=300.0, help="instances/s")
    parser.add_argument("--ingest-batch", type=int, default=50)
    parser.add_argument("--score-rate", type=float, default=40.0, help="Score requests/s, all threads")
    parser.add_argument("--score-threads", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--model-dir", type=Path, default=Settings().model_dir)
    parser.add_argument("--data-dir", type=Path,
                        default=Settings().movielens_dir)
    parser.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    parser.add_argument("--max-lag", type=int, default=5000, help="stream entries not yet sequenced")
    parser.add_argument("--out", type=Path, default=Path("artifacts/soak.json"))
    args = parser.parse_args(argv)

    ensure_quick_models(args.model_dir, args.data_dir)
    instances = raw_instances(load_schema("movielens-100k"), args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="iat-soak-"))
    redis_server = EmbeddedRedis(directory=work / "redis").start()
    client = connect(redis_server.url, cluster=False)
    grpc_port = free_port()
    env = {"REDIS_URL": redis_server.url, "IAT_MODEL_DIR": str(args.model_dir.resolve()), "IAT_RELOAD_INTERVAL_S": "0",
           "IAT_MODEL_THREADS": "1", "IAT_REDIS_TIMEOUT_S": "1.0"}
    services = [Service("sequencer", [], env, work), Service("source", [], env, work),
                Service("ranking", ["--grpc-port", str(grpc_port)], env, work)]
    stop = threading.Event()
    counters, scorable, samples = Counters(), [], []
    failed: list[str] = []
    try:
        for s in services:
            s.wait_ready()
        stream = service_stream(client)  # lag and pending summed over every partition
        threads = [threading.Thread(target=ingest_loop, args=(services[1].url, instances, args.ingest_rate,
                                                              args.ingest_batch, stop, counters, scorable))]
        threads += [threading.Thread(target=score_loop, args=(f"127.0.0.1:{grpc_port}", args.score_rate / args.score_threads,
                                                              args.candidates, stop, counters, scorable, k))
                    for k in range(args.score_threads)]
        for t in threads:
            t.start()
        start = time.monotonic()
        print(f"soak: {args.duration:.0f} s, ingest {args.ingest_rate:.0f}/s, Score {args.score_rate:.0f}/s "
              f"x {args.candidates} candidates; logs in {work}", flush=True)
        while time.monotonic() - start < args.duration:
            time.sleep(min(args.sample_s, max(0.0, args.duration - (time.monotonic() - start))))
            window = counters.take()
            scores = np.array(window["score_ms"]) if window["score_ms"] else np.array([np.nan])
            sample = {
                "t_s": round(time.monotonic() - start, 1),
                "rss_mb": {s.name: round(rss_mb(s.proc.pid), 1) for s in services},
                "redis_rss_mb": round(rss_mb(redis_server.process.pid), 1),
                "stream_lag": stream.lag(), "pending": stream.pending_count(),
                "ingested_total": window["ingested"], "scores": len(window["score_ms"]),
                "scores_per_s": round(len(window["score_ms"]) / args.sample_s, 1),
                "score_p50_ms": round(float(np.percentile(scores, 50)), 2),
                "score_p99_ms": round(float(np.percentile(scores, 99)), 2),
                "score_errors": dict(counters.score_errors), "ingest_errors": dict(counters.ingest_errors),
            }
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            for s in services:
                if s.proc.poll() is not None:
                    failed.append(f"{s.name} exited with {s.proc.returncode}")
            if failed:
                break
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        for s in services:
            s.stop()
        client.close()
        redis_server.stop()

    report = summarize(samples, args, failed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "samples": samples,
                                    "summary": report}, indent=1))
    print_table(samples, report)
    return 0 if report["passed"] else 1


def summarize(samples: list[dict], args, failed: list[str]) -> dict:
    if not samples:
        return {"passed": False, "failures": failed or ["no samples"]}
    last = samples[-1]
    base = next((s for s in samples if s["t_s"] >= args.warmup_s), samples[0])
    growth = {name: round(last["rss_mb"][name] - base["rss_mb"][name], 1) for name in last["rss_mb"]}
    max_lag = max(s["stream_lag"] for s in samples)
    failures = list(failed)
    if last["score_errors"] or last["ingest_errors"]:
        failures.append(f"errors: score {last['score_errors']}, ingest {last['ingest_errors']}")
    failures += [f"{n} RSS grew {g} MB" for n, g in growth.items() if g > args.max_rss_growth_mb]
    if max_lag > args.max_lag:
        failures.append(f"stream lag reached {max_lag}")
    return {"passed": not failures, "failures": failures, "rss_growth_mb_after_warmup": growth,
            "rss_from_t_s": base["t_s"], "max_stream_lag": max_lag,
            "instances_ingested": last["ingested_total"],
            "scores": sum(s["scores"] for s in samples)}


def print_table(samples: list[dict], report: dict) -> None:
    names = list(samples[0]["rss_mb"]) if samples else []
    print("\n| t (s) | " + " | ".join(f"{n} RSS (MB)" for n in names) +
          " | redis RSS (MB) | stream lag | Score/s | Score p50 (ms) | p99 (ms) | errors |")
    print("|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|---:|---:|")
    for s in samples:
        errors = sum(s["score_errors"].values()) + sum(s["ingest_errors"].values())
        print(f"| {s['t_s']:.0f} | " + " | ".join(f"{s['rss_mb'][n]:.0f}" for n in names) +
              f" | {s['redis_rss_mb']:.0f} | {s['stream_lag']} | {s['scores_per_s']:.1f} | {s['score_p50_ms']:.1f} |"
              f" {s['score_p99_ms']:.1f} | {errors} |")
    print("\n" + json.dumps(report, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
