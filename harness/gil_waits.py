"""How often a forward in a model thread waits for the GIL: ``RankingModel.score_prepared``
alone, and while another thread of the process runs Python without pause (what the ranking
service's event loop does under load). Each time the forward takes the GIL back it waits up to
the interpreter's switch interval (5 ms) for that thread to let go, so

    waits per forward ~= (time with the busy thread - time alone) / switch interval

``--unheld``: also with the tensors handed to TorchScript NOT held by a second C++ reference
(``models.runtime.loader._held_in_cpp`` replaced by a plain list), alternating with the served
code, so the two differ only in that. Usage:

    python -m harness.gil_waits --model-dir <bench model dir> [--candidates 100,500] [--unheld]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

from harness.reporting import command_line, emit


def _busy(stop: threading.Event) -> None:
    while not stop.is_set():
        x = 0
        for i in range(1000):
            x += i


def per_call_ms(fn, seconds: float, busy: bool) -> float:
    stop = threading.Event()
    spinner = threading.Thread(target=_busy, args=(stop,))
    if busy:
        spinner.start()
    calls, start = 0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds or not calls:
            fn()
            calls += 1
    finally:
        stop.set()
        if busy:
            spinner.join()
    return (time.perf_counter() - start) / calls * 1e3


def measure(model_dir: Path, candidates: list[int], history: int, seconds: float, rounds: int,
            unheld: bool) -> list[dict]:
    import torch

    from harness.bench_floor import random_request
    from models.runtime import loader
    from models.runtime.loader import latest_version, load_ranking_model

    torch.set_num_threads(1)
    model = load_ranking_model(latest_version(model_dir, "iat"), "torchscript", "cpu")
    switch_ms = sys.getswitchinterval() * 1e3
    held = loader._held_in_cpp
    variants = {"held": held, **({"unheld": list} if unheld else {})}
    out = []
    for c in candidates:
        h, t, cat, multi, num = random_request(model, history, c, np.random.default_rng(0))
        prepared = model.prepare(h, t)

        def score():
            model.score_prepared(prepared, t, cat, multi, num)

        times: dict[str, dict[str, list[float]]] = {v: {"alone": [], "busy": []} for v in variants}
        try:
            for _ in range(rounds):
                for name, fn in variants.items():
                    loader._held_in_cpp = fn
                    for _ in range(3):
                        score()
                    times[name]["alone"].append(per_call_ms(score, seconds, busy=False))
                    times[name]["busy"].append(per_call_ms(score, seconds, busy=True))
        finally:
            loader._held_in_cpp = held
        for name, t_ms in times.items():
            alone, busy = float(np.median(t_ms["alone"])), float(np.median(t_ms["busy"]))
            out.append({"candidates": c, "history": history, "inputs": name, "alone_ms": alone, "busy_ms": busy,
                        "waits_per_forward": (busy - alone) / switch_ms, "switch_interval_ms": switch_ms,
                        "rounds": rounds})
    return out


def markdown(result: dict) -> str:
    lines = ["| C | n | inputs | alone ms | with a Python-busy thread ms | GIL waits per forward |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['candidates']} | {r['history']} | {r['inputs']} | {r['alone_ms']:.2f} | {r['busy_ms']:.2f} "
              f"| {r['waits_per_forward']:.1f} |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--candidates", default="100,500")
    parser.add_argument("--history", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unheld", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = measure(args.model_dir, [int(c) for c in args.candidates.split(",")], args.history, args.seconds,
                   args.rounds, args.unheld)
    return emit({"command": command_line("gil_waits", "harness.gil_waits"), "rows": rows}, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
