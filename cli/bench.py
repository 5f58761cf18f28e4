"""`iat bench TARGET`: each layer benchmarks itself; this module only dispatches."""
from __future__ import annotations

import argparse
import importlib

from cli import is_unbuilt

# target -> module exposing add_arguments(parser) and run(args)
TARGETS: dict[str, tuple[str, str]] = {
    "store": ("harness.bench_store", "fused history read vs two round trips vs bare MGET"),
    "model": ("harness.bench_model", "model forward latency per runtime; shared vs naive history"),
    "ingest": ("harness.bench_source", "source service ingest throughput"),
    "score": ("harness.bench_ranking", "Score latency in process and over gRPC"),
    "floor": ("harness.bench_floor", "forward time against FLOPs / attainable GEMM throughput at the model's shapes"),
    "trainer": ("harness.bench_trainer", "online trainer throughput: one process against DDP trainers"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="target")
    for name, (module_name, help_text) in TARGETS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            importlib.import_module(module_name).add_arguments(p)
        except ModuleNotFoundError as exc:
            if not is_unbuilt(exc, module_name):
                raise
            p.set_defaults(_missing=True)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_missing", False):
        print(f"iat bench {args.target}: not available in this build yet")
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)
