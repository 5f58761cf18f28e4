"""`make bench`: run the served-path benchmarks and peers in one run, write loadtests/RESULTS.md.

    python -m loadtests.report --out loadtests/RESULTS.md

One loopback redis-server (TCP, since Feast's Redis store speaks TCP only) serves all of:
  1. ``iat bench score`` (in process, gRPC, REST, floor, saturation; the naive peer of
     ``harness/peers/naive_server.py`` timed alongside; a cProfile of one Score)
  2. ``iat bench floor`` (FLOPs, the attainable GEMM throughput at the model's shapes, the
     forward against them; the naive peer's FLOPs beside)
  3. ``iat bench ingest``
  4. the history fetch: our fused read against Feast's Redis online store
     (``harness/peers/feast_fetch.py`` in ``.venv-feast``) for the same users' embeddings,
     in alternating rounds (Feast set up once), the ratio taken per round: the VM's speed drifts
  5. the latest ``make loadtest`` summary, when there is one
The section between the markers below is replaced; the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

# Issue 18's cells: C = 100 and 500 at L = 256 (and n = 64 and 0 for the fetch and the peers),
# saturation at one and two workers.
DEFAULT_SCORE_ARGS = "--candidates 100,500 --history 0,64,256 --workers 1,2 --saturation-s 6"
DEFAULT_FLOOR_ARGS = "--candidates 100,500 --history 256"
REQUEST_TIME_MS = 1_700_000_000_000  # as iat bench score seeds its users (histories before it)
START, END = "<!-- iat bench report: start -->", "<!-- iat bench report: end -->"
REPO = Path(__file__).resolve().parent.parent


def _iat(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli import main; raise SystemExit(main())", *args]


def _start_naive(model_dir: Path, redis_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    from harness.bench_ranking import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "harness/peers/naive_server.py"), "--model-dir", str(model_dir),
                             "--redis-url", redis_url, "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"naive peer exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("naive peer not up")


def _model_and_store(redis_url: str, model_dir: Path):
    """The quick export's iat model and a store decoding its source model's records."""
    from models.runtime.loader import latest_version, load_ranking_model
    from services.config import Settings
    from services.ranking.registry import ModelRegistry
    from services.stores import instance_store, redis_client

    model = load_ranking_model(latest_version(model_dir, "iat"), "eager", "cpu")
    settings = Settings(redis_url=redis_url)
    return model, instance_store(redis_client(settings), settings, ModelRegistry(model_dir).record_layout(model))


def our_fetch(redis_url: str, model_dir: Path, users: list[str], iterations: int) -> list[dict]:
    """The fused read (what serving calls) of each user's newest L records, timed like Feast's."""
    model, store = _model_and_store(redis_url, model_dir)
    out = []
    for user in users:
        for _ in range(10):
            store.read_history(user, REQUEST_TIME_MS, model.max_history)
        times = np.empty(iterations)
        for k in range(iterations):
            s = time.perf_counter()
            store.read_history(user, REQUEST_TIME_MS, model.max_history)
            times[k] = time.perf_counter() - s
        ms = times * 1e3
        out.append({"user": user, "length": len(store.read_history(user, REQUEST_TIME_MS, model.max_history)),
                    "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                    "p99_ms": float(np.percentile(ms, 99)), "n": iterations, "gc_enabled": gc.isenabled()})
    return out


def histories_for_feast(redis_url: str, model_dir: Path, users: list[str], path: Path) -> None:
    model, store = _model_and_store(redis_url, model_dir)
    payload = []
    for user in users:
        h = store.read_history(user, REQUEST_TIME_MS, model.max_history)
        if not len(h):
            continue
        payload.append({"user_id": user, "ins_ids": [int(i) for i in h.ins_ids], "embeddings": h.embeddings.tolist()})
    path.write_text(json.dumps({"users": payload}))


def fetch_peer(args, redis, model_dir: Path, out: Path) -> dict:
    """Our read and Feast's in alternating rounds (ours, Feast, ours, Feast, ...; Feast set up
    once in its own process), so that each round's ratio compares reads a few seconds apart:
    the machine's speed drifts by up to 30% from one minute to the next."""
    users = [f"bench-h{n}" for n in (64, 256)]
    result: dict = {"rounds": []}
    feast_python = Path(args.feast_python)
    if not feast_python.exists():
        result["rounds"].append({"ours": our_fetch(redis.url, model_dir, users, args.fetch_iterations)})
        result["feast_error"] = f"{feast_python} not found (make bench creates .venv-feast with feast[redis])"
        return result
    histories_for_feast(redis.url, model_dir, users, out / "feast-input.json")
    cmd = [str(feast_python), str(REPO / "harness/peers/feast_fetch.py"), "--input", str(out / "feast-input.json"),
           "--redis", f"127.0.0.1:{redis.port}", "--iterations", str(args.fetch_iterations),
           "--rounds", str(args.fetch_rounds)]
    result["feast_command"] = " ".join(cmd)
    stderr = open(out / "feast.log", "w")
    peer = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        if peer.stdout.readline().strip() != "ready":
            peer.wait(60)
            result["feast_error"] = (out / "feast.log").read_text()[-2000:]
            return result
        for _ in range(args.fetch_rounds):
            ours = our_fetch(redis.url, model_dir, users, args.fetch_iterations)
            peer.stdin.write("go\n")
            peer.stdin.flush()
            line = peer.stdout.readline()
            if not line:
                result["feast_error"] = (out / "feast.log").read_text()[-2000:]
                break
            reply = json.loads(line)
            result["feast"] = reply["feast"]
            result["rounds"].append({"ours": ours, "feast": reply["results"]})
    finally:
        peer.stdin.close()
        try:
            peer.wait(60)
        except subprocess.TimeoutExpired:
            peer.kill()
        stderr.close()
    return result


