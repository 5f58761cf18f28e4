"""The end-to-end demo: train, export, serve, replay, score, and say what happened.

Everything runs on this machine with no Docker and no Redis install: an embedded redis-server,
the three services as real processes on loopback, real gRPC calls. The data is MovieLens-100K
when it is found (``--data-dir`` / ``IAT_DATA_DIR``), else the synthetic generator.

Evaluation: for every demo user with a held-out (test-period) instance they liked, one Score
request at the time of their first test-period instance, with 100 candidates: the liked item
and 99 items they had not rated before, sampled uniformly. Hit rate and NDCG at 10 of each
model against a popularity ranking (training-period counts) of the same candidates.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.processes import IAT, ServiceProcess
from services.config import Settings

N_CANDIDATES = 100
TOP_K = 10


def say(msg: str = "") -> None:
    print(msg, flush=True)


def pick_port(preferred: int) -> int:
    """The default port when free (the URLs people expect), else any free one."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free port")


@dataclass
class Processes:
    """Child processes of the demo, stopped on exit, Ctrl-C or SIGTERM."""

    log_dir: Path
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str], port: int) -> ServiceProcess:
        self.procs[name] = ServiceProcess(args, log_path=self.log_dir / f"{name}.log", env=env, http_port=port,
                                          new_session=True)
        return self.procs[name]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def _sigterm_as_interrupt(*_):
    raise KeyboardInterrupt


