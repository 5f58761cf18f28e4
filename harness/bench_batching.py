"""Cross-request batching on and off, side by side (``iat bench score --batch-wait-ms 0,5``).

One real ``iat serve ranking`` per IAT_SCORE_BATCH_WAIT_MS value, all up at once on the same
store and model; for each candidate count and each concurrency (``--batch-concurrency``: requests
in flight, one gRPC connection per client thread, each thread its own candidates for user
``bench-h<n>`` at the largest n), the processes are driven at saturation in turn, in
``--batch-rounds`` short slices whose order alternates, so that a noisy neighbour weighs on every
setting alike. Per setting: req/s, latency under load, requests per forward (from the process's
``iat_ranking_score_batch_requests`` histogram) and the service's CPU per request; the ratios
are against the first wait value (0 = off).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from harness.bench_ranking import (
    REQUEST_TIME_MS,
    RankingProcess,
    _ints,
    _tree_cpu_seconds,
    percentiles,
    saturate,
    to_proto,
)


def _waits(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--batch-wait-ms: expected comma-separated numbers, got {text!r}") from None
    if len(values) < 2 or min(values) < 0:
        raise SystemExit(f"--batch-wait-ms: two or more values >= 0 (the first is the reference), got {text!r}")
    return values


def _batch_counts(server) -> tuple[float, float]:
    """(forwards, requests in them) of the process's cross-request batcher so far."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics", timeout=30).text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return (values.get("iat_ranking_score_batch_requests_count", 0.0),
            values.get("iat_ranking_score_batch_requests_sum", 0.0))


def _drive(server, messages: list, seconds: float) -> tuple[dict, list[float], float, float, float]:
    """One saturation slice: a client thread per message, each on its own connection, calling
    back to back. (saturate's figures, latencies s, forwards, requests in them, service CPU s)."""
    import grpc
    from iat.ranking.v1 import ranking_pb2_grpc

    channels = [grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in messages]
    stubs = [ranking_pb2_grpc.RankingServiceStub(ch) for ch in channels]
    for stub, message in zip(stubs, messages):  # connected before the clock starts
        stub.Score(message, timeout=120)
    local, lock, taken, lat = threading.local(), threading.Lock(), [0], []

    def call() -> None:
        k = getattr(local, "k", None)
        if k is None:  # each client thread keeps one connection and its own candidates
            with lock:
                local.k = k = taken[0]
                taken[0] += 1
        start = time.perf_counter()
        stubs[k].Score(messages[k], timeout=120)
        lat.append(time.perf_counter() - start)

    before, cpu = _batch_counts(server), _tree_cpu_seconds(server.proc.pid)
    try:
        sat = saturate(call, len(messages), seconds)
    finally:
        for ch in channels:
            ch.close()
    cpu = _tree_cpu_seconds(server.proc.pid) - cpu
    after = _batch_counts(server)
    return sat, lat, after[0] - before[0], after[1] - before[1], cpu


def batching(args, model_dir, redis_url: str, workload) -> list[dict]:
    waits = _waits(args.batch_wait_ms)
    concurrencies = _ints(args.batch_concurrency, "batch-concurrency")
    n = max(_ints(args.history, "history"))
    rounds = max(1, args.batch_rounds)
    slice_s = args.saturation_s / rounds
    servers = {}
    try:
        for i, w in enumerate(waits):  # a value may repeat: two processes alike show the noise
            servers[i] = RankingProcess(model_dir, redis_url, args.threads, args.runtime,
                                        args.work_dir / f"ranking-batch-{i}-{w:g}ms.log",
                                        extra_env={"IAT_SCORE_BATCH_WAIT_MS": str(w)})
        for server in servers.values():
            server.wait_ready(180)
        rng = np.random.default_rng(3)
        rows = []
        for c in _ints(args.candidates, "candidates"):
            messages = [to_proto(workload.request(f"bench-h{n}", REQUEST_TIME_MS, c, rng,
                                                  context_user=workload.user_ids[0], request_id=f"b-{c}-{k}"))
                        for k in range(max(concurrencies))]
            for conc in concurrencies:
                acc = {w: {"completed": 0, "errors": 0, "seconds": 0.0, "lat": [], "forwards": 0.0,
                           "batched": 0.0, "cpu": 0.0} for w in range(len(waits))}
                for r in range(rounds):
                    order = list(range(len(waits)))
                    for w in (order if r % 2 == 0 else order[::-1]):
                        a = acc[w]
                        sat, lat, forwards, batched, cpu = _drive(servers[w], messages[:conc], slice_s)
                        a["cpu"] += cpu
                        a["completed"] += sat["completed"]
                        a["errors"] += sat["errors"]
                        a["seconds"] += sat["seconds"]
                        a["lat"] += lat
                        a["forwards"] += forwards
                        a["batched"] += batched
                for i, w in enumerate(waits):
                    a = acc[i]
                    row = {"setting": i, "wait_ms": w, "candidates": c, "history": n, "concurrency": conc,
                           "rps": a["completed"] / a["seconds"], "completed": a["completed"], "errors": a["errors"],
                           "requests_per_forward": a["batched"] / a["forwards"] if a["forwards"] else 1.0,
                           "server_cpu_ms_per_request": 1e3 * a["cpu"] / max(a["completed"], 1)}
                    if a["lat"]:
                        row.update({f"loaded_{k}": v for k, v in percentiles(a["lat"]).items() if k != "n"})
                    rows.append(row)
                    print(f"batch wait {w:g} ms C={c:<4d} concurrency {conc:<3d}: {row['rps']:.1f} req/s, "
                          f"p50 {row.get('loaded_p50_ms', float('nan')):.1f} ms, "
                          f"{row['requests_per_forward']:.2f} requests / forward", flush=True)
        return rows
    finally:
        for server in servers.values():
            server.stop()


def batching_markdown(rows: list[dict]) -> str:
    waits = [w for _, w in sorted({(r["setting"], r["wait_ms"]) for r in rows})]
    ref = waits[0]
    by = {(r["setting"], r["candidates"], r["concurrency"]): r for r in rows}
    settings = " | ".join(f"wait {w:g} ms: req/s, p50 / p99 ms, requests / forward, CPU ms / request" for w in waits)
    ratios = " | ".join(f"req/s {w:g} / {ref:g} | p50 {w:g} / {ref:g}" for w in waits[1:])
    head = f"| C | n | in flight | {settings} | {ratios} |"
    title = (f"gRPC at saturation, one `iat serve ranking` per IAT_SCORE_BATCH_WAIT_MS, driven in turn "
             f"(alternating slices); ratios against wait {ref:g} ms.")
    lines = [title, "", head,
             "|---|---|---|" + "---|" * (len(waits) + 2 * (len(waits) - 1))]
    for c, conc in dict.fromkeys((r["candidates"], r["concurrency"]) for r in rows):
        cells = [by[(i, c, conc)] for i in range(len(waits))]
        base = cells[0]
        lines.append(f"| {c} | {base['history']} | {conc} | " + " | ".join(
            f"{r['rps']:.1f}, {r.get('loaded_p50_ms', float('nan')):.1f} / {r.get('loaded_p99_ms', float('nan')):.1f}, "
            f"{r['requests_per_forward']:.2f}, {r['server_cpu_ms_per_request']:.1f}" for r in cells) + " | " + " | ".join(
            f"{r['rps'] / base['rps']:.2f}x | {r.get('loaded_p50_ms', float('nan')) / base.get('loaded_p50_ms', float('nan')):.2f}x"
            for r in cells[1:]) + " |")
    return "\n".join(lines)
