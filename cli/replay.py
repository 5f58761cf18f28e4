"""`iat replay`: replay a dataset's instances in time order through the running online loop
(source service -> stream -> `iat serve trainer`), with a progress bar of the trainer's
progressive AUC, a table and a plot at the end (harness/online_replay.py).

    iat serve source & iat serve sequencer & iat serve trainer &
    iat replay --dataset movielens-100k --max-users 300 --plot runs/replay/auc.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="movielens-100k", help="a shipped schema (movielens-100k, kuairand-pure)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $IAT_DATA_DIR or ../shared/data")
    parser.add_argument("--source", default="http://127.0.0.1:8001", help="the source service's base URL")
    parser.add_argument("--trainer", default="http://127.0.0.1:8003", help="the trainer's base URL")
    parser.add_argument("--max-users", type=int, default=300, help="replay the first this many users (default 300)")
    parser.add_argument("--period", choices=("after-train", "all"), default="after-train",
                        help="after-train: the validation + test period (default); all: every instance")
    parser.add_argument("--limit", type=int, default=None, help="at most this many instances (the earliest)")
    parser.add_argument("--batch-size", type=int, default=256, help="instances per POST /v1/instances")
    parser.add_argument("--late-labels", action="store_true",
                        help="post instances without labels, then POST /v1/labels label-delay-s later (event time)")
    parser.add_argument("--label-delay-s", type=float, default=None, help="default: the schema's label_delay_s")
    parser.add_argument("--wait-s", type=float, default=600.0, help="how long to wait for the trainer at the end")
    parser.add_argument("--poll-s", type=float, default=1.0, help="how often to read the trainer's /v1/stats")
    parser.add_argument("--plot", type=Path, default=Path("runs/replay/progressive_auc.png"), help="PNG to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import httpx
    import numpy as np

    from harness.online_replay import (
        ReplayError, raw_for_rows, replay_rows, resolve_dataset, run_replay, table, trainer_stats)
    from models.data.prepared import load_dataset

    try:
        if args.max_users < 1:
            raise ReplayError(f"--max-users: must be >= 1, got {args.max_users}")
        if args.limit is not None and args.limit < 1:
            raise ReplayError(f"--limit: must be >= 1, got {args.limit}")
        if args.label_delay_s is not None and args.label_delay_s < 0:
            raise ReplayError(f"--label-delay-s: must be >= 0, got {args.label_delay_s}")
        schema, folder = resolve_dataset(args.dataset, args.data_dir)
        with httpx.Client() as http:  # fail fast, before loading the data
            trainer_stats(http, args.trainer.rstrip("/"))
        data = load_dataset(schema, folder)
        rows = replay_rows(data, np.arange(min(args.max_users, data.n_users)), args.period)[:args.limit]
        if not len(rows):
            raise ReplayError(f"--dataset {args.dataset}: no instances in period {args.period!r} for these users")
        raw = raw_for_rows(schema, folder, data, rows)
        delay_s = schema.label_delay_ms / 1000 if args.label_delay_s is None else args.label_delay_s
        print(f"replaying {len(raw):,} instances of {data.name} ({args.period}) to {args.source}; "
              f"trainer {args.trainer}", flush=True)
        report = run_replay(raw, data.tasks, args.source.rstrip("/"), args.trainer.rstrip("/"), args.batch_size,
                            late_labels=args.late_labels, label_delay_ms=round(delay_s * 1000), wait_s=args.wait_s,
                            poll_s=args.poll_s, plot_path=args.plot, progress=False if args.no_progress else None)
    except ReplayError as exc:
        print(f"iat replay: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    print(f"plot: {report.plot}")
    return 0 if report.complete else 1
