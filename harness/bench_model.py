"""`iat bench model`: forward latency of the IAT ranking model per runtime, against the naive
model (every candidate re-encodes the sequence) and the previous formulation (the user side done
per candidate: ``harness.naive.IATPerCandidate``), measured in one run.

    iat bench model --json model.json            # same as: python -m harness.bench_model --json model.json

What is timed is ``RankingModel.score`` (numpy in, numpy out: truncation, padding, tensor
conversion and the forward), as the ranking service calls it. Shapes come from the synthetic
generator's schema and the experiment's default ``ModelConfig`` (L = 256); weights are random
(latency does not depend on them). The naive model has the same weights and the same call path;
only its forward re-encodes the history once per candidate. ``previous`` is the formulation
served before the user side was computed once per request, same weights, same call path.
``shared-reuse`` (eager) is ``RankingModel.score_prepared`` on a history prepared and encoded
by an earlier call: what a history-cache hit costs the model. Runtimes are interleaved
round-robin within each (candidates, history) cell so that a noisy neighbour hits all alike,
in an order that reverses every round (the first of a round finds colder caches).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CANDIDATES = (1, 100, 500, 1000)
HISTORIES = (0, 64, 256)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--runtimes", default="eager,torchscript,aoti",
                        help="comma-separated shared-model runtimes (default: all three)")
    parser.add_argument("--naive-runtimes", default="eager,torchscript",
                        help="runtimes of the naive (re-encode per candidate) model")
    parser.add_argument("--previous-runtimes", default="eager,torchscript",
                        help="runtimes of the previous formulation (user side per candidate)")
    parser.add_argument("--candidates", default=",".join(map(str, CANDIDATES)))
    parser.add_argument("--history", default=",".join(map(str, HISTORIES)))
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per runtime and cell")
    parser.add_argument("--max-reps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the exported model goes (default: temp)")


def _percentile(values, q):
    import numpy as np
    return float(np.percentile(np.asarray(values) * 1e3, q))


def build_bench_model(work: Path, aoti: bool, progress=print) -> Path:
    """An exported ``iat`` version dir with random weights and the default ModelConfig."""
    from dataclasses import asdict

    import torch

    from contract.artifacts import CONFIG_FILE, WEIGHTS_FILE, write_manifest
    from models.data.synthetic import synthetic_data
    from models.export import (
        AOTI_NAME,
        TORCHSCRIPT_NAME,
        export_aoti,
        export_torchscript,
        manifest_for,
    )
    from models.nn.base import FeatureShape, ModelConfig
    from models.runtime.featurizer import FeatureSpec
    from models.runtime.modules import IATRanking, common_config

    data = synthetic_data(work / "data", n_users=50, events_per_user=20)
    mc = ModelConfig()
    config = {**common_config("iat", FeatureShape.of(data), data.multi.shape[2],
                              data.cat_fields.index(data.item_field), data.tasks),
              "model_config": asdict(mc), "history_length": mc.history_len}
    torch.manual_seed(0)
    module = IATRanking(config).eval()
    version = work / "iat" / "20000101T000000-00000000"
    version.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), version / WEIGHTS_FILE)
    (version / CONFIG_FILE).write_text(json.dumps(config))
    export_torchscript(module, version / TORCHSCRIPT_NAME)
    if aoti:
        t0 = time.perf_counter()
        export_aoti(module, version / AOTI_NAME, mc.history_len)
        progress(f"AOTInductor compile: {time.perf_counter() - t0:.1f}s")
    run = {"feature_spec": FeatureSpec.from_prepared(data).to_json(), "dataset": "synthetic"}
    write_manifest(version, manifest_for("iat", version.name, "2000-01-01T00:00:00", config, run,
                                      "bench", {"aoti_device": "cpu"} if aoti else None))
    return version


def run(args: argparse.Namespace) -> int:
    import gc
    import tempfile

    import numpy as np
    import torch

    from contract.history import History
    from harness.naive import IATNaive, IATPerCandidate
    from models.export import example_inputs
    from models.runtime.loader import load_ranking_model

    from harness.machine import MachineSampler

    torch.set_num_threads(args.threads)
    machine = MachineSampler().start()
    runtimes = [r for r in args.runtimes.split(",") if r]
    naive_runtimes = [r for r in args.naive_runtimes.split(",") if r]
    previous_runtimes = [r for r in args.previous_runtimes.split(",") if r]
    cands = [int(c) for c in args.candidates.split(",")]
    hists = [int(h) for h in args.history.split(",")]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="iat-bench-model-"))
    version = build_bench_model(work, "aoti" in runtimes, progress=lambda m: print(m, flush=True))

    models = {("shared", rt): load_ranking_model(version, rt, "cpu") for rt in runtimes}
    config = json.loads((version / "config.json").read_text())
    weights = torch.load(version / "weights.pt", weights_only=True)
    for kind, cls, kind_runtimes in (("naive", IATNaive, naive_runtimes), ("previous", IATPerCandidate, previous_runtimes)):
        module = cls(config).eval()
        module.load_state_dict(weights)
        for rt in kind_runtimes:
            m = load_ranking_model(version, "eager", "cpu")  # same call path, that forward
            if rt == "torchscript":
                import warnings
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)  # static-size checks only
                    m._runner = torch.jit.trace(module, example_inputs(module), check_trace=False)
            else:
                m._runner = module
            m._split = None  # the whole forward every call, as exported
            m.runtime = rt
            models[(kind, rt)] = m
    reuse = models.get(("shared", "eager"))
    ref = models[("shared", runtimes[0])]
    spec, rng = ref.feature_spec, np.random.default_rng(0)
    t_req = 1_700_000_000_000
    results, max_diff = [], 0.0
    for n in hists:
        history = History(rng.standard_normal((n, ref.embedding_dim)).astype(np.float32),
                                rng.integers(0, 2, (n, len(ref.tasks))).astype(np.int8),
                                rng.integers(0, spec.n_buckets, n),
                                t_req - 60_000 * (1 + np.arange(n, dtype=np.int64)), None)
        for c in cands:
            cat = rng.integers(0, spec.n_buckets, (c, len(spec.cat_fields)))
            multi = np.full((c, len(spec.multi_fields), spec.max_multi), -1, dtype=np.int64)
            multi[:, :, 0] = rng.integers(0, spec.n_buckets, (c, len(spec.multi_fields)))
            num = rng.standard_normal((c, len(spec.num_fields))).astype(np.float32)
            call = {key: (lambda m=m: m.score(history, t_req, cat, multi, num)) for key, m in models.items()}
            if reuse is not None and reuse.reuses_user_state:
                prepared = reuse.prepare(history, t_req)
                call[("shared-reuse", "eager")] = lambda: reuse.score_prepared(prepared, t_req, cat, multi, num)
            outs = {key: f() for key, f in call.items()}  # warm-up, and parity of everything timed
            for _ in range(2):
                for f in call.values():
                    f()
            base = outs[("shared", runtimes[0])]
            max_diff = max(max_diff, *(float(np.abs(o - base).max()) for o in outs.values()))
            t0 = time.perf_counter()
            for f in call.values():
                f()
            per_round = time.perf_counter() - t0
            reps = int(min(args.max_reps, max(10, args.budget * len(call) / max(per_round, 1e-6))))
            timings = {key: [] for key in call}
            gc.collect()
            gc.disable()
            try:
                order = list(call.items())
                for i in range(reps):
                    # the order alternates: whoever runs first in a round finds colder caches
                    for key, f in (order if i % 2 == 0 else reversed(order)):
                        s = time.perf_counter()
                        f()
                        timings[key].append(time.perf_counter() - s)
            finally:
                gc.enable()
            for (kind, rt), ts in timings.items():
                results.append({"model": kind, "runtime": rt, "candidates": c, "history": n, "reps": len(ts),
                                "p50_ms": _percentile(ts, 50), "p99_ms": _percentile(ts, 99)})
            line = "  ".join(f"{k}/{rt} {_percentile(ts, 50):7.2f}" for (k, rt), ts in timings.items())
            print(f"C={c:<5d} n={n:<4d} p50 ms: {line}", flush=True)
    p50 = {(r["model"], r["runtime"], r["candidates"], r["history"]): r["p50_ms"] for r in results}
    speedups = [{"runtime": rt, "candidates": c, "history": n,
                 "naive_over_shared_p50": p50[("naive", rt, c, n)] / p50[("shared", rt, c, n)]}
                for rt in naive_runtimes if ("shared", rt, cands[0], hists[0]) in p50
                for n in hists for c in cands]
    machine.stop()
    previous = [{"runtime": rt, "candidates": c, "history": n,
                 "previous_over_shared_p50": p50[("previous", rt, c, n)] / p50[("shared", rt, c, n)],
                 **({"shared_over_reuse_p50": p50[("shared", rt, c, n)] / p50[("shared-reuse", rt, c, n)]}
                    if ("shared-reuse", rt, c, n) in p50 else {})}
                for rt in previous_runtimes if ("shared", rt, cands[0], hists[0]) in p50
                for n in hists for c in cands]
    out = {"command": "iat bench model " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "model"]
           else "python -m harness.bench_model " + " ".join(sys.argv[1:]),
           "torch": torch.__version__, "threads": args.threads, "device": "cpu",
           "model": {"name": "iat", "max_history": ref.max_history, **{k: config["model_config"][k] for k in
                     ("iat_width", "iat_layers", "iat_heads", "seq_len", "insemb_dim", "fi_blocks")}},
           "max_abs_diff_between_runtimes": max_diff, "results": results, "speedups": speedups,
           "previous": previous,
           "machine": machine.summary()}
    print(markdown(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def markdown(out: dict) -> str:
    from harness.machine import machine_markdown

    rows = out["results"]
    keys = sorted({(r["model"], r["runtime"]) for r in rows}, key=lambda k: (k[0] != "shared", k[1]))
    head = "| C | n | " + " | ".join(f"{m} {rt} p50 / p99 ms" for m, rt in keys) + " |"
    lines = ([machine_markdown(out["machine"]), ""] if out.get("machine") else []) + [head, "|" + "---|" * (2 + len(keys))]
    cells = {(r["model"], r["runtime"], r["candidates"], r["history"]): r for r in rows}
    for n in sorted({r["history"] for r in rows}):
        for c in sorted({r["candidates"] for r in rows}):
            vals = [cells.get((m, rt, c, n)) for m, rt in keys]
            lines.append(f"| {c} | {n} | " + " | ".join(
                f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f}" if v else "-" for v in vals) + " |")
    lines.append("")
    lines.append("| runtime | C | n | naive / shared (p50) |")
    lines.append("|---|---|---|---|")
    for s in out["speedups"]:
        lines.append(f"| {s['runtime']} | {s['candidates']} | {s['history']} | {s['naive_over_shared_p50']:.1f}x |")
    if out.get("previous"):
        lines += ["", "| runtime | C | n | previous / shared (p50) | shared / shared-reuse (p50) |", "|---|---|---|---|---|"]
        for s in out["previous"]:
            reuse = f"{s['shared_over_reuse_p50']:.2f}x" if "shared_over_reuse_p50" in s else "-"
            lines.append(f"| {s['runtime']} | {s['candidates']} | {s['history']} | "
                         f"{s['previous_over_shared_p50']:.2f}x | {reuse} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m harness.bench_model", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
