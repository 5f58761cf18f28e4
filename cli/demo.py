"""`iat demo`: the whole system on this machine in a few minutes (harness/demo.py); with
``--online``, the online learning loop instead (harness/demo_online.py)."""
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
    online = parser.add_argument_group("--online: the online learning loop (trainer, published versions, hot reload)")
    online.add_argument("--online", action="store_true",
                        help="replay the period after training through source, sequencer, trainer and ranking")
    online.add_argument("--dataset", default="movielens-100k", help="--online: movielens-100k (default) or kuairand-pure")
    online.add_argument("--publish-every", type=int, default=1024,
                        help="--online: the trainer publishes a version every this many instances (default 1024, "
                             "8 steps of 128)")
    online.add_argument("--limit", type=int, default=None,
                        help="--online: replay at most this many instances (the earliest after training)")


def run(args: argparse.Namespace) -> int:
    from harness.demo import run_demo

    if args.max_users < 1:
        raise SystemExit("iat demo: --max-users must be >= 1")
    if args.online:
        from harness.demo_online import run_online_demo

        if args.publish_every < 1:
            raise SystemExit("iat demo: --publish-every must be >= 1")
        if args.limit is not None and args.limit < 1:
            raise SystemExit("iat demo: --limit must be >= 1")
        out = args.out if args.out != Path("runs/demo") else Path("runs/demo-online")
        return run_online_demo(args.data_dir, out, args.dataset, args.max_users, args.publish_every,
                               limit=args.limit, threads=args.threads)
    return run_demo(args.data_dir, args.out, args.max_users, quick=not args.full, synthetic=args.synthetic,
                    threads=args.threads, keep_running=args.keep_running)
