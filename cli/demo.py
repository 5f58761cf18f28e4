"""`iat demo`: the whole system on this machine in a few minutes (see services/demo.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding movielens-100k/ (default: $IAT_DATA_DIR or ../shared/data)")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic generator even if MovieLens is there")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="models, logs and Redis files (default runs/demo)")
    parser.add_argument("--max-users", type=int, default=300, help="users to train on and replay (default 300)")
    parser.add_argument("--full", action="store_true", help="full training settings instead of the quick ones (slower)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    parser.add_argument("--keep-running", action="store_true",
                        help="after the summary, keep the services up until Ctrl-C (to try grpcurl, curl, /metrics)")


def run(args: argparse.Namespace) -> int:
    from harness.demo import run_demo

    if args.max_users < 1:
        raise SystemExit("iat demo: --max-users must be >= 1")
    return run_demo(args.data_dir, args.out, args.max_users, quick=not args.full, synthetic=args.synthetic,
                    threads=args.threads, keep_running=args.keep_running)
