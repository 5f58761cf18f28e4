"""Freshness of the online loop with real services (issue 17, loadtests/RESULTS.md):

(a) **instance ingested -> its InsEmb readable**: one instance per POST /v1/instances (labels
    left out), then GET ranking /v1/users/{id}/history?before_ms=ts+1 in a loop until its InsID
    is there (source embeds and stores it, the sequencer appends it to the user's sequence);
    the lag runs from just before the POST to the first read that shows it.
(b) **label arrived -> a model trained on it serving**: the labels of those instances, in
    stream order, POST /v1/labels in chunks of ``label_chunk`` every ``label_every_s``; the
    trainer joins them, trains (a step every ``batch`` instances) and publishes every
    ``publish_every`` instances; ranking reloads every ``reload_s``. A poller reads the
    trainer's ``/v1/stats`` (published[].instances) and ranking's served iat version
    (``iat_ranking_model_info``) every ``poll_s``. The trainer trains one partition in stream
    order and starts empty here, so instance k (0-based, posting order) is in the first version
    whose ``instances`` >= k + 1; its lag runs from just before its label's POST to the first
    poll that sees ranking serve that version (or a later one). The lag is dominated by
    ``publish_every`` (a version waits for that many labelled instances), the publish itself
    (export of both models) and ``reload_s``: they are printed with the figures.

    python -m harness.online_freshness --out runs/freshness
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np

from harness.demo import Processes, _sigterm_as_interrupt, pick_port
from harness.demo_online import served_ranking_versions
from harness.machine import MachineSampler, machine_markdown


def quantiles(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float) * 1000
    return {"n": int(len(v)), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
            "max_ms": float(v.max())}


class VersionPoller(threading.Thread):
    """Records when ranking first serves each iat version, and the trainer's published list."""

    def __init__(self, ranking_url: str, trainer_url: str, poll_s: float) -> None:
        super().__init__(daemon=True)
        self.ranking_url, self.trainer_url, self.poll_s = ranking_url, trainer_url, poll_s
        self.first_served: dict[str, float] = {}
        self.published: list[dict] = []
        self.trained = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                try:
                    iat = served_ranking_versions(http.get(self.ranking_url + "/metrics").text).get("iat")
                    now = time.monotonic()
                    if iat and iat not in self.first_served:
                        self.first_served[iat] = now
                    stats = http.get(self.trainer_url + "/v1/stats").json()
                    self.published, self.trained = stats["published"], stats["instances"]
                except httpx.HTTPError:
                    pass
                self.stop.wait(self.poll_s)


