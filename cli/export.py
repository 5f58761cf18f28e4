"""`iat export --from RUN_DIR --out MODEL_DIR`: TorchScript + AOTInductor + manifest for each model
of a training run, as MODEL_DIR/<name>/<version>/ (see models/artifacts.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="run_dir", type=Path, required=True, help="run directory of `iat train`")
    parser.add_argument("--out", type=Path, required=True, help="model directory (IAT_MODEL_DIR)")
    parser.add_argument("--no-aoti", action="store_true",
                        help="skip the AOTInductor packages (TorchScript and eager only; faster)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda (cuda:N) or auto (CUDA when present): the device the AOTInductor "
                             "packages are compiled for, and the only one they run on (default auto, "
                             "as IAT_DEVICE); TorchScript and eager load on any device")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from contract.artifacts import ArtifactError
    from models.export import export_run
    from models.runtime.device import resolve_device

    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"iat export: --device: {exc}", file=sys.stderr)
        return 2
    try:
        written = export_run(args.run_dir, args.out, aoti=not args.no_aoti,
                             progress=lambda m: print(m, flush=True), device=device)
    except ArtifactError as exc:
        print(f"iat export: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0
