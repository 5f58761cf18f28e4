"""`iat bench floor`: the model's forward against the machine's attainable arithmetic floor.

    iat bench floor --candidates 100,500 --history 256 --json floor.json

For each candidate count C (history L as given):
  FLOPs      counted by ``torch.utils.flop_counter.FlopCounterMode`` on the eager model's forward
             (matmuls and attention; elementwise ops count zero), split from two C values into the
             history side (once per request) and the per-candidate tower;
  GEMMs      every matrix product the forward runs (mm, addmm, bmm, baddbmm, and the two products
             of each scaled-dot-product attention), recorded with its shapes by a dispatch mode;
  attainable the same products, each shape timed alone in a tight loop on random data with the
             same torch threads: sum(FLOPs) / sum(time) is what this machine attains at the model's
             own shapes (small shapes are overhead-bound here exactly as in the model);
  forward    ``RankingModel.score`` p50 in the serving runtime (what `iat bench score` calls
             "model"), so forward / (FLOPs / attainable) says how far the forward is from the floor.

Model: as `iat bench score` builds it (default ``ModelConfig``, L = 256, random weights, the
MovieLens schema beside a quick export's source model), or ``--model-dir``'s ``iat`` as it is.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from harness.machine import MachineSampler, machine_markdown
from harness.reporting import command_line, emit
from services.allocator import keep_freed_memory
from services.config import Settings

GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an export whose latest iat model is measured (default: the bench model of `iat bench score`)")
    parser.add_argument("--quick-models", type=Path, default=None,
                        help="the quick export the bench model takes its source model and schema from "
                             "(default: $IAT_TEST_MODEL_DIR, else loadtests/out/models-quick)")
    parser.add_argument("--work-dir", type=Path, default=Path("loadtests/out/bench-floor"))
    parser.add_argument("--candidates", default="100,500")
    parser.add_argument("--history", type=int, default=256, help="stored history length n (capped at the model's L)")
    parser.add_argument("--runtime", default="torchscript", choices=("torchscript", "eager", "aoti"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the GEMMs and the forward")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed forwards per C")
    parser.add_argument("--gemm-budget", type=float, default=0.2, help="seconds per distinct GEMM shape (all rounds)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of (every GEMM shape, then the forward); forward / floor is the median of "
                             "the rounds' ratios")


def _attention(args) -> list[tuple[str, tuple[int, ...]]]:
    """scaled_dot_product_attention(q, k, v): the two batched products it stands for."""
    q, k, v = args[0], args[1], args[2]
    batch = int(np.prod(q.shape[:-2]))
    lq, e, lk, ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    return [("bmm", (batch, lq, e, lk)), ("bmm", (batch, lq, lk, ev))]


def _einsum(equation: str, a, b) -> list[tuple[str, tuple[int, ...]]]:
    """A two-operand einsum as the batched product it is: letters in both operands and the
    output are the batch, in both operands only the contraction, in one operand and the output
    the rows (first operand) or columns (second)."""
    ins, out = equation.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    size = {**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}

    def prod(letters) -> int:
        return int(np.prod([size[x] for x in letters])) if letters else 1

    batch = [x for x in sa if x in sb and x in out]
    k = [x for x in sa if x in sb and x not in out]
    m = [x for x in sa if x not in sb]
    n = [x for x in sb if x not in sa]
    return [("bmm", (prod(batch), prod(m), prod(k), prod(n)))]


def _products(name: str, args) -> list[tuple[str, tuple[int, ...]]]:
    """The matrix products of one aten call (composites such as linear and einsum reach a
    dispatch mode whole under inference mode)."""
    if name == "linear":
        x, w = args[0], args[1]
        bias = len(args) > 2 and args[2] is not None
        return [("addmm" if bias else "mm", (1, x.numel() // x.shape[-1], x.shape[-1], w.shape[0]))]
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return [(name, (1, a.shape[0], a.shape[1], b.shape[1]))]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return [(name, (a.shape[0], a.shape[1], a.shape[2], b.shape[2]))]
    if name == "einsum" and len(args[1]) == 2:
        return _einsum(args[0], *args[1])
    if name == "matmul" and args[0].dim() >= 2 and args[1].dim() >= 2:
        a, b = args[0], args[1]
        return [("bmm", (a.numel() // (a.shape[-2] * a.shape[-1]), a.shape[-2], a.shape[-1], b.shape[-1]))]
    if "scaled_dot_product" in name:
        return _attention(args)
    return []


def record_gemms(fn) -> Counter:
    """(op, (batch, m, k, n)) -> how many times ``fn()`` runs that product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: Counter = Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for key in _products(func.overloadpacket.__name__, args):
                seen[key] += 1
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return seen