def main(argv: list[str] | None = None) -> int:
    import httpx

    from harness.online_replay import raw_for_rows, replay_rows, resolve_dataset
    from harness.processes import ensure_quick_models
    from models.data.prepared import load_dataset
    from storage.connection import EmbeddedRedis

    p = argparse.ArgumentParser(prog="python -m harness.online_freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/freshness"))
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--instances", type=int, default=1024, help="instances posted, then labelled")
    p.add_argument("--measured", type=int, default=300, help="of which posted one per POST and timed (a)")
    p.add_argument("--batch", type=int, default=64, help="IAT_TRAINER_BATCH_SIZE")
    p.add_argument("--publish-every", type=int, default=256, help="IAT_TRAINER_PUBLISH_EVERY")
    p.add_argument("--reload-s", type=float, default=0.5, help="IAT_RELOAD_INTERVAL_S (ranking, source)")
    p.add_argument("--label-chunk", type=int, default=32)
    p.add_argument("--label-every-s", type=float, default=0.25)
    p.add_argument("--poll-s", type=float, default=0.05)
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    schema, folder = resolve_dataset("movielens-100k", args.data_dir)
    model_dir = ensure_quick_models(out / "models", folder)
    data = load_dataset(schema, folder)
    rows = replay_rows(data, np.arange(300), "all")[-args.instances:]
    raw = raw_for_rows(schema, folder, data, rows)

    server = EmbeddedRedis(directory=out / "redis").start()
    (out / "logs").mkdir(exist_ok=True)
    shutil.rmtree(out / "trainer", ignore_errors=True)  # a fresh trainer: instance k is the k-th it trains
    procs = Processes(out / "logs")
    machine = MachineSampler()
    machine.start()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        ports = {n: pick_port(0) for n in ("ranking", "source", "sequencer", "trainer", "grpc")}
        env = {"REDIS_URL": server.url, "IAT_MODEL_DIR": str(model_dir), "IAT_RUNTIME": "torchscript",
               "IAT_RELOAD_INTERVAL_S": str(args.reload_s), "IAT_TORCH_THREADS": "1",
               "IAT_TRAINER_DIR": str(out / "trainer"), "IAT_TRAINER_BATCH_SIZE": str(args.batch),
               "IAT_TRAINER_PUBLISH_EVERY": str(args.publish_every), "IAT_TRAINER_PUBLISH_INTERVAL_S": "0",
               "IAT_TRAINER_FLUSH_S": "0.5", "IAT_TRAINER_HISTORY_LIMIT": "63"}
        procs.start("sequencer", ["serve", "sequencer"], env, ports["sequencer"])
        procs.start("source", ["serve", "source"], env, ports["source"])
        procs.start("ranking", ["serve", "ranking", "--grpc-port", str(ports["grpc"])], env, ports["ranking"])
        procs.start("trainer", ["serve", "trainer"], env, ports["trainer"])
        urls = {name: proc.wait("/readyz").base_url for name, proc in procs.procs.items()}
        with httpx.Client(timeout=60) as http:
            # (a) ingest -> readable. Timestamps are now (the label window counts from them)
            ingest_lag, posted = [], []
            for k, r in enumerate(raw):
                body = {key: v for key, v in r.items() if key != "labels"}
                body["timestamp_ms"] = int(time.time() * 1000)
                body["request_id"] = f"fresh-{k}"
                t0 = time.monotonic()
                response = http.post(urls["source"] + "/v1/instances", json={"instances": [body]})
                response.raise_for_status()
                ins = response.json()["ins_ids"][0]
                posted.append({"user_id": body["user_id"], "ins_id": ins, "labels": r["labels"]})
                if k < args.measured:
                    while True:
                        h = http.get(f"{urls['ranking']}/v1/users/{body['user_id']}/history",
                                     params={"before_ms": body["timestamp_ms"] + 1, "model": "iat"}).json()
                        if any(i["ins_id"] == ins for i in h["instances"]):
                            ingest_lag.append(time.monotonic() - t0)
                            break
                        time.sleep(0.001)
            # (b) label -> served. The poller runs from before the first label.
            poller = VersionPoller(urls["ranking"], urls["trainer"], args.poll_s)
            poller.start()
            label_at: list[float] = []
            for start in range(0, len(posted), args.label_chunk):
                chunk = posted[start:start + args.label_chunk]
                now_ms = int(time.time() * 1000)
                t = time.monotonic()
                response = http.post(urls["source"] + "/v1/labels", json={"updates": [
                    {**u, "arrival_ms": now_ms} for u in chunk]})
                response.raise_for_status()
                label_at += [t] * len(chunk)
                time.sleep(args.label_every_s)
            # until every labelled instance is trained and ranking serves the newest version
            # (the instances after it wait for more labels: they are not counted below)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if poller.trained >= len(posted) and poller.published and \
                        poller.published[-1]["versions"]["iat"] in poller.first_served:
                    break
                time.sleep(0.2)
            poller.stop.set()
            poller.join()
        served_at = poller.first_served
        label_lag, last_lag = [], []
        published = sorted(poller.published, key=lambda v: v["instances"])
        for k, t in enumerate(label_at):
            version = next((v for v in published if v["instances"] >= k + 1), None)
            if version is None:
                continue  # after the last full publish_every: never published
            later = [s for name, s in served_at.items() if name >= version["versions"]["iat"]]
            if later:
                label_lag.append(min(later) - t)
                if version["instances"] == k + 1:  # the label the version waited for last
                    last_lag.append(min(later) - t)
        machine.stop()
        result = {
            "machine": machine.summary(),
            "settings": {"batch": args.batch, "publish_every": args.publish_every, "reload_s": args.reload_s,
                         "label_chunk": args.label_chunk, "label_every_s": args.label_every_s,
                         "poll_s": args.poll_s, "instances": len(posted)},
            "ingest_to_readable": quantiles(ingest_lag),
            "label_to_serving": quantiles(label_lag) if label_lag else None,
            # the loop's own part: from the last label a version needed (train, publish, reload)
            "last_label_to_serving": quantiles(last_lag) if last_lag else None,
            "versions_published": len(published),
        }
        (out / "freshness.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
        print(machine_markdown(result["machine"]))
        return 0
    finally:
        procs.stop_all()
        server.stop()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
