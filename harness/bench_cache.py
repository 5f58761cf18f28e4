"""History-cache hit against miss: ``RankingServing.score`` in process, call by call.

    python -m harness.bench_cache --runtime eager --candidates 1,100,500 --history 256

The serving-size bench model of ``iat bench score`` (built from a quick export, or
``--model-dir``), one embedded Redis holding user ``bench-h<n>``'s n records. Two servings
share the loaded model and the Redis client: one with the history cache (``IAT_HISTORY_CACHE_MB``
as set; every timed call after the first is a hit, same user, same request), one with it off
(every call decodes and prepares the history and, where the runtime has the user-state half,
encodes it). Calls alternate hit, miss, hit, ... so that a noisy neighbour hits both alike;
both give the same scores (checked).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from harness.bench_ranking import (
    REQUEST_TIME_MS,
    MovieLensWorkload,
    build_bench_models,
    default_data_dir,
    default_quick_models,
    seed_histories,
    to_proto,
)
from services.allocator import keep_freed_memory
from services.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the bench model built from --quick-models")
    parser.add_argument("--quick-models", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=Path("loadtests/out/bench-cache"))
    parser.add_argument("--runtime", default="torchscript", choices=("torchscript", "eager", "aoti"))
    parser.add_argument("--candidates", default="1,100,500")
    parser.add_argument("--history", type=int, default=256)
    parser.add_argument("--reps", type=int, default=200, help="timed calls of each kind per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", dest="json_path", type=Path, default=None)


async def _measure(args, model_dir: Path, redis_url: str) -> list[dict]:
    from services.ranking.main import build_serving
    from services.ranking.protocol import query_from_proto
    from services.ranking.serving import RankingServing

    settings = Settings(redis_url=redis_url, model_dir=model_dir, runtime=args.runtime, reload_interval_s=0)
    users = seed_histories(model_dir, redis_url, [args.history], settings)
    hits = await build_serving(settings)
    misses = RankingServing(settings.model_copy(update={"history_cache_mb": 0.0}), hits.registry, hits.client)
    workload = MovieLensWorkload(args.data_dir)
    rng = np.random.default_rng(0)
    rows = []
    for c in (int(v) for v in args.candidates.split(",") if v):
        body = workload.request(users[args.history], REQUEST_TIME_MS, c, rng,
                                context_user=workload.user_ids[0], request_id=f"cache-{c}")
        query = query_from_proto(to_proto(body))
        a, b = await hits.score(query, None), await misses.score(query, None)
        assert np.abs(a.scores - b.scores).max() <= 1e-5, "a hit must score as a miss does"
        for _ in range(3):
            await hits.score(query, None)
            await misses.score(query, None)
        timings = {"hit": [], "miss": []}
        for _ in range(args.reps):
            for name, serving in (("hit", hits), ("miss", misses)):
                start = time.perf_counter()
                await serving.score(query, None)
                timings[name].append(time.perf_counter() - start)
        p50 = {k: float(np.median(v)) * 1e3 for k, v in timings.items()}
        rows.append({"candidates": c, "history": args.history, "runtime": args.runtime,
                     "hit_p50_ms": p50["hit"], "miss_p50_ms": p50["miss"], "miss_over_hit": p50["miss"] / p50["hit"],
                     "reuses_user_state": hits.registry.get("").reuses_user_state, "reps": args.reps})
        print(f"C={c:<4d} n={args.history} {args.runtime}: hit {p50['hit']:.2f} ms, miss {p50['miss']:.2f} ms "
              f"(miss / hit {p50['miss'] / p50['hit']:.2f}x)", flush=True)
    for serving in (hits, misses):
        serving.executor.shutdown(wait=False)
    await hits.client.aclose()
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from storage.connection import EmbeddedRedis

    torch.set_num_threads(args.threads)
    keep_freed_memory(Settings().malloc_keep_mb)  # as the ranking service does
    args.data_dir = default_data_dir()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or build_bench_models(args.quick_models or default_quick_models(), args.work_dir / "models")
    redis = EmbeddedRedis(directory=(args.work_dir / "redis").resolve()).start()
    try:
        rows = asyncio.run(_measure(args, model_dir, redis.url))
    finally:
        redis.stop()
    if args.json_path:
        args.json_path.write_text(json.dumps({"command": "python -m harness.bench_cache " + " ".join(sys.argv[1:]),
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m harness.bench_cache", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
