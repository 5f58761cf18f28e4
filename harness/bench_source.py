"""`iat bench ingest`: instances per second through the source service, and where the time goes.

    iat bench ingest --json ingest.json        # same as: python -m harness.bench_source ...

Real MovieLens instances (time order, a fresh slice per measurement) are ingested in batches of
B instances, for each B in ``--batch-sizes``, three ways:
  direct  ``Ingestor.ingest(batch)`` called back to back: no HTTP, no validation, no batcher
  asgi    POST /v1/instances into the service's FastAPI app in this process (httpx ASGI transport,
          ``--concurrency`` posts in flight): validation, the MicroBatcher, JSON in and out
  http    the same POSTs over loopback to a real ``iat serve source`` process
The share of time in the model, the store (history reads + record writes + stream entries),
featurization and the framework (everything else: HTTP, pydantic, batching, JSON) comes from
``Ingestor.timings`` of the in-process runs, against their wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import threading
import time
from pathlib import Path

from harness.processes import ServiceProcess
from harness.reporting import command_line, emit

BATCH_SIZES = (1, 64, 512)
PARTS = ("featurize", "history", "model", "store")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an export with a source model (default: $IAT_TEST_MODEL_DIR, else loadtests/out/models-quick)")
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K dir (default $IAT_DATA_DIR/movielens-100k)")
    parser.add_argument("--redis-url", default=None, help="default: a fresh embedded redis-server (unix socket)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--instances", type=int, default=4096, help="instances per (mode, batch size), at most")
    parser.add_argument("--seconds", type=float, default=5.0, help="time limit per (mode, batch size)")
    parser.add_argument("--concurrency", type=int, default=8, help="posts in flight (asgi, http)")
    parser.add_argument("--modes", default="direct,asgi,http")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the served process")
    parser.add_argument("--work-dir", type=Path, default=Path("loadtests/out/bench-ingest"))


def _timings_snapshot(t) -> dict:
    return {p: getattr(t, p) for p in PARTS} | {"instances": t.instances, "batches": t.batches}


def _shares(before: dict, after: dict, wall: float) -> dict:
    parts = {p: after[p] - before[p] for p in PARTS}
    out = {f"{p}_s": v for p, v in parts.items()}
    out.update({
        "share_model": parts["model"] / wall,
        "share_store": (parts["store"] + parts["history"]) / wall,
        "share_featurize": parts["featurize"] / wall,
        "share_framework": max(0.0, wall - sum(parts.values())) / wall,
        "model_batches": after["batches"] - before["batches"],
    })
    return out


def _chunks(instances: list[dict], size: int, limit: int) -> list[list[dict]]:
    n = min(len(instances), limit)
    n -= n % size if n >= size else 0
    return [instances[i:i + size] for i in range(0, max(n, size), size)]


async def _asgi(service, batches: list[list[dict]], concurrency: int, seconds: float) -> tuple[int, float]:
    import httpx

    app = service.app()
    transport = httpx.ASGITransport(app=app)
    done = 0
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        queue = list(reversed(batches))
        stop = time.perf_counter() + seconds

        async def worker():
            nonlocal done
            while queue and (time.perf_counter() < stop or not done):  # at least one batch, however loaded
                batch = queue.pop()
                response = await client.post("/v1/instances", json={"instances": batch})
                if response.status_code != 200:
                    raise RuntimeError(f"POST /v1/instances: {response.status_code} {response.text[:300]}")
                done += len(batch)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - start


def _http(base_url: str, batches: list[list[dict]], concurrency: int, seconds: float) -> tuple[int, float]:
    import httpx

    queue = list(reversed(batches))
    lock = threading.Lock()
    done = [0]
    stop = time.perf_counter() + seconds

    def worker():
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while time.perf_counter() < stop or not done[0]:  # at least one batch, however loaded
                with lock:
                    if not queue:
                        return
                    batch = queue.pop()
                response = client.post("/v1/instances", json={"instances": batch})
                if response.status_code != 200:
                    raise RuntimeError(f"POST /v1/instances: {response.status_code} {response.text[:300]}")
                with lock:
                    done[0] += len(batch)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], time.perf_counter() - start


def _start_source(model_dir: Path, redis_url: str, threads: int, log_path: Path) -> ServiceProcess:
    """A real ``iat serve source`` on loopback for the benchmark (no token), waited on until ready."""
    env = {"REDIS_URL": redis_url, "IAT_MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": str(threads),
           "IAT_API_TOKEN": ""}
    return ServiceProcess(["serve", "source", "--host", "127.0.0.1"], log_path=log_path, env=env).wait(
        "/readyz", timeout_s=60)


def measure(args, model_dir: Path, redis_url: str, instances: list[dict]) -> list[dict]:
    from services.config import Settings
    from services.source.main import SourceService
    from services.source.protocol import Instance
    from storage.connection import connect

    settings = Settings(redis_url=redis_url, model_dir=model_dir)
    service = SourceService(settings, client=connect(redis_url))
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    offset = 0
    server = None
    if "http" in modes:
        server = _start_source(model_dir, redis_url, args.threads, args.work_dir / "source.log")
    try:
        for size in sizes:
            for mode in modes:
                pool = instances[offset:offset + args.instances]
                offset = (offset + args.instances) % max(1, len(instances) - args.instances)
                batches = _chunks(pool, size, args.instances)
                timings = service.ingestor.timings
                before = _timings_snapshot(timings)
                if mode == "direct":
                    typed = [[Instance(**i) for i in b] for b in batches]
                    start = time.perf_counter()
                    stop = start + args.seconds
                    done = 0
                    for batch in typed:
                        if time.perf_counter() >= stop and done:
                            break
                        service.ingestor.ingest(batch)
                        done += len(batch)
                    wall = time.perf_counter() - start
                elif mode == "asgi":
                    # a fresh service per event loop: its MicroBatcher's queue belongs to one loop
                    fresh = SourceService(settings, client=service.client)
                    before = _timings_snapshot(fresh.ingestor.timings)
                    done, wall = asyncio.run(_asgi(fresh, batches, args.concurrency, args.seconds))
                    fresh.executor.shutdown(wait=False)
                    timings = fresh.ingestor.timings
                elif mode == "http":
                    done, wall = _http(server.base_url, batches, args.concurrency, args.seconds)
                else:
                    raise SystemExit(f"--modes: unknown mode {mode!r} (direct, asgi, http)")
                row = {"mode": mode, "batch_size": size, "instances": done, "seconds": wall,
                       "instances_per_s": done / wall if wall else 0.0}
                if mode != "http":
                    row.update(_shares(before, _timings_snapshot(timings), wall))
                rows.append(row)
                print(f"{mode:<6} B={size:<4d} {row['instances_per_s']:9.1f} instances/s"
                      + (f"  model {row['share_model']:.0%} store {row['share_store']:.0%} "
                         f"featurize {row['share_featurize']:.0%} framework {row['share_framework']:.0%}"
                         if "share_model" in row else ""), flush=True)
    finally:
        if server:
            server.stop()
        service.executor.shutdown(wait=False)
    return rows


def markdown(result: dict) -> str:
    lines = ["| mode | B | instances/s | model | store | featurize | framework |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        shares = [f"{r[k]:.0%}" if k in r else "-" for k in ("share_model", "share_store", "share_featurize", "share_framework")]
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['instances_per_s']:.0f} | " + " | ".join(shares) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.bench_ranking import default_data_dir, default_quick_models
    from models.data.raw import raw_instances
    from models.data.schema import load_schema
    from storage.connection import EmbeddedRedis

    torch.set_num_threads(args.threads)
    if args.instances < 1 or args.seconds <= 0 or args.concurrency < 1:
        print("--instances, --seconds and --concurrency must be positive", file=sys.stderr)
        return 2
    model_dir = args.model_dir or default_quick_models()
    data_dir = args.data_dir or default_data_dir()
    if not (data_dir / "ml-100k.inter").is_file():
        print(f"--data-dir: MovieLens-100K not found at {data_dir}", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    instances = raw_instances(load_schema("movielens-100k"), data_dir)
    embedded = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis(directory=(args.work_dir / "redis").resolve()).start()
        url = embedded.url
    try:
        rows = measure(args, model_dir, url, instances)
    finally:
        if embedded is not None:
            embedded.stop()
    result = {
        "rows": rows,
        "command": command_line("ingest", "harness.bench_source"),
        "model_dir": str(model_dir), "threads": args.threads, "concurrency": args.concurrency,
        "torch": torch.__version__, "cpus": os.cpu_count(), "python": platform.python_version(),
        "redis": "embedded (unix socket)" if embedded is not None else "REDIS URL given",
    }
    return emit(result, args.json_path, markdown)


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m harness.bench_source", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
