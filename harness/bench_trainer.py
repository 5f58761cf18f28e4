"""`iat bench trainer`: sustained labelled-instance throughput of the online trainer, one
process against several training together (DDP), side by side in one run.

    iat bench trainer --json trainer.json     # same as: python -m harness.bench_trainer ...

Per configuration (``--configs``: "TRAINERSxTHREADS", e.g. 1x1, 2x1, 1x2), in rounds so that
the configurations interleave: a fresh embedded Redis, ``iat serve source`` with a stream of
``--partitions`` partitions, the first ``--instances`` MovieLens-100K instances (time order,
labelled: ready at once) ingested through POST /v1/instances, THEN the trainer processes
started on that backlog (``IAT_TRAINER_WORLD_SIZE`` = TRAINERS, ``IAT_TORCH_THREADS`` = THREADS
each). Their /v1/stats are polled; the sustained rate is the instances trained (all ranks)
between the polls at 10 % and 90 % of the backlog, over the time between them (start-up,
the rendezvous and the flushed tail are outside it). Publishing and checkpoints are off during
the measurement (one of each at the end).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import sys
import time
from pathlib import Path

from harness.processes import ServiceProcess, free_port
from harness.reporting import command_line, emit

CONFIGS = "1x1,2x1,1x2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an export with source and iat models (default: $IAT_TEST_MODEL_DIR, else loadtests/out/models-quick)")
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K dir (default $IAT_DATA_DIR/movielens-100k)")
    parser.add_argument("--configs", default=CONFIGS, help="TRAINERSxTORCH_THREADS per trainer, comma separated")
    parser.add_argument("--rounds", type=int, default=1, help="times each configuration is measured (interleaved)")
    parser.add_argument("--instances", type=int, default=8192, help="the backlog each configuration trains")
    parser.add_argument("--batch-size", type=int, default=256, help="instances per step per trainer")
    parser.add_argument("--partitions", type=int, default=2, help="instance-stream partitions")
    parser.add_argument("--history-limit", type=int, default=127)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per configuration")
    parser.add_argument("--work-dir", type=Path, default=Path("loadtests/out/bench-trainer"))


def _parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            trainers, threads = (int(x) for x in part.lower().split("x"))
            if trainers < 1 or threads < 1:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--configs: expected TRAINERSxTHREADS like 2x1, got {part!r}") from None
        out.append((trainers, threads))
    return out


def _ingest(base_url: str, instances: list[dict], chunk: int = 256) -> float:
    import httpx

    start = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(instances), chunk):
            r = client.post(base_url + "/v1/instances", json={"instances": instances[i:i + chunk]})
            r.raise_for_status()
    return time.perf_counter() - start


def _stats(trainers: list[ServiceProcess]) -> list[dict] | None:
    import httpx

    try:
        return [httpx.get(t.base_url + "/v1/stats", timeout=30).json() for t in trainers]
    except httpx.HTTPError:
        return None


def measure_one(args, model_dir: Path, instances: list[dict], world: int, threads: int, tag: str) -> dict:
    from storage.connection import EmbeddedRedis

    work = (args.work_dir / tag).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    redis = EmbeddedRedis(directory=work / "redis").start()
    procs: list[ServiceProcess] = []
    n = len(instances)
    env = {"REDIS_URL": redis.url, "IAT_MODEL_DIR": str(work / "models"), "IAT_TRAINER_DIR": str(work / "trainer"),
           "IAT_STREAM_PARTITIONS": str(args.partitions), "IAT_TRAINER_BATCH_SIZE": str(args.batch_size),
           "IAT_TRAINER_PUBLISH_EVERY": str(n), "IAT_TRAINER_PUBLISH_INTERVAL_S": "0",
           "IAT_TRAINER_FLUSH_S": "0.5", "IAT_TRAINER_HISTORY_LIMIT": str(args.history_limit),
           "IAT_RELOAD_INTERVAL_S": "0", "IAT_CONSUMER_NAME": "bench"}
    shutil.copytree(model_dir, work / "models")
    try:
        source = ServiceProcess(["serve", "source"], log_path=work / "source.log",
                                env={**env, "IAT_TORCH_THREADS": "1"}).wait("/healthz", 120)
        ingest_s = _ingest(source.base_url, instances)
        source.stop()  # the trainers get the cores
        trainer_env = {**env, "IAT_TORCH_THREADS": str(threads), "IAT_TRAINER_WORLD_SIZE": str(world),
                       "IAT_TRAINER_DIST_URL": f"tcp://127.0.0.1:{free_port()}"}
        procs = [ServiceProcess(["serve", "trainer"], log_path=work / f"trainer-{r}.log",
                                env={**trainer_env, "IAT_TRAINER_RANK": str(r)}) for r in range(world)]
        with concurrent.futures.ThreadPoolExecutor(world) as pool:
            list(pool.map(lambda p: p.wait("/healthz", 300), procs))
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + args.timeout_s
        stats: list[dict] | None = None
        while time.monotonic() < deadline:
            for p in procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{tag}: a trainer exited ({p.proc.returncode}):\n{p.log_tail()}")
            stats = _stats(procs)
            if stats is not None:
                trained = sum(s["instances"] for s in stats)
                samples.append((time.perf_counter(), trained))
                if trained >= n:
                    break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"{tag}: not trained in {args.timeout_s}s:\n{procs[0].log_tail()}")
        lo = next(s for s in samples if s[1] >= 0.1 * n)
        hi = next(s for s in samples if s[1] >= 0.9 * n)
        first = next(s for s in samples if s[1] > 0)
        return {"trainers": world, "threads": threads, "cores_used": world * threads, "instances": n,
                "global_batch": world * args.batch_size, "steps": [s["steps"] for s in stats],
                "per_rank": [s["instances"] for s in stats],
                "instances_per_s": (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9),
                "drain_instances_per_s": (samples[-1][1] - first[1]) / max(samples[-1][0] - first[0], 1e-9),
                "ingest_s": ingest_s}
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def markdown(result: dict) -> str:
    lines = [("| trainers x torch threads | torch threads in all | global batch | instances/s (10-90 %) | whole drain | "
              "instances per rank | steps per rank |"), "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['trainers']} x {r['threads']} | {r['cores_used']} | {r['global_batch']} | "
                     f"{r['instances_per_s']:.0f} | {r['drain_instances_per_s']:.0f} | "
                     f"{', '.join(map(str, r['per_rank']))} | {', '.join(map(str, r['steps']))} |")
    from harness.machine import machine_markdown

    return "\n".join(lines) + "\n\n" + machine_markdown(result["machine"])


def run(args: argparse.Namespace) -> int:
    from harness.bench_ranking import default_data_dir, default_quick_models
    from harness.machine import MachineSampler
    from models.data.raw import raw_instances
    from models.data.schema import load_schema

    configs = _parse_configs(args.configs)
    if args.instances < 1 or args.batch_size < 1 or args.partitions < 1 or args.rounds < 1:
        print("--instances, --batch-size, --partitions and --rounds must be positive", file=sys.stderr)
        return 2
    if any(world > args.partitions for world, _ in configs):
        print(f"--configs: more trainers than --partitions ({args.partitions}) leaves a rank without data",
              file=sys.stderr)
        return 2
    model_dir = (args.model_dir or default_quick_models()).resolve()
    data_dir = args.data_dir or default_data_dir()
    if not (data_dir / "ml-100k.inter").is_file():
        print(f"--data-dir: MovieLens-100K not found at {data_dir}", file=sys.stderr)
        return 2
    instances = raw_instances(load_schema("movielens-100k"), data_dir)[:args.instances]
    rows = []
    with MachineSampler() as sampler:
        for k in range(args.rounds):
            for world, threads in configs:
                row = measure_one(args, model_dir, instances, world, threads, f"r{k}-{world}x{threads}")
                rows.append(row)
                print(f"{world} trainer(s) x {threads} thread(s): {row['instances_per_s']:.0f} instances/s "
                      f"(drain {row['drain_instances_per_s']:.0f}), steps {row['steps']}", flush=True)
    result = {"rows": rows, "command": command_line("trainer", "harness.bench_trainer"),
              "model_dir": str(model_dir), "batch_size": args.batch_size, "partitions": args.partitions,
              "machine": sampler.summary()}
    return emit(result, args.json_path, markdown)


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m harness.bench_trainer", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
