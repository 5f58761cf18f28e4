"""`iat bench score`: Score latency in process, over gRPC and over REST, next to its floor.

    iat bench score --json score.json          # same as: python -m harness.bench_ranking ...

For each (candidates C, history n) cell the following are timed round-robin in one run, so that a
noisy neighbour hits all of them alike:
  fetch    the fused history read alone (``AsyncInstanceStore.read_history``, one round trip)
  assemble the request's bytes as gRPC hands them over to validated arrays, as the service
           does it (``ScoreRequestWire`` parse: candidates left as bytes, ``query_from_proto``,
           header checks, cached item rows, ``Featurizer.assemble``)
  assemble:previous  the same the way it was done before (a full ``ScoreRequest`` parse, then
           ``harness.previous``: dicts and checks per candidate, encoding per field and
           candidate); equal arrays
  model    the model forward alone (``RankingModel.score`` on ready arrays)
  model:previous  the same with the previous formulation (``harness.naive.IATPerCandidate``)
  inproc   ``RankingServing.score`` in this process (fetch -> assemble -> model, what both routers
           call); the same user every call, so after the first a history-cache hit
  inproc:miss  the same with the history cache off (every call decodes and prepares)
  grpc     Score over gRPC to a real ``iat serve ranking`` process on loopback
  rest     POST /v1/score to the same process
  peer:*   any ``--peer NAME=URL`` speaking the REST JSON (e.g. the naive FastAPI peer of
           ``harness/peers/naive_server.py``); timed on fewer rounds when it is slow
  grpc:*   any ``--grpc-peer NAME=HOST:PORT`` serving the same Score over gRPC, on the same store
           (e.g. ``iat serve ranking`` of another checkout: before/after in one run); timed
           every round like ``grpc``, and its scores checked equal to ``grpc``'s within 1e-5
The floor is p50(fetch) + p50(model): what a Score cannot beat without a faster store read or
model. After the latency rounds, each protocol is driven at saturation (``--concurrency``
requests in flight for ``--saturation-s`` seconds) for its throughput.

``--workers 1,2``: the served process runs IAT_RANKING_WORKERS = the first count; then, for each
count in turn, a fresh ``iat serve ranking`` with that many workers is driven at saturation over
gRPC at the largest n, one channel (one connection) per client thread, the connections spread
evenly over the workers, against the ceiling cores / forward time (forward = the "model" method
on the same request, at ``--threads``, timed in this process for a second (at most
``--saturation-s``) right before and right after that saturation run: the mean of the two p50s,
so that the ceiling is taken at the machine's speed of those seconds, which on a shared VM
drifts by tens of percent in minutes). Where the machine's CPUs went during the run is stated
beside it: the service, this process (the load generator), a local Redis, idle.

Models: ``--model-dir`` serves an export as it is. Without it, a ranking model at the default
``ModelConfig`` (L = 256, random weights: latency does not depend on them) is built for the
MovieLens schema next to the source model of a quick export (``--quick-models``), because the
quick models have L = 64. Requests carry real MovieLens items and user features; histories are
written straight into the store (n records of the served source version) for users
``bench-h<n>``.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np

from harness.machine import MachineSampler, machine_markdown
from harness.processes import ServiceProcess, free_port
from harness.reporting import command_line, emit
from services.allocator import keep_freed_memory
from services.config import Settings

CANDIDATES = (100, 500, 1000)
HISTORIES = (0, 64, 256)
REQUEST_TIME_MS = 1_700_000_000_000


# ---------------------------------------------------------------- models at serving size

def build_bench_models(quick_dir: Path, out_dir: Path, history_len: int | None = None) -> Path:
    """``out_dir`` with the quick export's source model and an ``iat`` ranking model at the
    default ``ModelConfig`` (random weights), reading that source model's embeddings.

    Reused when it was already built from the same quick export."""
    from dataclasses import asdict, replace

    import torch

    from contract.artifacts import CONFIG_FILE, WEIGHTS_FILE, write_manifest
    from models.export import TORCHSCRIPT_NAME, export_torchscript, manifest_for
    from models.nn.base import ModelConfig
    from models.runtime.loader import latest_version
    from models.runtime.modules import IATRanking

    quick_dir, out_dir = Path(quick_dir), Path(out_dir)
    quick_iat = latest_version(quick_dir, "iat")
    source = latest_version(quick_dir, "source")
    if quick_iat is None or source is None:
        raise SystemExit(f"--quick-models {quick_dir}: needs iat/ and source/ versions (run `iat export`)")
    stamp = out_dir / "built-from.json"
    mc = ModelConfig()
    if history_len:
        mc = replace(mc, history_len=history_len)
    manifest = json.loads((quick_iat / "manifest.json").read_text())
    # The source service writes records under the source model's lineage; a downstream without
    # the lineage fields reads an exact version only and would skip every one of them.
    lineage = {k: manifest[k] for k in ("source_lineage", "source_min_ordinal") if manifest.get(k) is not None}
    key = {"iat": str(quick_iat.resolve()), "source": str(source.resolve()), "model_config": asdict(mc), **lineage}
    if stamp.is_file() and json.loads(stamp.read_text()) == key and latest_version(out_dir, "iat") is not None:
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(source, out_dir / "source" / source.name)
    config = json.loads((quick_iat / CONFIG_FILE).read_text())
    config.update(model_config=asdict(mc), history_length=mc.history_len)
    torch.manual_seed(0)
    module = IATRanking(config).eval()
    version = out_dir / "iat" / "20000101T000000-00000000"
    version.mkdir(parents=True)
    torch.save(module.state_dict(), version / WEIGHTS_FILE)
    (version / CONFIG_FILE).write_text(json.dumps(config))
    export_torchscript(module, version / TORCHSCRIPT_NAME)
    run = {"feature_spec": manifest["schema"], "dataset": "movielens-100k (random weights, default ModelConfig)"}
    write_manifest(version, {**manifest_for("iat", version.name, "2000-01-01T00:00:00", config, run,
                                         manifest["source_version"], None), **lineage})
    stamp.write_text(json.dumps(key))
    return out_dir


# ---------------------------------------------------------------- MovieLens requests

class MovieLensWorkload:
    """Score requests from real MovieLens users and items (the schema's user and item tables)."""

    def __init__(self, data_dir: Path, schema_name: str = "movielens-100k") -> None:
        from models.data.raw import raw_instances
        from models.data.schema import load_schema

        schema = load_schema(schema_name)
        self.instances = raw_instances(schema, Path(data_dir))
        user_tables = [t for t in schema.tables if t.group == "user"]
        self.user_fields = {f for t in user_tables for f in (*t.categorical, *t.multi)}
        self.items: dict[str, dict] = {}
        self.user_context: dict[str, dict] = {}
        self.user_times: dict[str, list[int]] = {}
        for inst in self.instances:
            cat = inst["features"]["categorical"]
            self.items.setdefault(inst["item_id"], {k: v for k, v in cat.items() if k not in self.user_fields})
            self.user_context.setdefault(inst["user_id"], {k: v for k, v in cat.items() if k in self.user_fields})
            self.user_times.setdefault(inst["user_id"], []).append(inst["timestamp_ms"])
        self.item_ids = sorted(self.items)
        self.user_ids = sorted(self.user_times)

    def candidates(self, n: int, rng: np.random.Generator) -> list[dict]:
        picks = rng.choice(len(self.item_ids), size=n, replace=n > len(self.item_ids))
        return [{"item_id": self.item_ids[i], "features": {"categorical": dict(self.items[self.item_ids[i]]), "numeric": {}}}
                for i in picks]

    def request(self, user_id: str, request_time_ms: int, n_candidates: int, rng: np.random.Generator,
                context_user: str | None = None, request_id: str = "") -> dict:
        """The JSON of a ScoreRequest (REST body; ``to_proto`` makes the gRPC message)."""
        context = dict(self.user_context[context_user or user_id])
        return {"request_id": request_id, "user_id": user_id, "request_time_ms": int(request_time_ms),
                "context": {"categorical": context, "numeric": {}},
                "candidates": self.candidates(n_candidates, rng), "model": ""}

    def live_request(self, rng: np.random.Generator, n_candidates: int, request_id: str = "") -> dict:
        """A real user at the time of one of their own instances: histories spread as the data's."""
        user = self.user_ids[int(rng.integers(len(self.user_ids)))]
        times = self.user_times[user]
        return self.request(user, times[int(rng.integers(len(times)))], n_candidates, rng, request_id=request_id)


def to_proto(body: dict):
    from iat.ranking.v1 import ranking_pb2

    def feats(f: dict):
        return ranking_pb2.Features(categorical=f.get("categorical", {}), numeric=f.get("numeric", {}))

    return ranking_pb2.ScoreRequest(
        request_id=body["request_id"], user_id=body["user_id"], request_time_ms=body["request_time_ms"],
        context=feats(body["context"]), model=body.get("model", ""),
        candidates=[ranking_pb2.Candidate(item_id=c["item_id"], features=feats(c["features"])) for c in body["candidates"]])


# ---------------------------------------------------------------- the served process

class RankingProcess(ServiceProcess):
    """A real ``iat serve ranking`` on loopback for the benchmark (no token, no hot reload)."""

    def __init__(self, model_dir: Path, redis_url: str, threads: int, runtime: str, log_path: Path,
                 extra_env: dict | None = None, workers: int = 1) -> None:
        self.grpc_port = free_port()
        env = {"REDIS_URL": redis_url, "IAT_MODEL_DIR": str(model_dir), "IAT_RELOAD_INTERVAL_S": "0",
               "IAT_RUNTIME": runtime, "OMP_NUM_THREADS": str(threads), "IAT_API_TOKEN": "",
               "IAT_RANKING_WORKERS": str(workers), **(extra_env or {})}
        super().__init__(["serve", "ranking", "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port)],
                         log_path=log_path, env=env)

    def wait_ready(self, timeout_s: float = 60.0) -> "RankingProcess":
        self.wait("/readyz", timeout_s)
        return self

    def balanced_channels(self, count: int, workers: int, timeout_s: float = 180.0) -> list:
        """``count`` gRPC channels (one connection each) spread evenly over the workers: the kernel
        hashes each new connection to a worker, which over a handful of connections is often
        lopsided; many clients even it out, and so does a balancer in front. Opens connections and
        keeps those that land on a worker short of its share, so it also waits for every worker
        to be up (a worker binds the port only once its models are loaded)."""
        import grpc
        from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

        request = ranking_pb2.ScoreRequest(request_id="wait", user_id="bench-wait", request_time_ms=REQUEST_TIME_MS)
        share = -(-count // workers)
        kept: dict[str, list] = {}
        deadline = time.monotonic() + timeout_s
        while sum(map(len, kept.values())) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not spread {count} connections over {workers} workers in {timeout_s}s")
            channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
            _, call = ranking_pb2_grpc.RankingServiceStub(channel).Score.with_call(request, timeout=60)
            pid = dict(call.trailing_metadata()).get("iat-worker-pid")
            if len(kept.setdefault(pid, [])) < share:
                kept[pid].append(channel)
            else:
                channel.close()
        return [ch for chans in kept.values() for ch in chans]


class InlineExecutor(Executor):
    """Runs the model in the calling thread, so that a profiler of that thread sees all of a Score."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(exc)
        return future


# ---------------------------------------------------------------- measuring

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE", help="write the figures here")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="serve this export as it is (default: build serving-size models, see --quick-models)")
    parser.add_argument("--quick-models", type=Path, default=None,
                        help="a MovieLens export whose source model (and schema) the bench model reads "
                             "(default: $IAT_TEST_MODEL_DIR, else loadtests/out/models-quick)")
    parser.add_argument("--history-len", type=int, default=None, help="L of the built model (default: ModelConfig's 256)")
    parser.add_argument("--work-dir", type=Path, default=Path("loadtests/out/bench-score"))
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K dir (default $IAT_DATA_DIR/movielens-100k)")
    parser.add_argument("--redis-url", default=None, help="default: a fresh embedded redis-server (unix socket)")
    parser.add_argument("--candidates", default=",".join(map(str, CANDIDATES)))
    parser.add_argument("--history", default=",".join(map(str, HISTORIES)))
    parser.add_argument("--methods", default="fetch,assemble,assemble:previous,model,model:previous,inproc,inproc:miss,grpc,rest")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per cell")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--max-reps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the served process")
    parser.add_argument("--runtime", default="torchscript", choices=("torchscript", "eager", "aoti"))
    parser.add_argument("--saturation-s", type=float, default=3.0, help="seconds per protocol and cell at saturation; 0 skips")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="requests in flight at saturation (at 4 on 2 cores the service was not saturated: "
                             "a request spends most of its time outside the forward; loadtests/RESULTS.md)")
    parser.add_argument("--workers", default="1",
                        help="IAT_RANKING_WORKERS of the served process; several counts (e.g. 1,2): also "
                             "gRPC saturation at each, against cores / forward time")
    parser.add_argument("--batch-wait-ms", default="",
                        help="cross-request batching side by side (harness/bench_batching.py): IAT_SCORE_BATCH_WAIT_MS "
                             "values, the first the reference (e.g. 0,5); one served process each, gRPC at saturation")
    parser.add_argument("--batch-concurrency", default="1,4,16", help="requests in flight for --batch-wait-ms")
    parser.add_argument("--batch-rounds", type=int, default=4,
                        help="alternating slices per setting for --batch-wait-ms (--saturation-s split among them)")
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                        help="another Score endpoint speaking the REST JSON, timed alongside (repeatable)")
    parser.add_argument("--grpc-peer", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="another gRPC Score server on the same store, timed every round (repeatable)")
    parser.add_argument("--peer-pid", action="append", type=int, default=[], metavar="PID",
                        help="a --peer's process on this machine: its CPU counts as this run's in the machine line")
    parser.add_argument("--peer-candidates", default="100,500", help="cells (candidates) where peers are timed")
    parser.add_argument("--peer-max-reps", type=int, default=12)
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="also cProfile in-process Scores (C=100, largest n) and write the top functions here")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 0:
        raise SystemExit(f"--{name}: values must be >= 0, got {text!r}")
    return values


def percentiles(seconds) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": int(ms.size)}


def saturate(call, concurrency: int, seconds: float) -> dict:
    """``concurrency`` threads calling ``call`` back to back for ``seconds``: completed per second."""
    stop = time.perf_counter() + seconds
    done = [0] * concurrency
    errors = [0] * concurrency
    lat: list[list[float]] = [[] for _ in range(concurrency)]

    def worker(k: int) -> None:
        # at least one call each, however late a loaded machine starts the thread
        while time.perf_counter() < stop or not (done[k] or errors[k]):
            s = time.perf_counter()
            try:
                call()
            except Exception:  # noqa: BLE001 - counted, reported
                errors[k] += 1
                continue
            lat[k].append(time.perf_counter() - s)
            done[k] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    all_lat = [x for part in lat for x in part]
    out = {"rps": sum(done) / elapsed, "completed": sum(done), "errors": sum(errors), "seconds": elapsed,
           "concurrency": concurrency}
    if all_lat:
        out.update({f"loaded_{k}": v for k, v in percentiles(all_lat).items() if k != "n"})
    return out


def scaling(args, model_dir: Path, redis_url: str, workload: MovieLensWorkload, result: dict,
            redis_pid: int | None) -> list[dict]:
    """gRPC throughput at saturation with each worker count, at the largest n, against the
    ceiling available CPUs / forward p50 of the same cell. ``redis_pid``: the Redis server's,
    when it runs on this machine (its CPU is accounted)."""
    import grpc
    from iat.ranking.v1 import ranking_pb2_grpc

    from services.cpus import available_cpus

    counts = _ints(args.workers, "workers")
    n = max(_ints(args.history, "history"))
    rounds = {(r["candidates"], r["history"]): r["p50_ms"] for r in result["rows"] if r["method"] == "model"}
    clock = ForwardClock(model_dir, redis_url, args.runtime, f"bench-h{n}")
    cpus = available_cpus()
    rng = np.random.default_rng(2)
    rows = []
    for workers in counts:
        server = RankingProcess(model_dir, redis_url, args.threads, args.runtime,
                                args.work_dir / f"ranking-{workers}w.log", workers=workers).wait_ready(180)
        try:
            for c in _ints(args.candidates, "candidates"):
                message = to_proto(workload.request(f"bench-h{n}", REQUEST_TIME_MS, c, rng,
                                                    context_user=workload.user_ids[0], request_id=f"s-{c}"))
                channels = server.balanced_channels(args.concurrency, workers)
                stubs = iter([ranking_pb2_grpc.RankingServiceStub(ch) for ch in channels])
                local, pids, lock = threading.local(), set(), threading.Lock()

                def call() -> None:
                    stub = getattr(local, "stub", None)
                    if stub is None:  # each client thread keeps one connection
                        with lock:
                            local.stub = stub = next(stubs)
                    _, rpc = stub.Score.with_call(message, timeout=120)
                    pids.add(dict(rpc.trailing_metadata()).get("iat-worker-pid"))

                forward_before = clock.time(message, min(1.0, args.saturation_s))
                before = _cpu_accounts(server.proc.pid, redis_pid)
                sat = saturate(call, args.concurrency, args.saturation_s)
                spent = {k: v - before[k] for k, v in _cpu_accounts(server.proc.pid, redis_pid).items()}
                forward_after = clock.time(message, min(1.0, args.saturation_s))
                served_cpu = spent["service"]
                for channel in channels:
                    channel.close()
                row = {"workers": workers, "candidates": c, "history": n, **sat, "workers_answering": len(pids),
                       "cpus": cpus, "forward_p50_ms": (forward_before[0] + forward_after[0]) / 2,
                       "forward_before_after_ms": [forward_before[0], forward_after[0]],
                       "forward_rounds_p50_ms": rounds.get((c, n)),  # the "model" column, minutes earlier
                       # one thread: its CPU time is all of the forward's
                       "forward_cpu_ms": (forward_before[1] + forward_after[1]) / 2 if args.threads == 1 else None,
                       "server_cpus": served_cpu / sat["seconds"],
                       "server_cpu_ms_per_request": 1e3 * served_cpu / max(sat["completed"], 1),
                       # where the rest of the machine went: this process is the load generator
                       "load_generator_cpus": spent["load_generator"] / sat["seconds"],
                       "redis_cpus": spent["redis"] / sat["seconds"] if redis_pid else None,
                       "idle_cpus": spent["idle"] / sat["seconds"]}
                if row["forward_p50_ms"]:
                    row["ceiling_rps"] = cpus / (row["forward_p50_ms"] / 1e3)
                    row["share_of_ceiling"] = sat["rps"] / row["ceiling_rps"]
                    # the same ceiling on the CPUs the load generator and Redis left to the service
                    left = cpus - row["load_generator_cpus"] - (row["redis_cpus"] or 0.0)
                    row["share_of_ceiling_left"] = sat["rps"] / (left / (row["forward_p50_ms"] / 1e3))
                if row["forward_cpu_ms"]:
                    # the same goal in CPU time, which a shared machine does not inflate: the forward's
                    # share of all the CPU the service spent per request
                    row["forward_share_of_server_cpu"] = row["forward_cpu_ms"] / row["server_cpu_ms_per_request"]
                rows.append(row)
                print(f"workers={workers} C={c:<5d} n={n}: {sat['rps']:.1f} req/s over gRPC ({len(pids)} workers "
                      f"answering, {sat['errors']} errors)"
                      + (f", {row['share_of_ceiling']:.0%} of {cpus} cores / forward" if "share_of_ceiling" in row else ""),
                      flush=True)
        finally:
            server.stop()
    return rows


class ForwardClock:
    """The "model" method of the latency rounds (``RankingModel.score`` on the arrays of a
    request, the seeded user's history read once), timed in this process on demand."""

    def __init__(self, model_dir: Path, redis_url: str, runtime: str, user_id: str) -> None:
        from services.ranking.registry import ModelRegistry
        from services.stores import instance_store
        from storage.connection import connect

        registry = ModelRegistry(model_dir, runtime=runtime)
        registry.refresh()
        self.model = registry.get("")
        self.settings = Settings(redis_url=redis_url)
        client = connect(redis_url)
        try:
            store = instance_store(client, self.settings, registry.record_layout(self.model))
            self.history = store.read_history(user_id, REQUEST_TIME_MS, self.model.max_history,
                                              expected_source_version=self.model.manifest.accepted_sources())
        finally:
            client.close()

    def time(self, message, seconds: float = 1.0) -> tuple[float, float]:
        """(p50 wall ms, p50 thread CPU ms) of the forward on ``message``'s candidates."""
        from harness.previous import previous_assemble

        cat, multi, num = previous_assemble(self.model.featurizer, message, self.settings.max_candidates)
        walls, cpus = [], []
        self.model.score(self.history, REQUEST_TIME_MS, cat, multi, num)  # warm
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(walls) < 3:
            s, s_cpu = time.perf_counter(), time.thread_time()
            self.model.score(self.history, REQUEST_TIME_MS, cat, multi, num)
            walls.append(time.perf_counter() - s)
            cpus.append(time.thread_time() - s_cpu)
        return 1e3 * float(np.median(walls)), 1e3 * float(np.median(cpus))


def _local_redis_pid(redis_url: str) -> int | None:
    """The pid of the Redis server behind ``redis_url`` when it runs on this machine (INFO's
    process_id, checked against a local process named redis-server), else None."""
    import psutil

    from storage.connection import connect

    client = connect(redis_url)
    try:
        pid = int(client.info("server")["process_id"])
    except Exception:  # noqa: BLE001 - a cluster or a server that hides INFO: not accounted
        return None
    finally:
        client.close()
    try:
        return pid if "redis" in psutil.Process(pid).name() else None
    except psutil.Error:  # another machine's pid
        return None


def _cpu_accounts(service_pid: int, redis_pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the service (its process tree), this process (the load generator),
    the Redis server, and the machine's idle time (all CPUs)."""
    import psutil

    me = psutil.Process().cpu_times()
    machine = psutil.cpu_times()
    return {"service": _tree_cpu_seconds(service_pid), "load_generator": me.user + me.system,
            "redis": _tree_cpu_seconds(redis_pid) if redis_pid else 0.0,
            "idle": machine.idle + getattr(machine, "iowait", 0.0)}


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants so far."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _cpus_cells(r: dict) -> str:
    """The last four cells of a scaling row (rows of an older JSON have none of them)."""
    def cpus(key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.2f}"
    left = "-" if r.get("share_of_ceiling_left") is None else f"{r['share_of_ceiling_left']:.0%}"
    return f"{cpus('load_generator_cpus')} | {cpus('redis_cpus')} | {cpus('idle_cpus')} | {left} |"


def scaling_markdown(rows: list[dict]) -> str:
    conc = rows[0]["concurrency"]
    lines = [f"gRPC at saturation ({conc} requests in flight, one connection each, spread evenly over the workers) "
             "by IAT_RANKING_WORKERS; "
             "ceiling = available CPUs / forward p50 (the \"model\" method on the same request, timed in the bench "
             "process for a second right before and right after the saturation run, mean of the two). On a shared machine "
             "the wall-clock ceiling assumes cores this run did not get; the CPU columns state the same goal in "
             "CPU time: service CPU per request (every process of `iat serve ranking`, from psutil) against the "
             "forward's own thread CPU time (one torch thread). The load generator (this process) and Redis "
             "run on the same machine: their CPUs and the idle CPUs say where the rest went, and the last "
             "column is req/s against the ceiling on the CPUs they left (CPUs - load generator - Redis).", "",
             "| workers | C | n | req/s | p50 / p99 ms under load | workers answering | errors | forward p50 ms | "
             "ceiling req/s | req/s / ceiling | service CPUs used | service CPU ms / request | forward CPU ms | "
             "forward / service CPU | load generator CPUs | Redis CPUs | idle CPUs | req/s / ceiling on the CPUs left |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['candidates']} | {r['history']} | {r['rps']:.1f} | "
                     f"{r.get('loaded_p50_ms', float('nan')):.1f} / {r.get('loaded_p99_ms', float('nan')):.1f} | "
                     f"{r['workers_answering']} | {r['errors']} | "
                     + (f"{r['forward_p50_ms']:.2f} | {r['ceiling_rps']:.1f} | {r['share_of_ceiling']:.0%} | "
                        if r.get("forward_p50_ms") else "- | - | - | ")
                     + f"{r['server_cpus']:.2f} | {r['server_cpu_ms_per_request']:.2f} | "
                     + (f"{r['forward_cpu_ms']:.2f} | {r['forward_share_of_server_cpu']:.0%} | "
                        if r.get("forward_cpu_ms") else "- | - | ")
                     + _cpus_cells(r))
    by = {(r["workers"], r["candidates"]): r["rps"] for r in rows}
    counts = sorted({r["workers"] for r in rows})
    if len(counts) > 1:
        lines += ["", "Scaling, req/s at " + f"{counts[-1]} workers / at {counts[0]}: " + ", ".join(
            f"C = {c}: {by[(counts[-1], c)] / by[(counts[0], c)]:.2f}x"
            for c in sorted({r["candidates"] for r in rows}) if (counts[0], c) in by and (counts[-1], c) in by)]
    return "\n".join(lines)


def seed_histories(model_dir: Path, redis_url: str, histories: list[int], settings) -> dict[int, str]:
    """User ``bench-h<n>`` with n records of the served source version; returns n -> user."""
    from models.runtime.loader import latest_version, load_ranking_model
    from services.ranking.registry import ModelRegistry
    from services.stores import instance_store
    from storage.connection import connect
    from storage.records import InstanceRecord

    registry = ModelRegistry(model_dir, runtime="eager")
    names = registry.ranking_names()
    model = load_ranking_model(latest_version(model_dir, settings.default_model or names[0]), runtime="eager")
    layout = registry.record_layout(model)
    dim, code_length, code_dtype, tasks = layout.dim, layout.code_length, np.dtype(layout.code_dtype), layout.tasks
    client = connect(redis_url)
    store = instance_store(client, settings, layout)
    rng = np.random.default_rng(0)
    users = {}
    for n in histories:
        user = f"bench-h{n}"
        client.delete(store.sequence_key(user))
        records = [InstanceRecord(
            ins_id=int(1_000_000 * (n + 1) + i), user_id=user, timestamp_ms=REQUEST_TIME_MS - 60_000 * (i + 1),
            embedding=rng.standard_normal(dim).astype(np.float32),
            codes=rng.integers(0, 2, code_length).astype(code_dtype) if code_length else None,
            labels={t: int(rng.integers(2)) for t in tasks}, item_hash=int(rng.integers(model.feature_spec.n_buckets)),
            source_version=model.source_version, source_lineage=model.manifest.source_lineage,
            source_ordinal=model.manifest.source_min_ordinal or 0) for i in range(n)]
        for start in range(0, len(records), 500):
            store.write_and_append(records[start:start + 500])
        users[n] = user
    client.close()
    return users


async def _measure(args, model_dir: Path, redis_url: str, workload: MovieLensWorkload, server) -> dict:
    import grpc
    import httpx
    from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

    from harness.previous import previous_assemble
    from services.ranking.main import build_serving
    from services.ranking.protocol import query_from_proto, validate_header
    from services.ranking.serving import RankingServing
    from services.ranking.wire import ScoreRequestWire

    ScoreRequest = ranking_pb2.ScoreRequest

    settings = Settings(redis_url=redis_url, model_dir=model_dir, runtime=args.runtime, reload_interval_s=0)
    cands, hists = _ints(args.candidates, "candidates"), _ints(args.history, "history")
    methods = [m for m in args.methods.split(",") if m]
    users = seed_histories(model_dir, redis_url, hists, settings)
    serving = await build_serving(settings)
    model = serving.registry.get("")
    store = serving.store_for(model)
    no_cache = RankingServing(settings.model_copy(update={"history_cache_mb": 0.0}), serving.registry, serving.client)
    previous_model = _previous_model(model) if "model:previous" in methods else None
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") if server else None
    stub = ranking_pb2_grpc.RankingServiceStub(channel) if channel else None
    http = httpx.Client(timeout=120)
    peers = dict(p.split("=", 1) for p in args.peer)
    grpc_peers = {name: grpc.insecure_channel(target) for name, target in (p.split("=", 1) for p in args.grpc_peer)}
    grpc_stubs = {name: ranking_pb2_grpc.RankingServiceStub(ch) for name, ch in grpc_peers.items()}
    peer_cands = set(_ints(args.peer_candidates, "peer-candidates"))
    rng = np.random.default_rng(1)
    context_user = workload.user_ids[0]
    rows, throughput = [], []

    for n in hists:
        for c in cands:
            body = workload.request(users[n], REQUEST_TIME_MS, c, rng, context_user=context_user, request_id=f"b-{c}-{n}")
            message = to_proto(body)
            query = query_from_proto(message)
            limit = model.max_history
            fetched = await store.read_history(users[n], REQUEST_TIME_MS, limit, expected_source_version=model.manifest.accepted_sources())
            assert len(fetched) == min(n, limit), f"seeded history of {users[n]}: {len(fetched)} != {min(n, limit)}"
            inputs = fetched
            max_candidates = settings.max_candidates

            wire_bytes = message.SerializeToString()

            def served_assemble():
                q = query_from_proto(ScoreRequestWire.FromString(wire_bytes))
                validate_header(q, max_candidates=max_candidates)
                return serving._featurize(model, q)

            cat, multi, num = served_assemble()
            for got, ref in zip((cat, multi, num), previous_assemble(model.featurizer, ScoreRequest.FromString(wire_bytes),
                                                                     max_candidates)):
                assert got.dtype == ref.dtype and np.array_equal(got, ref), "assemble differs from the previous way"

            async def fetch():
                await store.read_history(users[n], REQUEST_TIME_MS, limit, expected_source_version=model.manifest.accepted_sources())

            async def assemble():
                served_assemble()

            async def assemble_previous():
                previous_assemble(model.featurizer, ScoreRequest.FromString(wire_bytes), max_candidates)

            async def forward():
                model.score(inputs, REQUEST_TIME_MS, cat, multi, num)

            async def forward_previous():
                previous_model.score(inputs, REQUEST_TIME_MS, cat, multi, num)

            async def inproc():
                result = await serving.score(query, None)
                assert result.history_length == min(n, limit)

            async def inproc_miss():
                result = await no_cache.score(query, None)
                assert result.history_length == min(n, limit)

            def grpc_call():
                response = stub.Score(message, timeout=120)
                assert response.history_length == min(n, limit)

            def grpc_peer_call(peer_stub):
                response = peer_stub.Score(message, timeout=120)
                assert response.history_length == min(n, limit)
                return response

            if stub is not None:  # a peer serving another build must give the same scores
                want = np.asarray(stub.Score(message, timeout=120).scores)
                for name, peer_stub in grpc_stubs.items():
                    got = np.asarray(grpc_peer_call(peer_stub).scores)
                    assert np.abs(got - want).max() <= 1e-5, f"grpc:{name} scores differ from grpc's"

            def rest_call(url=None):
                response = http.post(url or server.base_url + "/v1/score", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{url or 'rest'}: HTTP {response.status_code}: {response.text[:300]}")

            async def sync(fn):
                fn()

            calls = {"fetch": fetch, "assemble": assemble, "assemble:previous": assemble_previous,
                     "model": forward, "model:previous": forward_previous, "inproc": inproc,
                     "inproc:miss": inproc_miss, "grpc": lambda: sync(grpc_call), "rest": lambda: sync(rest_call)}
            calls = {m: calls[m] for m in methods if m in calls and (server or m not in ("grpc", "rest"))}
            peer_calls = {f"peer:{name}": (lambda url=url: sync(lambda: rest_call(url)))
                          for name, url in peers.items() if c in peer_cands}
            calls.update({f"grpc:{name}": (lambda s=peer_stub: sync(lambda: grpc_peer_call(s)))
                          for name, peer_stub in grpc_stubs.items()})
            timed = {**calls, **peer_calls}
            for _ in range(args.warmup):
                for call in timed.values():
                    await call()
            t0 = time.perf_counter()
            for call in calls.values():
                await call()
            per_round = time.perf_counter() - t0
            reps = int(min(args.max_reps, max(args.min_reps, args.budget / max(per_round, 1e-6))))
            peer_reps = min(reps, args.peer_max_reps)
            timings = {m: [] for m in timed}
            gc.collect()
            gc.freeze()  # as the warm service does
            clock, cpu_clock = time.perf_counter, time.thread_time
            cpu = {m: [] for m in timed}  # this thread's CPU: the work itself, whatever else the machine ran
            order = list(timed.items())
            for i in range(reps):
                # the order alternates: whoever runs first in a round finds colder caches
                for name, call in (order if i % 2 == 0 else reversed(order)):
                    if name.startswith("peer:") and i >= peer_reps:
                        continue
                    s, s_cpu = clock(), cpu_clock()
                    await call()
                    timings[name].append(clock() - s)
                    cpu[name].append(cpu_clock() - s_cpu)
            gc.unfreeze()
            for name, ts in timings.items():
                rows.append({"candidates": c, "history": n, "method": name, **percentiles(ts),
                             "thread_cpu_p50_ms": float(np.percentile(cpu[name], 50) * 1e3)})
            line = "  ".join(f"{m} {np.percentile(ts, 50) * 1e3:7.2f}" for m, ts in timings.items())
            print(f"C={c:<5d} n={n:<4d} p50 ms: {line}", flush=True)
            if args.saturation_s > 0:
                loads = {}
                if server and "grpc" in methods:
                    loads["grpc"] = grpc_call
                if server and "rest" in methods:
                    loads["rest"] = rest_call
                for name, url in peers.items():
                    if c in peer_cands:
                        loads[f"peer:{name}"] = lambda url=url: rest_call(url)
                for name, peer_stub in grpc_stubs.items():
                    loads[f"grpc:{name}"] = lambda s=peer_stub: grpc_peer_call(s)
                for name, call in loads.items():
                    sat = saturate(call, args.concurrency, args.saturation_s)
                    throughput.append({"candidates": c, "history": n, "protocol": name, **sat})
                    print(f"C={c:<5d} n={n:<4d} {name} at saturation: {sat['rps']:.1f} req/s "
                          f"({sat['concurrency']} in flight, {sat['errors']} errors)", flush=True)

    profile = None
    if args.profile:
        profile = await _profile(args, serving, workload, users, max(hists), rng, context_user)
    http.close()
    if channel:
        channel.close()
    for peer_channel in grpc_peers.values():
        peer_channel.close()
    serving.executor.shutdown(wait=False)
    await serving.client.aclose()
    info = {"name": model.name, "version": model.version, "max_history": model.max_history,
            "runtime": model.runtime, "source_version": model.source_version}
    return {"rows": rows, "throughput": throughput, "model": info, "profile": profile}


def _previous_model(model):
    """A copy of the served ``RankingModel`` whose forward is the previous formulation (same
    weights, same runtime where it is TorchScript or eager)."""
    import copy
    import json
    import warnings

    import torch

    from harness.naive import IATPerCandidate
    from models.export import example_inputs

    module = IATPerCandidate(json.loads((model.path / "config.json").read_text())).eval()
    module.load_state_dict(torch.load(model.path / "weights.pt", weights_only=True))
    previous = copy.copy(model)
    if model.runtime == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # static-size checks only
            module = torch.jit.trace(module, example_inputs(module), check_trace=False)
    previous._runner, previous._split = module, None
    return previous


async def _profile(args, serving, workload, users, n, rng, context_user) -> dict:
    """cProfile of in-process Scores (C=100, history n), the model run inline so it is seen."""
    import cProfile
    import io
    import pstats

    from services.ranking.protocol import ScoreRequestModel, query_from_model

    body = workload.request(users[n], REQUEST_TIME_MS, 100, rng, context_user=context_user, request_id="profile")
    query = query_from_model(ScoreRequestModel(**body))
    pool, serving.executor = serving.executor, InlineExecutor()
    try:
        for _ in range(5):
            await serving.score(query, None)
        calls = max(20, min(200, args.max_reps))
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(calls):
            await serving.score(query, None)
        profiler.disable()
        wall = time.perf_counter() - t0
    finally:
        serving.executor = pool
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(25)
    total = sum(v[2] for v in stats.stats.values())
    top = sorted(((v[2], v[3], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.stats.items()), reverse=True)[:15]
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text(text.getvalue())
    return {"candidates": 100, "history": n, "calls": calls, "ms_per_score": 1e3 * wall / calls,
            "file": str(args.profile),
            "top_tottime": [{"function": f, "tottime_ms_per_score": 1e3 * tt / calls, "share": tt / total,
                             "cumtime_ms_per_score": 1e3 * ct / calls} for tt, ct, f in top]}


def ratios(rows: list[dict], throughput: list[dict]) -> list[dict]:
    by = {(r["candidates"], r["history"], r["method"]): r for r in rows}
    tp = {(t["candidates"], t["history"], t["protocol"]): t["rps"] for t in throughput}
    out = []
    for c, n in sorted({(r["candidates"], r["history"]) for r in rows}, key=lambda k: (k[1], k[0])):
        fetch, model = by.get((c, n, "fetch")), by.get((c, n, "model"))
        if not fetch or not model:
            continue
        floor = fetch["p50_ms"] + model["p50_ms"]
        row = {"candidates": c, "history": n, "floor_p50_ms": floor}
        for m in ("inproc", "inproc:miss", "grpc", "rest"):
            if (c, n, m) in by:
                row[f"{m}_over_floor_p50"] = by[(c, n, m)]["p50_ms"] / floor
        for slow, fast in (("assemble:previous", "assemble"), ("model:previous", "model"), ("inproc:miss", "inproc")):
            if (c, n, slow) in by and (c, n, fast) in by:
                row[f"{slow}_over_{fast}_p50"] = by[(c, n, slow)]["p50_ms"] / by[(c, n, fast)]["p50_ms"]
        for key in list(by):
            if key[:2] == (c, n) and key[2].startswith("grpc:"):
                row[f"{key[2]}_over_floor_p50"] = by[key]["p50_ms"] / floor
                if (c, n, "grpc") in by:
                    row[f"{key[2]}_over_grpc_p50"] = by[key]["p50_ms"] / by[(c, n, "grpc")]["p50_ms"]
            if key[:2] == (c, n) and key[2].startswith("peer:"):
                name = key[2]
                for m in ("grpc", "rest"):
                    if (c, n, m) in by:
                        row[f"{name}_over_{m}_p50"] = by[key]["p50_ms"] / by[(c, n, m)]["p50_ms"]
                    if (c, n, m) in tp and (c, n, name) in tp:
                        row[f"{m}_over_{name}_throughput"] = tp[(c, n, m)] / max(tp[(c, n, name)], 1e-9)
        out.append(row)
    return out


def markdown(result: dict) -> str:
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tp = {(t["candidates"], t["history"], t["protocol"]): t for t in result["throughput"]}
    lines = ([machine_markdown(result["machine"]), ""] if result.get("machine") else []) + ["| C | n | " + " | ".join(f"{m} p50 / p95 / p99 ms" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    cells = {(r["candidates"], r["history"], r["method"]): r for r in rows}
    keys = sorted({(r["candidates"], r["history"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for c, n in keys:
        vals = [cells.get((c, n, m)) for m in methods]
        lines.append(f"| {c} | {n} | " + " | ".join(
            f"{v['p50_ms']:.2f} / {v['p95_ms']:.2f} / {v['p99_ms']:.2f}" if v else "-" for v in vals) + " |")
    if result["throughput"]:
        protocols = list(dict.fromkeys(t["protocol"] for t in result["throughput"]))
        conc = result["throughput"][0]["concurrency"]
        lines += ["", f"Throughput at saturation ({conc} requests in flight), req/s (p50 / p99 ms under that load):", "",
                  "| C | n | " + " | ".join(protocols) + " |", "|---|---|" + "---|" * len(protocols)]
        for c, n in keys:
            vals = [tp.get((c, n, p)) for p in protocols]
            lines.append(f"| {c} | {n} | " + " | ".join(
                f"{v['rps']:.1f} ({v.get('loaded_p50_ms', float('nan')):.0f} / {v.get('loaded_p99_ms', float('nan')):.0f})"
                if v else "-" for v in vals) + " |")
    if result.get("scaling"):
        lines += ["", scaling_markdown(result["scaling"])]
    if result.get("batching"):
        from harness.bench_batching import batching_markdown
        lines += ["", batching_markdown(result["batching"])]
    rat = result["ratios"]
    if rat:
        extra = sorted({k for r in rat for k in r if k not in ("candidates", "history", "floor_p50_ms")})
        lines += ["", "Ratios (same run): floor = p50(fetch) + p50(model).", "",
                  "| C | n | floor p50 ms | " + " | ".join(k.replace("_", " ") for k in extra) + " |",
                  "|---|---|---|" + "---|" * len(extra)]
        for r in rat:
            lines.append(f"| {r['candidates']} | {r['history']} | {r['floor_p50_ms']:.2f} | " + " | ".join(
                f"{r[k]:.2f}" if k in r else "-" for k in extra) + " |")
    return "\n".join(lines)


def default_quick_models() -> Path:
    return Settings().test_model_dir or Path("loadtests/out/models-quick")


def default_data_dir() -> Path:
    return Settings().movielens_dir


def run(args: argparse.Namespace) -> int:
    import torch

    from storage.connection import EmbeddedRedis

    torch.set_num_threads(args.threads)
    keep = Settings().malloc_keep_mb
    keep_freed_memory(keep)  # as every service process does
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or default_data_dir()
    if not (data_dir / "ml-100k.inter").is_file():
        print(f"--data-dir: MovieLens-100K not found at {data_dir}", file=sys.stderr)
        return 2
    if args.model_dir is not None:
        model_dir = args.model_dir
    else:
        model_dir = build_bench_models(args.quick_models or default_quick_models(), work / "models", args.history_len)
    workload = MovieLensWorkload(data_dir)
    embedded = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis(directory=(work / "redis").resolve()).start()
        url = embedded.url
    server = None
    methods = set(args.methods.split(","))
    # processes this run drives but did not start count as its own: a local Redis given by URL
    # (an embedded one is a child already), peers
    redis_pid = _local_redis_pid(url)
    machine = MachineSampler(also_own=[*args.peer_pid, *([redis_pid] if redis_pid else [])]).start()
    try:
        if methods & {"grpc", "rest"}:
            server = RankingProcess(model_dir, url, args.threads, args.runtime, work / "ranking.log",
                                    workers=_ints(args.workers, "workers")[0]).wait_ready(180)
        result = asyncio.run(_measure(args, model_dir, url, workload, server))
        if server:
            server.stop()
            server = None
        if len(_ints(args.workers, "workers")) > 1 and args.saturation_s > 0:
            result["scaling"] = scaling(args, model_dir, url, workload, result, redis_pid)
        if args.batch_wait_ms and args.saturation_s > 0:
            from harness.bench_batching import batching
            result["batching"] = batching(args, model_dir, url, workload)
    finally:
        machine.stop()
        if server:
            server.stop()
        if embedded is not None:
            embedded.stop()
    result["ratios"] = ratios(result["rows"], result["throughput"])
    result.update({
        "command": command_line("score", "harness.bench_ranking"),
        "torch": torch.__version__, "threads": args.threads, "malloc_keep_mb": keep, "cpus": os.cpu_count(),
        "python": platform.python_version(), "machine": platform.machine(),
        "redis": "embedded (unix socket)" if embedded is not None else "REDIS URL given",
        "model_dir": str(model_dir), "concurrency": args.concurrency, "machine": machine.summary(),
        "workers": args.workers, "batch_wait_ms": args.batch_wait_ms,
    })
    return emit(result, args.json_path, markdown)


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m harness.bench_ranking", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
