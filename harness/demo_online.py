"""`iat demo --online`: the online loop end to end on this machine, in a few minutes.

Train the serving set (quick) on a real dataset's training period, export it, start embedded
Redis and the four services (sequencer, source, ranking, trainer) as real processes, then replay
the period AFTER training (validation + test), in time order, through the source service
(harness/online_replay.py): the trainer trains on every instance, publishes a version every
``publish_every`` instances, and ranking and source hot-reload each one (reload interval
``RELOAD_INTERVAL_S``). The progressive AUC per model is shown while it runs; at the end, a
table, the plot beside the demo's output, and which versions ranking and source serve.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from harness.demo import Processes, _sigterm_as_interrupt, pick_port, say
from harness.processes import IAT

RELOAD_INTERVAL_S = 0.5
TRAINER_LR = 3e-4
PICKUP_DEADLINE_S = 180.0   # generous: 2 shared cores; the wait ends as soon as both serve it


def served_ranking_versions(metrics_text: str) -> dict[str, str]:
    """model -> version, from ranking's ``iat_ranking_model_info`` gauge (loaded models only)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "iat_ranking_model_info":
            for sample in family.samples:
                if sample.value == 1:
                    out[sample.labels["model"]] = sample.labels["version"]
    return out


def wait_pickup(http, urls: dict[str, str], versions: dict[str, str], deadline_s: float) -> dict[str, str]:
    """Until source's GET /v1/model and ranking's model info name ``versions`` (or the deadline):
    what each serves at the end."""
    end = time.monotonic() + deadline_s
    while True:
        served = {"source": http.get(urls["source"] + "/v1/model").json()["version"],
                  "iat": served_ranking_versions(http.get(urls["ranking"] + "/metrics").text).get("iat", "?")}
        if served == {k: versions[k] for k in ("source", "iat")} or time.monotonic() > end:
            return served
        time.sleep(0.2)


def run_online_demo(data_dir: Path | None, out_dir: Path, dataset: str, max_users: int, publish_every: int,
                    batch_size: int = 128, limit: int | None = None, threads: int = 2) -> int:
    import httpx
    import numpy as np

    from harness.online_replay import ReplayError, raw_for_rows, replay_rows, resolve_dataset, run_replay, table
    from harness.sequencing import service_stream, wait_sequenced
    from models.data.prepared import load_dataset
    from storage.connection import EmbeddedRedis, connect

    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    try:
        schema, folder = resolve_dataset(dataset, data_dir)
    except ReplayError as exc:
        say(f"iat demo --online: {exc}")
        return 2
    say(f"== 1/5 data: {schema.name} from {folder}")
    full = load_dataset(schema, folder)
    users = np.arange(min(max_users, full.n_users))
    rows = replay_rows(full, users, "after-train")[:limit]
    raw = raw_for_rows(schema, folder, full, rows)
    say(f"   {int(np.isin(full.user_index, users).sum()):,} instances of {len(users)} users; the {len(rows):,} "
        f"after the training period are replayed")

    say("== 2/5 training the serving set on the training period (quick) and exporting it")
    run_dir, model_dir = out_dir / "run", out_dir / "models"
    subprocess.run(IAT + ["train", "--dataset", schema.name, "--data-dir", str(folder), "--out", str(run_dir),
                          "--quick", "--epochs", "1", "--max-users", str(max_users), "--threads", str(threads),
                          "--no-progress"], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    subprocess.run(IAT + ["export", "--from", str(run_dir), "--out", str(model_dir), "--no-aoti"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    say("== 3/5 starting embedded Redis, sequencer, source, ranking and trainer")
    redis_server = EmbeddedRedis(directory=out_dir / "redis").start()
    procs = Processes(out_dir / "logs")
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        ports = {"ranking": pick_port(8000), "source": pick_port(8001), "sequencer": pick_port(8002),
                 "trainer": pick_port(8003), "grpc": pick_port(50051)}
        env = {"REDIS_URL": redis_server.url, "IAT_MODEL_DIR": str(model_dir), "IAT_RUNTIME": "torchscript",
               "IAT_RELOAD_INTERVAL_S": str(RELOAD_INTERVAL_S), "IAT_TORCH_THREADS": "1",
               "IAT_TRAINER_DIR": str(out_dir / "trainer"), "IAT_TRAINER_BATCH_SIZE": str(batch_size),
               "IAT_TRAINER_PUBLISH_EVERY": str(publish_every), "IAT_TRAINER_PUBLISH_INTERVAL_S": "0",
               "IAT_TRAINER_FLUSH_S": "1", "IAT_TRAINER_HISTORY_LIMIT": "63",
               # the rate models/RESULTS.md's online-vs-frozen replay supports (2e-3 dips first)
               "IAT_TRAINER_LR": str(TRAINER_LR)}
        procs.start("sequencer", ["serve", "sequencer"], env, ports["sequencer"])
        procs.start("source", ["serve", "source"], env, ports["source"])
        procs.start("ranking", ["serve", "ranking", "--grpc-port", str(ports["grpc"])], env, ports["ranking"])
        procs.start("trainer", ["serve", "trainer"], env, ports["trainer"])
        urls = {name: proc.wait("/readyz").base_url for name, proc in procs.procs.items()}
        say(f"   redis {redis_server.url}; " + ", ".join(f"{n} {u}" for n, u in urls.items()))
        say(f"   trainer: a step every {batch_size} instances (lr {TRAINER_LR:g}), a version every {publish_every}; "
            f"ranking and source reload every {RELOAD_INTERVAL_S}s")

        with httpx.Client(timeout=60) as http:
            before = {"source": http.get(urls["source"] + "/v1/model").json()["version"],
                      "iat": served_ranking_versions(http.get(urls["ranking"] + "/metrics").text).get("iat", "?")}
        say(f"   serving before the replay: source {before['source']}, iat {before['iat']}")

        say("== 4/5 replaying the period after training, in time order, through the loop")
        stream = service_stream(connect(redis_server.url, cluster=False))
        report = run_replay(raw, full.tasks, urls["source"], urls["trainer"], batch_size=256,
                            plot_path=out_dir / "progressive_auc.png", poll_s=0.5,
                            between_batches=lambda: wait_sequenced(stream, at_most=2048, poll_s=0.01))
        say(table(report))

        say("== 5/5 the published versions, served")
        if not report.published:
            say("   no version was published (fewer instances than --publish-every?)")
            return 1
        newest = report.published[-1]["versions"]
        with httpx.Client(timeout=60) as http:
            served = wait_pickup(http, urls, newest, PICKUP_DEADLINE_S)
        for model, service in (("source", "source (GET /v1/model)"), ("iat", "ranking (iat_ranking_model_info)")):
            ok = "the newest published" if served[model] == newest[model] else f"NOT the newest ({newest[model]})"
            say(f"   {service} serves {model} {served[model]}: {ok}")
        say(f"plot: {report.plot}")
        say(f"models in {model_dir}, service logs in {out_dir / 'logs'}")
        say(f"online demo finished in {(time.perf_counter() - t_start) / 60:.1f} min; services and Redis are stopped now.")
        return 0 if served == {k: newest[k] for k in ("source", "iat")} and report.complete else 1
    except KeyboardInterrupt:
        say("\ninterrupted: stopping the services and Redis")
        return 130
    finally:
        procs.stop_all()
        redis_server.stop()
        signal.signal(signal.SIGTERM, previous)
