"""`iat train`: train the serving set (user-order source + SIF tokenizer, IAT downstream, SIF-Mixer)
with the experiment's default settings and write RUN_DIR for `iat export`. The source and IAT
downstream are trained by the `user_iat` row's code (the time-ordered protocol of
models/training/protocol.py), so the served model is the evaluated one.

    iat train --dataset movielens-100k --out runs/serving
    iat train --schema my.toml --data-dir DIR --out runs/x --quick
    iat train --synthetic --out runs/syn --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--schema", type=Path, help="dataset schema TOML (paths relative to --data-dir)")
    src.add_argument("--dataset", help="a schema shipped with the project (movielens-100k)")
    src.add_argument("--synthetic", action="store_true", help="train on the synthetic generator's data")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data directory (default: $IAT_DATA_DIR or ../shared/data)")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write")
    parser.add_argument("--quick", action="store_true", help="small/fast settings (ExperimentConfig.quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-users", type=int, default=None,
                        help="train on this many users only (the first by user id; for tests and demos)")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (early stopping on validation)")
    parser.add_argument("--batch-fraction", type=float, default=None,
                        help="source model's time-ordered pass: fraction of the training instances "
                             "(earliest by time) trained in batch form, the rest streams (default 0.5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from cli.experiment import load_named_dataset
    from models.data.schema import SchemaError
    from models.training.registry import ExperimentConfig
    from models.training.serving_set import train_serving_set

    if args.batch_fraction is not None and not 0.0 <= args.batch_fraction <= 1.0:
        print(f"iat train: --batch-fraction: must lie in [0, 1], got {args.batch_fraction}", file=sys.stderr)
        return 2
    try:
        _, data = load_named_dataset(args.schema, "synthetic" if args.synthetic else args.dataset,
                                     args.data_dir, args.out / "synthetic-data")
        if args.max_users is not None:
            if args.max_users < 1:
                raise SchemaError(f"--max-users: must be >= 1, got {args.max_users}")
            data = data.subset_users(np.arange(min(args.max_users, data.n_users)))
    except (SchemaError, FileNotFoundError) as exc:
        print(f"iat train: {exc}", file=sys.stderr)
        return 2
    cfg = ExperimentConfig.quick() if args.quick else ExperimentConfig()
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.batch_fraction is not None:
        cfg.batch_fraction = args.batch_fraction
    cfg.threads = args.threads
    cfg.train.progress = not args.no_progress
    n_users = len(np.unique(data.user_index))
    print(f"{data.name}: {data.n} instances, {n_users} users, tasks {data.tasks}", flush=True)
    train_serving_set(data, cfg, args.out, seed=args.seed, progress=lambda m: print(m, flush=True))
    return 0