def time_gemm(op: str, shape: tuple[int, ...], budget_s: float, clock=time.perf_counter) -> float:
    """Median seconds (of ``clock``) of one product of this shape, on random float32 data."""
    import torch

    batch, m, k, n = shape
    if op in ("mm", "addmm"):
        a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
        call = (lambda: torch.mm(a, b)) if op == "mm" else (lambda: torch.addmm(bias, a, b))
    else:
        a, b, bias = torch.randn(batch, m, k), torch.randn(batch, k, n), torch.randn(batch, m, n)
        call = (lambda: torch.bmm(a, b)) if op == "bmm" else (lambda: torch.baddbmm(bias, a, b))
    with torch.inference_mode():
        for _ in range(3):
            call()
        times = []
        stop = time.perf_counter() + budget_s
        while time.perf_counter() < stop or len(times) < 5:
            s = clock()
            call()
            times.append(clock() - s)
    return float(np.median(times))


def random_request(model, n: int, c: int, rng: np.random.Generator):
    """A history of n random InsEmbs and c random candidates in the model's schema: the
    arguments of ``RankingModel.score``."""
    from contract.history import History

    spec, t_req = model.feature_spec, 1_700_000_000_000
    history = History(rng.standard_normal((n, model.embedding_dim)).astype(np.float32),
                      rng.integers(0, 2, (n, len(model.tasks))).astype(np.int8),
                      rng.integers(0, spec.n_buckets, n), t_req - 60_000 * (1 + np.arange(n, dtype=np.int64)), None)
    cat = rng.integers(0, spec.n_buckets, (c, len(spec.cat_fields)))
    multi = np.full((c, len(spec.multi_fields), spec.max_multi), -1, dtype=np.int64)
    multi[:, :, 0] = rng.integers(0, spec.n_buckets, (c, len(spec.multi_fields)))
    num = rng.standard_normal((c, len(spec.num_fields))).astype(np.float32)
    return history, t_req, cat, multi, num


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.bench_ranking import build_bench_models, default_quick_models
    from harness.naive import naive_ranking_model
    from models.runtime.loader import latest_version, load_ranking_model

    torch.set_num_threads(args.threads)
    keep = Settings().malloc_keep_mb
    keep_freed_memory(keep)  # the forward runs as in the services (services/allocator.py)
    model_dir = args.model_dir or build_bench_models(args.quick_models or default_quick_models(), args.work_dir / "models")
    version = latest_version(model_dir, "iat")
    if version is None:
        print(f"no iat model under {model_dir}", file=sys.stderr)
        return 2
    eager = load_ranking_model(version, "eager", "cpu")
    served = load_ranking_model(version, args.runtime, "cpu")
    naive = naive_ranking_model(version)
    n = min(args.history, eager.max_history)
    rng = np.random.default_rng(0)
    cands = [int(c) for c in args.candidates.split(",") if c.strip()]
    rows, gemm_times = [], {}
    # One torch thread runs every op in the calling thread, so that thread's CPU time is the work
    # itself, which other processes on a shared machine do not inflate; with more, wall time.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    clock_name = "thread CPU time" if args.threads == 1 else "wall time"
    with MachineSampler() as machine:
        for c in cands:
            inputs = random_request(eager, args.history, c, rng)
            with FlopCounterMode(display=False) as counter:
                eager.score(*inputs)
            flops = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                naive.score(*inputs)
            naive_flops = counter.get_total_flops()
            gemms = record_gemms(lambda: eager.score(*inputs))
            gemm_flops = sum(2 * np.prod(shape) * k for (_, shape), k in gemms.items())
            for _ in range(3):
                served.score(*inputs)
            # Rounds, each timing every GEMM shape and then the forward: the machine's speed drifts
            # (a shared VM), so the ratio is taken within a round and the median over rounds kept.
            ratios, floors, times, walls = [], [], [], []
            for _ in range(args.rounds):
                round_gemm = {key: time_gemm(*key, args.gemm_budget / args.rounds, clock) for key in gemms}
                for key, t in round_gemm.items():
                    gemm_times[key] = min(gemm_times.get(key, t), t)
                floor_s = flops / (gemm_flops / sum(round_gemm[key] * k for key, k in gemms.items()))
                round_times = []
                stop = time.perf_counter() + args.budget / args.rounds
                while time.perf_counter() < stop or len(round_times) < 5:
                    s, w = clock(), time.perf_counter()
                    served.score(*inputs)
                    round_times.append(clock() - s)
                    walls.append(time.perf_counter() - w)
                times += round_times
                floors.append(floor_s)
                ratios.append(float(np.median(round_times)) / floor_s)
            forward = float(np.median(times))
            floor = float(np.median(floors))
            attainable = flops / floor
            gemm_seconds = gemm_flops / attainable
            rows.append({"candidates": c, "history": n, "flops": int(flops), "naive_flops": int(naive_flops),
                         "naive_over_shared_flops": naive_flops / flops, "gemm_flops": int(gemm_flops),
                         "gemm_calls": int(sum(gemms.values())), "gemm_shapes": len(gemms),
                         "gemm_seconds_ms": 1e3 * gemm_seconds, "attainable_gflops": attainable / 1e9,
                         "floor_ms": 1e3 * floor, "forward_p50_ms": 1e3 * forward, "forward_reps": len(times),
                         "forward_wall_p50_ms": 1e3 * float(np.median(walls)),
                         "forward_over_floor": float(np.median(ratios)), "forward_over_floor_rounds": ratios,
                         "forward_gflops": flops / forward / 1e9})
            print(f"C={c:<5d} L={n}: {flops / 1e6:.1f} MFLOP, attainable {attainable / 1e9:.1f} GFLOP/s at its "
                  f"{len(gemms)} GEMM shapes, floor {1e3 * floor:.2f} ms, forward p50 {1e3 * forward:.2f} ms "
                  f"({np.median(ratios):.2f}x, median of {args.rounds} rounds: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    peak = max(((2 * np.prod(shape)) / t / 1e9, op, shape) for (op, shape), t in gemm_times.items())
    split = None
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per_candidate = (b["flops"] - a["flops"]) / (b["candidates"] - a["candidates"])
        split = {"per_candidate_mflop": per_candidate / 1e6,
                 "history_side_mflop": (a["flops"] - per_candidate * a["candidates"]) / 1e6}
    result = {"command": command_line("floor", "harness.bench_floor"), "model_dir": str(model_dir),
              "model": {"version": served.version, "runtime": args.runtime, "max_history": served.max_history},
              "threads": args.threads, "malloc_keep_mb": keep, "clock": clock_name, "rows": rows, "flop_split": split,
              "peak_gemm": {"gflops": peak[0], "op": peak[1], "shape": list(map(int, peak[2]))},
              "machine": machine.summary()}
    return emit(result, args.json_path, markdown)


def _allocator(keep_mb: int) -> str:
    if keep_mb > 0:
        return f"freed memory kept mapped as in the services (IAT_MALLOC_KEEP_MB = {keep_mb})"
    return "glibc's default malloc thresholds (IAT_MALLOC_KEEP_MB = 0: freed activations unmapped)"


def markdown(result: dict) -> str:
    m = result["model"]
    lines = ([machine_markdown(result["machine"]), ""] if result.get("machine") else []) + [
             f"Model `iat` {m['version']} (L = {m['max_history']}), forward in {m['runtime']}, "
             f"{result['threads']} torch thread(s) for the forward and the GEMMs, both timed in "
             f"{result.get('clock', 'wall time')} (forward wall p50 beside it); " + _allocator(result.get("malloc_keep_mb", 0))
             + ". FLOPs by "
             "`torch.utils.flop_counter.FlopCounterMode` (eager forward); attainable = the forward's own GEMM "
             "shapes timed alone.", "",
             "| C | L | MFLOP (counter) | GEMM MFLOP (recorded shapes) | GEMM calls (shapes) | attainable GFLOP/s | "
             "floor ms = FLOPs / attainable | forward p50 ms | forward wall p50 ms | forward / floor (median of rounds) | "
             "forward GFLOP/s | "
             "naive peer MFLOP | naive / served FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['candidates']} | {r['history']} | {r['flops'] / 1e6:.1f} | {r['gemm_flops'] / 1e6:.1f} | "
                     f"{r['gemm_calls']} ({r['gemm_shapes']}) | "
                     f"{r['attainable_gflops']:.1f} | {r['floor_ms']:.2f} | {r['forward_p50_ms']:.2f} | "
                     f"{r.get('forward_wall_p50_ms', float('nan')):.2f} | "
                     f"{r['forward_over_floor']:.2f}x | {r['forward_gflops']:.1f} | "
                     + (f"{r['naive_flops'] / 1e6:.1f} | {r['naive_over_shared_flops']:.1f}x |"
                        if "naive_flops" in r else "- | - |"))
    split, peak = result.get("flop_split"), result["peak_gemm"]
    lines.append("")
    if split:
        lines.append(f"FLOPs split from the two C values: {split['per_candidate_mflop']:.3f} MFLOP per candidate, "
                     f"{split['history_side_mflop']:.1f} MFLOP once per request (history side).")
    lines.append(f"Best single GEMM at these shapes: {peak['gflops']:.1f} GFLOP/s ({peak['op']} "
                 f"batch x m x k x n = {' x '.join(map(str, peak['shape']))}).")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m harness.bench_floor", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
