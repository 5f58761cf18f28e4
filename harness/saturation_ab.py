"""gRPC throughput at saturation of two checkouts side by side, in alternating slices.

Another checkout's ``iat serve ranking`` (``--base``, e.g. ``git worktree add /tmp/base HEAD~1``)
and this one's serve the same model directory on one embedded Redis; each is driven at
``--concurrency`` requests in flight for ``--slice-s`` seconds in turn (base, this, this, base,
...), so that each pair of slices compares the two a few seconds apart: this machine's speed
drifts by up to 30% from one minute to the next. Ratio = this / base per pair; the median is
the figure. Usage (from this checkout's root):

    python -m harness.saturation_ab --base /tmp/base --model-dir <bench model dir> \\
        --candidates 100 --concurrency 16 --slices 8 --slice-s 3
"""
from __future__ import annotations

import argparse
import itertools
import sys
import threading
from pathlib import Path

import numpy as np

from harness.bench_ranking import REQUEST_TIME_MS, MovieLensWorkload, default_data_dir, saturate, seed_histories, to_proto
from harness.processes import ServiceProcess, free_port
from harness.reporting import command_line, emit

HERE = Path(__file__).resolve().parents[1]


def _serve(checkout: Path, model_dir: Path, redis_url: str, workers: int, log: Path) -> tuple[ServiceProcess, int]:
    """``checkout``'s ranking service (its own packages: run from there, on its PYTHONPATH)."""
    grpc_port = free_port()
    # absolute: the other checkout's process runs from there
    env = {"REDIS_URL": redis_url, "IAT_MODEL_DIR": str(model_dir.resolve()), "IAT_RELOAD_INTERVAL_S": "0",
           "IAT_RUNTIME": "torchscript", "IAT_API_TOKEN": "", "IAT_RANKING_WORKERS": str(workers),
           "PYTHONPATH": str(checkout)}
    args = ["serve", "ranking", "--host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    return ServiceProcess(args, log_path=log, env=env, cwd=checkout), grpc_port


def _caller(grpc_port: int, message, concurrency: int):
    """A call for ``saturate``: each of its threads keeps one channel (one connection) of its own."""
    import grpc
    from iat.ranking.v1 import ranking_pb2_grpc

    stubs = [ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(
        f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])) for _ in range(concurrency)]
    for stub in stubs:
        stub.Score(message, timeout=60)
    local, pick, lock = threading.local(), itertools.cycle(stubs), threading.Lock()

    def call() -> None:
        if not hasattr(local, "stub"):
            with lock:
                local.stub = next(pick)
        local.stub.Score(message, timeout=60)
    return call


def run(args: argparse.Namespace) -> dict:
    from services.config import Settings
    from storage.connection import EmbeddedRedis

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis(work / "redis").start()
    procs = []
    try:
        user = seed_histories(args.model_dir, redis.url, [args.history], Settings(redis_url=redis.url))[args.history]
        for name, checkout in (("base", args.base), ("this", HERE)):
            procs.append((name, *_serve(checkout.resolve(), args.model_dir, redis.url, args.workers, work / f"{name}.log")))
        for _, proc, _ in procs:
            proc.wait(timeout_s=240)
        workload = MovieLensWorkload(args.data_dir or default_data_dir())
        message = to_proto(workload.request(user, REQUEST_TIME_MS, args.candidates, np.random.default_rng(0),
                                            context_user=workload.user_ids[0]))
        calls = {name: _caller(grpc_port, message, args.concurrency) for name, _, grpc_port in procs}
        for call in calls.values():
            saturate(call, args.concurrency, 2.0)  # warm
        rps: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(args.slices):
            for name in (("base", "this") if i % 2 == 0 else ("this", "base")):
                rps[name].append(saturate(calls[name], args.concurrency, args.slice_s)["rps"])
    finally:
        for _, proc, _ in procs:
            proc.stop()
        redis.stop()
    ratios = [t / b for t, b in zip(rps["this"], rps["base"])]
    return {"candidates": args.candidates, "history": args.history, "concurrency": args.concurrency,
            "workers": args.workers, "slice_s": args.slice_s, "base": str(args.base), "rps": rps,
            "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def summary(result: dict) -> str:
    return (f"C={result['candidates']} n={result['history']}, {result['concurrency']} in flight, "
            f"{result['workers']} worker(s): base req/s {[round(x) for x in result['rps']['base']]}, "
            f"this {[round(x) for x in result['rps']['this']]}; this / base median {result['ratio_median']:.3f} "
            f"(pairs {result['ratio_min']:.2f}-{result['ratio_max']:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout")
    parser.add_argument("--model-dir", type=Path, required=True, help="served by both (a bench model dir)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--history", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--slice-s", type=float, default=3.0)
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K dir")
    parser.add_argument("--work-dir", type=Path, default=Path("loadtests/out/saturation-ab"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    return emit({"command": command_line("saturation_ab", "harness.saturation_ab"), **run(args)}, args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