def histogram_quantiles(metrics_text: str, name: str, label: str, qs=(0.5, 0.99)) -> dict[str, dict[float, float]]:
    """Quantiles per label value from a Prometheus histogram's cumulative buckets (linear
    interpolation inside a bucket, as histogram_quantile does)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.setdefault(sample.labels[label], []).append((float(sample.labels["le"]), sample.value))
    out = {}
    for key, points in buckets.items():
        points.sort()
        total = points[-1][1]
        if not total:
            continue
        out[key] = {}
        for q in qs:
            rank, prev_le, prev_count = q * total, 0.0, 0.0
            for le, count in points:
                if count >= rank:
                    hi = le if le != float("inf") else prev_le
                    frac = (rank - prev_count) / (count - prev_count) if count > prev_count else 1.0
                    out[key][q] = prev_le + (hi - prev_le) * frac
                    break
                prev_le, prev_count = le, count
    return out


def ranking_metrics(scores: np.ndarray, positive: int = 0, k: int = TOP_K) -> tuple[float, float]:
    """(hit, ndcg) at k of the candidate at index ``positive`` (ties counted against it)."""
    rank = int(np.sum(scores > scores[positive])) + int(np.sum(scores[:positive] == scores[positive]))
    if rank >= k:
        return 0.0, 0.0
    return 1.0, 1.0 / float(np.log2(rank + 2))


def graded_metrics(scores: np.ndarray, relevance: np.ndarray, k: int = TOP_K) -> tuple[float, float]:
    """(precision, NDCG) at k of binary relevance under the ranking by ``scores``."""
    order = np.argsort(-scores, kind="stable")[:k]
    gains = relevance[order]
    discounts = 1.0 / np.log2(np.arange(2, len(order) + 2))
    ideal = np.sort(relevance)[::-1][:k]
    idcg = float(np.sum(ideal * discounts[:len(ideal)]))
    return float(gains.mean()), float(np.sum(gains * discounts) / idcg) if idcg else 0.0


def item_titles(schema, data_dir: Path) -> dict[str, str]:
    """Item id -> a readable title, when a side table of items has a title column."""
    from models.data.prepared import read_table

    for table in schema.tables:
        if table.key != schema.log.item:
            continue
        header, rows = read_table(data_dir / table.path, table.sep, table.path)
        title = next((c for c in header if "title" in c or c == "name"), None)
        if title:
            key, col = header.index(table.key), header.index(title)
            return {r[key]: r[col] for r in rows if len(r) > col}
    return {}


def run_demo(data_dir: Path | None, out_dir: Path, max_users: int, quick: bool, synthetic: bool,
             n_show: int = 3, threads: int = 2, keep_running: bool = False) -> int:
    import grpc
    import httpx
    from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc
    from tqdm import tqdm

    from harness.sequencing import service_stream, wait_sequenced
    from models.data.prepared import load_dataset
    from models.data.raw import raw_instances
    from models.data.schema import DatasetSchema, load_schema
    from models.data.synthetic import write_synthetic
    from models.training.registry import ExperimentConfig
    from models.training.serving_set import train_serving_set
    from storage.connection import EmbeddedRedis, connect

    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    ml_dir = (data_dir or Settings().data_dir) / "movielens-100k"
    if not synthetic and (ml_dir / "ml-100k.inter").exists():
        schema, data_dir = load_schema("movielens-100k"), ml_dir
    else:
        if not synthetic:
            say(f"MovieLens-100K not found at {ml_dir}: using the synthetic generator instead.")
        data_dir = out_dir / "synthetic-data"
        schema = DatasetSchema.from_toml(write_synthetic(data_dir))
    say(f"== 1/6 data: {schema.name} from {data_dir}")
    full = load_dataset(schema, data_dir)
    users = np.arange(min(max_users, full.n_users))
    data = full.subset_users(users)
    say(f"   {data.n:,} instances of {len(users)} users (of {full.n_users}), tasks {data.tasks}")

    say("== 2/6 training the serving set (user-order source + SIF tokenizer, IAT, SIF)")
    cfg = ExperimentConfig.quick() if quick else ExperimentConfig()
    cfg.threads = threads
    cfg.train.progress = sys.stderr.isatty()
    run_dir = train_serving_set(data, cfg, out_dir / "run", progress=lambda m: say("   " + m))

    say("== 3/6 exporting (TorchScript + manifest with sha256)")
    model_dir = out_dir / "models"
    subprocess.run(IAT + ["export", "--from", str(run_dir), "--out", str(model_dir), "--no-aoti"], check=True,
                   stdout=subprocess.DEVNULL)

    say("== 4/6 starting embedded Redis, sequencer, source and ranking")
    redis_server = EmbeddedRedis(directory=out_dir / "redis").start()
    procs = Processes(out_dir / "logs")
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        ports = {"ranking": pick_port(8000), "source": pick_port(8001), "sequencer": pick_port(8002),
                 "grpc": pick_port(50051)}
        env = {"REDIS_URL": redis_server.url, "IAT_MODEL_DIR": str(model_dir), "IAT_RUNTIME": "torchscript",
               "IAT_RELOAD_INTERVAL_S": "0"}
        procs.start("sequencer", ["serve", "sequencer"], env, ports["sequencer"])
        procs.start("source", ["serve", "source"], env, ports["source"])
        procs.start("ranking", ["serve", "ranking", "--grpc-port", str(ports["grpc"])], env, ports["ranking"])
        urls = {name: proc.wait("/readyz").base_url for name, proc in procs.procs.items()}
        say(f"   redis {redis_server.url}; gRPC 127.0.0.1:{ports['grpc']}; " +
            ", ".join(f"{n} {u}" for n, u in urls.items()))

        say("== 5/6 replaying the training and validation period through the source service")
        raw = raw_instances(schema, data_dir)
        keep = np.isin(full.user_index, users)
        replay_rows = np.flatnonzero(keep & (full.split < 2))
        client = connect(redis_server.url, cluster=False)
        stream = service_stream(client)  # every partition (IAT_STREAM_PARTITIONS)
        with httpx.Client(timeout=120) as http, tqdm(total=len(replay_rows), unit="inst", desc="   replay",
                                                      disable=None) as bar:
            for start in range(0, len(replay_rows), 512):
                batch = [raw[r] for r in replay_rows[start:start + 512]]
                response = http.post(urls["source"] + "/v1/instances", json={"instances": batch})
                response.raise_for_status()
                bar.update(len(batch))
                # keep the sequencer close behind, as live traffic would
                wait_sequenced(stream, at_most=2048, poll_s=0.01)
        wait_sequenced(stream)
        say(f"   {len(replay_rows):,} instances stored and sequenced")

        say("== 6/6 scoring held-out requests over gRPC")
        rng = np.random.default_rng(0)
        train_rows = np.flatnonzero(keep & (full.split == 0))
        popularity: dict[str, int] = {}
        for item in full.item_ids[train_rows]:
            popularity[item] = popularity.get(item, 0) + 1
        catalogue = np.array(sorted(popularity))
        item_features = {}
        for r in np.flatnonzero(keep):
            item_features.setdefault(raw[r]["item_id"], raw[r]["features"])
        like = data.tasks.index("like") if "like" in data.tasks else 0
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        user_keys = _user_feature_names(schema)
        results = {"iat": [], "sif": [], "popularity": []}
        rated = {"iat": [], "sif": [], "popularity": [], "random": []}
        latencies, shown = [], []
        test_rows = np.flatnonzero(keep & (full.split == 2))
        by_user: dict[int, list[int]] = {}
        for r in test_rows:
            by_user.setdefault(int(full.user_index[r]), []).append(int(r))
        def score(model: str, u: int, first: int, items: list[str]) -> tuple[np.ndarray, int]:
            context = {k: v for k, v in raw[first]["features"]["categorical"].items() if k in user_keys}
            request = ranking_pb2.ScoreRequest(
                request_id=f"demo-{u}-{model}", model=model, user_id=raw[first]["user_id"],
                request_time_ms=raw[first]["timestamp_ms"], context=ranking_pb2.Features(categorical=context),
                candidates=[ranking_pb2.Candidate(item_id=i, features=_item_only(item_features.get(i), user_keys))
                            for i in items])
            t0 = time.perf_counter()
            response = stub.Score(request, timeout=10)
            latencies.append(time.perf_counter() - t0)
            return np.array(response.scores, dtype=np.float32).reshape(len(items), -1)[:, like], response.history_length

        for u, rows in tqdm(sorted(by_user.items()), desc="   score", unit="user", disable=None):
            first = rows[0]
            # A: leave-one-out, the next liked item among 99 unseen items sampled uniformly
            liked = [r for r in rows if full.labels[r, like] > 0]
            seen = set(full.item_ids[(full.user_index == u) & (full.ts_ms < full.ts_ms[first])])
            pool = np.array([i for i in catalogue if i not in seen and liked and i != full.item_ids[liked[0]]])
            if liked and len(pool) >= N_CANDIDATES - 1:
                items = [str(full.item_ids[liked[0]])] + list(rng.choice(pool, N_CANDIDATES - 1, replace=False))
                for model in ("iat", "sif"):
                    scores, n_hist = score(model, u, first, items)
                    results[model].append(ranking_metrics(scores))
                    if model == "iat" and n_hist and len(shown) < n_show:
                        shown.append((raw[first]["user_id"], n_hist, items, scores,
                                      [(str(full.item_ids[r]), int(full.labels[r, like])) for r in rows[:5]]))
                results["popularity"].append(ranking_metrics(np.array([popularity.get(i, 0) for i in items], np.float32)))
            # B: the items the user really rated next, ranked; relevance = liked
            own = rows[:N_CANDIDATES]
            relevance = full.labels[own, like]
            if len(own) >= 2 * TOP_K and 0 < relevance.sum() < len(own):
                items = [str(full.item_ids[r]) for r in own]
                for model in ("iat", "sif"):
                    rated[model].append(graded_metrics(score(model, u, first, items)[0], relevance))
                rated["popularity"].append(graded_metrics(np.array([popularity.get(i, 0) for i in items], np.float32), relevance))
                rated["random"].append(graded_metrics(rng.random(len(items)).astype(np.float32), relevance))
        channel.close()
        metrics_text = httpx.get(urls["ranking"] + "/metrics").text
        _print_summary(schema, data_dir, results, rated, shown, latencies, metrics_text, urls, ports,
                       time.perf_counter() - t_start, out_dir, keep_running)
        if keep_running:
            say("services keep running: press Ctrl-C to stop them")
            while all(p.proc.poll() is None for p in procs.procs.values()):
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: stopping the services and Redis")
        return 130
    finally:
        procs.stop_all()
        redis_server.stop()
        signal.signal(signal.SIGTERM, previous)


def _user_feature_names(schema) -> set[str]:
    names = set(schema.log.categorical) | set(schema.log.numeric) | set(schema.log.multi)
    for table in schema.tables:
        if table.key == schema.log.user:
            names |= set(table.categorical) | set(table.numeric) | set(table.multi)
    return names


def _item_only(features: dict | None, user_keys: set[str]):
    from iat.ranking.v1 import ranking_pb2

    if not features:
        return ranking_pb2.Features()
    return ranking_pb2.Features(
        categorical={k: v for k, v in features["categorical"].items() if k not in user_keys},
        numeric={k: v for k, v in features["numeric"].items() if k not in user_keys})


def _print_summary(schema, data_dir, results, rated, shown, latencies, metrics_text, urls, ports, elapsed, out_dir,
                   keep_running=False):
    titles = item_titles(schema, data_dir)
    name = lambda i: f"{i} {titles[i]}" if i in titles else str(i)  # noqa: E731
    say()
    say("=" * 78)
    for user, n_hist, items, scores, actual in shown:
        say(f"user {user} ({n_hist} past instances in the store)")
        top = np.argsort(-scores, kind="stable")[:5]
        say("   IAT's top 5 of 100 candidates:")
        for rank, j in enumerate(top, 1):
            marker = "  <- rated it next" if j == 0 else ""
            say(f"     {rank}. {name(items[j])}  p(like)={scores[j]:.3f}{marker}")
        say("   what they actually rated next: " +
            "; ".join(f"{name(i)} ({'liked' if y else 'not liked'})" for i, y in actual[:3]))
        say()
    say(f"A. leave-one-out: {len(results['popularity'])} users; candidates = the next liked item + "
        f"{N_CANDIDATES - 1} unseen items sampled uniformly")
    say(f"   {'model':<12}{'HR@10':>8}{'NDCG@10':>10}")
    for model in ("iat", "sif", "popularity"):
        arr = np.array(results[model]) if results[model] else np.zeros((1, 2))
        say(f"   {model:<12}{arr[:, 0].mean():>8.3f}{arr[:, 1].mean():>10.3f}")
    say("   (random: HR@10 = 0.100. The models estimate p(like | the user rates the item); which item a")
    say("    user rates next is mostly popularity, so popularity wins this protocol by construction.)")
    say(f"B. ranking what the user really rated next: {len(rated['popularity'])} users; candidates = "
        f"their next {2 * TOP_K}-{N_CANDIDATES} rated items; relevant = liked")
    say(f"   {'model':<12}{'P@10':>8}{'NDCG@10':>10}")
    for model in ("iat", "sif", "popularity", "random"):
        arr = np.array(rated[model]) if rated[model] else np.zeros((1, 2))
        say(f"   {model:<12}{arr[:, 0].mean():>8.3f}{arr[:, 1].mean():>10.3f}")
    say()
    stages = histogram_quantiles(metrics_text, "iat_ranking_stage_seconds", "stage")
    say("latency per stage, server side (ms, from the Prometheus histograms):")
    for stage in ("fetch", "assemble", "model", "total"):
        if stage in stages:
            q = stages[stage]
            say(f"   {stage:<10} p50 {1000 * q[0.5]:7.2f}   p99 {1000 * q[0.99]:7.2f}")
    if latencies:
        lat = np.array(latencies) * 1000
        say(f"   gRPC round trip seen by the client: p50 {np.percentile(lat, 50):.2f}  "
            f"p99 {np.percentile(lat, 99):.2f}  ({len(lat)} calls)")
    say()
    say("Prometheus metrics: " + ", ".join(f"{u}/metrics" for u in urls.values()) +
        ("" if keep_running else "  (rerun with --keep-running to keep them up)"))
    say(f"gRPC Score on 127.0.0.1:{ports['grpc']} (reflection on: grpcurl -plaintext 127.0.0.1:{ports['grpc']} list)")
    say(f"models in {out_dir / 'models'}, service logs in {out_dir / 'logs'}")
    say(f"demo finished in {elapsed / 60:.1f} min" + ("." if keep_running else "; services and Redis are stopped now."))