def fetch_ratios(fetch: dict) -> list[dict]:
    """Per user: ours and Feast's p50 (median over rounds) and Feast / ours (median of the
    rounds' own ratios, with their range)."""
    if "ours_before" in fetch:  # results written before the rounds (ours, Feast once, ours)
        fetch = {"rounds": [{"ours": fetch[k], "feast": fetch.get("results", [])}
                            for k in ("ours_before", "ours_after") if k in fetch]}
    out = []
    users = [r["user"] for r in (fetch.get("rounds") or [{}])[0].get("ours", [])]
    for user in users:
        ours, feast, ratios, length = [], [], [], None
        for rnd in fetch.get("rounds", []):
            o = next((x for x in rnd.get("ours", []) if x["user"] == user), None)
            f = next((x for x in rnd.get("feast", []) if x["user"] == user), None)
            if o:
                ours.append(o["p50_ms"])
                length = o["length"]
            if f:
                feast.append(f["p50_ms"])
            if o and f:
                ratios.append(f["p50_ms"] / o["p50_ms"])
        out.append({"user": user, "length": length, "rounds": len(ratios),
                    "ours_p50_ms": float(np.median(ours)) if ours else None,
                    "feast_p50_ms": float(np.median(feast)) if feast else None,
                    "ratio": float(np.median(ratios)) if ratios else None,
                    "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None)})
    return out


# ---------------------------------------------------------------- rendering

def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def render(results: dict) -> str:
    from harness.bench_ranking import markdown as score_markdown
    from harness.machine import machine_markdown
    from harness.bench_source import markdown as ingest_markdown

    meta = results["meta"]
    score = results.get("score")
    machine = (machine_markdown(meta["machine"]) if meta.get("machine") else
               f"Machine: {meta['cpus']} CPUs, Python {meta['python']}, torch {meta.get('torch', '?')} "
               "(what else ran was not recorded by this run).")
    lines = [START, "## Served path: Score, ingest, peers (iat bench report)", "",
             f"Command: `{meta['command']}` ({meta['date']}). {machine} Every ratio below is from one run, "
             "methods interleaved. One loopback redis-server 6.2 over TCP for everything (Feast's Redis store "
             "speaks TCP only).", ""]
    if score:
        m = score["model"]
        lines += [f"### Score latency against its floor (`iat bench score`)", "",
                  f"`{score['command']}`", "",
                  f"Model: `{m['name']}` {m['version']} (max_history L = {m['max_history']}, runtime {m['runtime']}, "
                  "MovieLens-100K schema, default `ModelConfig`, RANDOM weights: the quick models have L = 64 and "
                  "latency does not depend on the weights), its source model from the quick export. "
                  f"torch threads {score['threads']} here and in the served process. Requests: real MovieLens "
                  "items with their features, user `bench-h<n>` with exactly n stored records. "
                  "Methods: fetch = fused read alone, assemble = featurization alone, model = forward alone, "
                  "inproc = `RankingServing.score`, grpc / rest = a real `iat serve ranking` on loopback, "
                  "peer:naive = `harness/peers/naive_server.py` (TorchScript `IATNaive` behind FastAPI, "
                  "history re-encoded per candidate; timed on fewer rounds).", "",
                  score_markdown({**score, "machine": None}), ""]
        floor = results.get("floor")
        if floor:
            from harness.bench_floor import markdown as floor_markdown
            lines += ["### The forward against the arithmetic floor (`iat bench floor`)", "", f"`{floor['command']}`", "",
                      floor_markdown({**floor, "machine": None}).lstrip("\n"), ""]
        lines += goals(results)
        prof = score.get("profile")
        if prof:
            lines += ["", f"### Profile of one Score (cProfile, in process, C = {prof['candidates']}, n = {prof['history']}, "
                      f"{prof['calls']} calls, model run inline)", "",
                      f"{prof['ms_per_score']:.2f} ms per Score under the profiler. Top functions by own time:", "",
                      "| function | own ms / Score | share | cumulative ms / Score |", "|---|---|---|---|"]
            for t in prof["top_tottime"][:10]:
                lines.append(f"| `{t['function']}` | {t['tottime_ms_per_score']:.3f} | {t['share']:.0%} | "
                             f"{t['cumtime_ms_per_score']:.3f} |")
            lines += ["", results.get("profile_notes", "")]
    ingest = results.get("ingest")
    if ingest:
        lines += ["", "### Ingest (`iat bench ingest`)", "", f"`{ingest['command']}`", "",
                  f"Source model of the quick export; {ingest['concurrency']} posts in flight for asgi/http; shares "
                  "of wall time from `Ingestor.timings` (store = history reads + record writes + stream entries; "
                  "framework = the rest: HTTP, pydantic, MicroBatcher, JSON).", "", ingest_markdown(ingest)]
    fetch = results.get("fetch")
    if fetch:
        lines += ["", "### History fetch: ours against Feast's Redis online store", ""]
        if "feast_command" in fetch:
            lines += [f"`{fetch['feast_command']}`", ""]
        lines += ["| user | L | rounds | ours p50 ms (median of rounds) | Feast p50 ms (median of rounds) | "
                  "Feast / ours p50 (median of the rounds' ratios) | per-round range |",
                  "|---|---|---|---|---|---|---|"]
        for r in fetch_ratios(fetch):
            lines.append(f"| {r['user']} | {r['length']} | {r['rounds']} | {_fmt(r['ours_p50_ms'])} | "
                         f"{_fmt(r['feast_p50_ms'])} | {_fmt(r['ratio'], 1)}x | "
                         f"{_fmt(r['ratio_min'], 1)}-{_fmt(r['ratio_max'], 1)}x |")
        if "feast_error" in fetch:
            lines += ["", f"Feast did not run: {fetch['feast_error']}"]
        else:
            lines += ["", f"Feast {fetch.get('feast')} (`feast[redis]` from PyPI in `.venv-feast`), entity `ins_id`, one "
                      "`Array(Float32)` feature, `get_online_features` for the user's L InsIDs (given: Feast has no "
                      "'sequence before t' read, our fused read finds them itself in the same round trip). Ours: "
                      "`InstanceStore.read_history` (redis-py + hiredis, one EVALSHA, numpy decode). GC enabled in both."]
    locust = results.get("locust")
    if locust:
        lines += ["", "### Load test (`make loadtest`)", "", f"`{locust['meta']['command']}` ->", "",
                  f"`{locust['meta']['locust_command']}`", "", locust["markdown"]]
    notes = results.get("notes")
    if notes:
        lines += ["", notes]
    lines += ["", END]
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """Issue 18's targets, each with the figure of this run and met / NOT met."""
    score = results["score"]
    rows = {(r["candidates"], r["history"], r["method"]): r for r in score["rows"]}
    ratios = {(r["candidates"], r["history"]): r for r in score.get("ratios", [])}
    n = max((r["history"] for r in score["ratios"]), default=0)
    cands = sorted({c for c, h in ratios if h == n})

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = ["Goals (issue 18), all from this run:", ""]
    for c in cands:
        r = ratios[(c, n)]
        if "grpc_over_floor_p50" in r:
            out.append(f"- gRPC Score p50 within 1.15x of the floor (fetch + forward), C = {c}, n = {n}: "
                       f"{r['grpc_over_floor_p50']:.2f}x ({verdict(r['grpc_over_floor_p50'] <= 1.15)}); "
                       f"in process {r.get('inproc_over_floor_p50', float('nan')):.2f}x, "
                       f"REST {r.get('rest_over_floor_p50', float('nan')):.2f}x.")
    for f in (results.get("floor") or {}).get("rows", []):
        out.append(f"- Forward within 1.5x of FLOPs / attainable GEMM throughput, C = {f['candidates']}: "
                   f"{f['forward_over_floor']:.2f}x ({verdict(f['forward_over_floor'] <= 1.5)}; "
                   f"{f['forward_p50_ms']:.2f} ms against {f['floor_ms']:.2f} ms).")
    scaling = score.get("scaling") or []
    for s in scaling:
        if "share_of_ceiling" in s:
            cpu = (f"; in CPU time the forward is {s['forward_share_of_server_cpu']:.0%} of the service's CPU per request"
                   if s.get("forward_share_of_server_cpu") else "")
            rest = (f"; the load generator used {s['load_generator_cpus']:.2f}, Redis {s['redis_cpus']:.2f}, "
                    f"idle {s['idle_cpus']:.2f}: {s['share_of_ceiling_left']:.0%} of the ceiling on the CPUs left"
                    if s.get("redis_cpus") is not None and s.get("share_of_ceiling_left") else "")
            out.append(f"- Saturation >= 80% of cores / forward, {s['workers']} worker(s), C = {s['candidates']}: "
                       f"{s['share_of_ceiling']:.0%} ({verdict(s['share_of_ceiling'] >= 0.8)}; {s['rps']:.1f} req/s, "
                       f"the service used {s['server_cpus']:.2f} of {s['cpus']} CPUs{rest}{cpu}).")
    by = {(s["workers"], s["candidates"]): s["rps"] for s in scaling}
    counts = sorted({s["workers"] for s in scaling})
    if len(counts) > 1:
        out.append(f"- Scaling from {counts[0]} to {counts[-1]} workers: " + ", ".join(
            f"C = {c}: {by[(counts[-1], c)] / by[(counts[0], c)]:.2f}x" for c in cands
            if (counts[0], c) in by and (counts[-1], c) in by) + ".")
    host = [r for (c, h, m), r in rows.items() if m == "assemble" and c == 500]
    if host:
        p50 = min(r["p50_ms"] for r in host)
        out.append(f"- Per-candidate host work (gRPC message to arrays) <= 0.3 ms per 500 candidates: p50 "
                   f"{p50:.2f} ms ({verdict(p50 <= 0.3)}).")
    for x in fetch_ratios(results.get("fetch") or {}):
        if x["ratio"] is not None and x["length"] in (64, 256):
            target = 15 if x["length"] == 256 else 10
            out.append(f"- History fetch against Feast >= {target}x at L = {x['length']}: ours {x['ours_p50_ms']:.2f} ms "
                       f"p50 vs Feast {x['feast_p50_ms']:.2f} ms, {x['rounds']} alternating rounds: {x['ratio']:.1f}x "
                       f"(rounds {x['ratio_min']:.1f}-{x['ratio_max']:.1f}x; {verdict(x['ratio'] >= target)}).")
    for c in cands:
        hit, miss = rows.get((c, n, "inproc")), rows.get((c, n, "inproc:miss"))
        if hit and miss:
            out.append(f"- History cache, C = {c}, n = {n}, in process: hit p50 {hit['p50_ms']:.2f} ms, miss "
                       f"{miss['p50_ms']:.2f} ms ({miss['p50_ms'] / hit['p50_ms']:.2f}x).")
    floors = {f["candidates"]: f for f in (results.get("floor") or {}).get("rows", [])}
    for c in cands:
        r = ratios[(c, n)]
        if "grpc_over_peer:naive_throughput" in r:
            flop = floors.get(c, {}).get("naive_over_shared_flops")
            out.append(f"- The naive peer (history re-encoded per candidate), C = {c}, n = {n}: gRPC throughput "
                       f"{r['grpc_over_peer:naive_throughput']:.1f}x the peer's"
                       + (f", against a FLOP ratio naive / served of {flop:.1f}x." if flop else "."))
    return out


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n\n" + section + "\n"
    path.write_text(text)


def attach_locust(results: dict, out: Path = Path("loadtests/out")) -> None:
    """The latest `make loadtest` summary, when there is one."""
    summary = out / "locust-summary.json"
    if summary.is_file():
        locust = json.loads(summary.read_text())
        md = out / "locust-summary.md"
        results["locust"] = {"meta": locust["meta"], "markdown": md.read_text() if md.is_file() else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("loadtests/RESULTS.md"))
    parser.add_argument("--work", type=Path, default=Path("loadtests/out/report"))
    parser.add_argument("--quick-models", type=Path, default=None)
    parser.add_argument("--score-args", default=DEFAULT_SCORE_ARGS,
                        help=f"arguments for iat bench score (default {DEFAULT_SCORE_ARGS!r})")
    parser.add_argument("--floor-args", default=DEFAULT_FLOOR_ARGS,
                        help=f"arguments for iat bench floor (default {DEFAULT_FLOOR_ARGS!r})")
    parser.add_argument("--ingest-args", default="", help="extra arguments for iat bench ingest")
    parser.add_argument("--feast-python", default=".venv-feast/bin/python")
    parser.add_argument("--fetch-iterations", type=int, default=300, help="reads per user per round, each side")
    parser.add_argument("--fetch-rounds", type=int, default=5, help="alternating rounds of our read and Feast's")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: score,naive,floor,ingest,fetch")
    parser.add_argument("--from-json", type=Path, default=None, help="only render a results JSON written before")
    parser.add_argument("--notes", type=Path, default=None, help="a markdown file appended to the section")
    args = parser.parse_args(argv)

    if args.from_json:
        results = json.loads(args.from_json.read_text())
        attach_locust(results)
        if args.notes:
            results["notes"] = args.notes.read_text()
        write_section(args.out, render(results))
        print(f"wrote {args.out}")
        return 0

    import torch

    from harness.bench_ranking import build_bench_models, default_quick_models
    from harness.machine import MachineSampler
    from storage.connection import EmbeddedRedis

    skip = set(filter(None, args.skip.split(",")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    quick = args.quick_models or default_quick_models()
    model_dir = build_bench_models(quick, work / "models")
    from harness.bench_ranking import free_port
    redis = EmbeddedRedis(directory=Path(tempfile.mkdtemp(prefix="iat-report-redis-")), port=free_port()).start()
    command = "python -m loadtests.report " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = {"meta": {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__}}
    naive = None
    machine = MachineSampler().start()
    try:
        if "score" not in skip:
            score_cmd = _iat("bench", "score", "--model-dir", str(model_dir), "--redis-url", redis.url,
                             "--json", str(work / "score.json"), "--profile", str(work / "profile.txt"),
                             "--work-dir", str(work / "score"), *shlex.split(args.score_args))
            if "naive" not in skip:
                naive = _start_naive(model_dir, redis.url, work / "naive.log")
                score_cmd += ["--peer", f"naive={naive[1]}/v1/score", "--peer-pid", str(naive[0].pid)]
            subprocess.run(score_cmd, check=True)
            results["score"] = json.loads((work / "score.json").read_text())
            results["score"]["command"] = "iat bench score " + " ".join(shlex.quote(a) for a in score_cmd[5:])
        if naive:
            naive[0].terminate()
            naive[0].wait(15)
            naive = None
        if "floor" not in skip:
            floor_cmd = _iat("bench", "floor", "--model-dir", str(model_dir), "--json", str(work / "floor.json"),
                             "--work-dir", str(work / "floor"), *shlex.split(args.floor_args))
            subprocess.run(floor_cmd, check=True)
            results["floor"] = json.loads((work / "floor.json").read_text())
            results["floor"]["command"] = "iat bench floor " + " ".join(shlex.quote(a) for a in floor_cmd[5:])
        if "ingest" not in skip:
            ingest_cmd = _iat("bench", "ingest", "--model-dir", str(quick), "--redis-url", redis.url,
                              "--json", str(work / "ingest.json"), "--work-dir", str(work / "ingest"),
                              *shlex.split(args.ingest_args))
            subprocess.run(ingest_cmd, check=True)
            results["ingest"] = json.loads((work / "ingest.json").read_text())
            results["ingest"]["command"] = "iat bench ingest " + " ".join(shlex.quote(a) for a in ingest_cmd[5:])
        if "fetch" not in skip and "score" not in skip:  # the users are the ones bench score seeded
            results["fetch"] = fetch_peer(args, redis, model_dir, work)
    finally:
        machine.stop()
        if naive:
            naive[0].kill()
        redis.stop()
    results["meta"]["machine"] = machine.summary()
    attach_locust(results)
    if args.notes:
        results["notes"] = args.notes.read_text()
    (work / "results.json").write_text(json.dumps(results, indent=2))
    write_section(args.out, render(results))
    print(f"wrote {args.out} (figures in {work / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
