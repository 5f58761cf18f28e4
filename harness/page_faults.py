"""Minor page faults and CPU per forward, with and without ``IAT_MALLOC_KEEP_MB`` (services/allocator.py).

    python -m harness.page_faults --model-dir DIR --candidates 100,500 --keep-mb 0,256 --rounds 3

Each (setting, round) runs in a fresh interpreter, since malloc's thresholds are process-wide:
it loads the latest ``iat`` model of DIR in TorchScript, then runs forwards of C random
candidates over a full history (``iat bench floor``'s request) in ONE model-worker thread, as
the ranking service runs them, and reports the faults and the thread's CPU per forward after a
warm-up. Settings alternate within each round, so that the machine's drift hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _child(model_dir: str, keep_mb: int, candidates: int, warmup: int, forwards: int) -> dict:
    from services.allocator import keep_freed_memory, minor_page_faults

    kept = keep_freed_memory(keep_mb)  # first: before torch allocates anything
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from harness.bench_floor import random_request
    from models.runtime.loader import latest_version, load_ranking_model

    torch.set_num_threads(1)
    model = load_ranking_model(latest_version(model_dir, "iat"), "torchscript", "cpu")
    inputs = random_request(model, model.max_history, candidates, np.random.default_rng(0))

    def timed() -> float:
        start = time.thread_time()
        model.score(*inputs)
        return time.thread_time() - start

    with ThreadPoolExecutor(1, thread_name_prefix="model") as worker:
        for _ in range(warmup):
            worker.submit(model.score, *inputs).result()
        before = minor_page_faults()
        cpu = [worker.submit(timed).result() for _ in range(forwards)]
    return {"keep_mb": keep_mb, "kept": kept, "candidates": candidates,
            "faults_per_forward": (minor_page_faults() - before) / forwards,
            "cpu_ms_p50": 1e3 * float(np.median(cpu)), "forwards": forwards}


def measure(model_dir: Path, keep_mb: int, candidates: int, warmup: int = 10, forwards: int = 20) -> dict:
    """One fresh interpreter's figures (see the module docstring)."""
    cmd = [sys.executable, "-m", "harness.page_faults", "--child", "--model-dir", str(model_dir),
           "--keep-mb", str(keep_mb), "--candidates", str(candidates), "--warmup", str(warmup),
           "--forwards", str(forwards)]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.page_faults", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--candidates", default="100,500")
    parser.add_argument("--keep-mb", default="0,256", help="IAT_MALLOC_KEEP_MB values, alternated (0: glibc's defaults)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--forwards", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(str(args.model_dir), int(args.keep_mb), int(args.candidates), args.warmup,
                                args.forwards)))
        return 0
    rows = []
    for rnd in range(args.rounds):
        for c in (int(x) for x in args.candidates.split(",")):
            for keep in (int(x) for x in args.keep_mb.split(",")):
                row = {"round": rnd, **measure(args.model_dir, keep, c, args.warmup, args.forwards)}
                rows.append(row)
                print(f"round {rnd} C={c:<4d} IAT_MALLOC_KEEP_MB={keep:<4d} {row['faults_per_forward']:8.1f} faults "
                      f"/ forward, CPU p50 {row['cpu_ms_p50']:.2f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
