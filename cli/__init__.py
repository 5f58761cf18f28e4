"""The `iat` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so that a
light command such as ``iat storage-cost`` does not pay for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "storage-cost": ("cli.storage_cost", "estimate InsEmb storage (IAT Eq. 12)"),
    "experiment": ("cli.experiment", "train and evaluate the paper's model rows offline"),
    "train": ("cli.train", "train the serving set of models"),
    "export": ("cli.export", "export trained models for serving"),
    "serve": ("cli.serve", "run a service: ranking, source or sequencer"),
    "demo": ("cli.demo", "run the end-to-end demo on embedded Redis"),
    "replay": ("cli.replay", "replay a dataset in time order through the running online loop"),
    "bench": ("cli.bench", "benchmarks: store, model, ingest, score"),
}


def is_unbuilt(exc: ModuleNotFoundError, module_name: str) -> bool:
    """True when the module itself (or a parent package of it) does not exist yet,
    as opposed to a missing dependency inside it, which must surface."""
    return exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + "."))


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iat",
        description="Train, export and serve IAT/SIF sequence-aware ranking models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<14}{h}" for n, (_, h) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top = _top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            top.print_help()
            return 0
        top.parse_args(argv[:1])  # exits with argparse's "invalid choice" message
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if is_unbuilt(exc, module_name):
            print(f"iat {name}: not available in this build yet", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"iat {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
