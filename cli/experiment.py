"""`iat experiment`: train and evaluate the offline model rows, write results.json + results.png.

    iat experiment --dataset movielens-100k --out runs/ml100k            # shipped schema
    iat experiment --schema my.toml --data-dir DIR --out runs/x --quick
    iat experiment --dataset synthetic --out runs/syn                    # generated data
    iat experiment --dataset synthetic-positive --out runs/pos           # the IAT controls
    iat experiment --dataset kuairand-pure --quick --users 3000 --out runs/kr
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from services.config import Settings

# What --quick runs, spelled out here because the CLI parses arguments without importing
# torch; tests/models/test_experiment.py checks them against ExperimentConfig.quick().
QUICK_EPOCHS = 1
QUICK_HISTORY_LEN = 32
QUICK_SEQ_LEN = 10
QUICK_SOURCE_WINDOW = 64
QUICK_SEEDS = 1
DEFAULT_SEEDS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--schema", type=Path, help="dataset schema TOML (paths relative to --data-dir)")
    src.add_argument("--dataset", help="a schema shipped with the project (movielens-100k, "
                                       "kuairand-pure), 'synthetic' for generated data with a planted "
                                       "sequential signal, or the IAT controls 'synthetic-positive' (past "
                                       "instances' features tell future labels) and 'synthetic-negative' "
                                       "(they do not)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data directory (default: $IAT_DATA_DIR or ../shared/data; a "
                             "sub-folder named after the dataset is tried too)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK_EPOCHS} epoch, downstream L {QUICK_HISTORY_LEN}, "
                             f"behaviour sequence {QUICK_SEQ_LEN}, source window {QUICK_SOURCE_WINDOW}, "
                             f"{QUICK_SEEDS} seed unless --seeds is given")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds (default {DEFAULT_SEEDS}; quick: {QUICK_SEEDS}); rows are compared "
                             "by paired differences over seeds with 95%% t-intervals")
    parser.add_argument("--users", type=int, default=None,
                        help="keep a random subset of this many users (seed 0), every row alike")
    parser.add_argument("--unknown-label-rate", type=float, default=None,
                        help="training-time rate of history labels shown as unknown (default "
                             "ModelConfig.unknown_label_rate)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated rows to run (default: all registered default rows)")
    parser.add_argument("--list-rows", action="store_true", help="list registered rows and exit")
    parser.add_argument("--history-len", type=int, default=None,
                        help=f"downstream L (default 256; quick {QUICK_HISTORY_LEN})")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (early stopping on validation)")
    parser.add_argument("--batch-fraction", type=float, default=None,
                        help="source models' time-ordered pass: fraction of the training instances "
                             "(earliest by time) trained in batch form, the rest streams (default 0.5)")
    parser.add_argument("--source-batch-size", type=int, default=None,
                        help="instances per optimiser step of the source models' pass (default: the "
                             "training batch size; quick: 256; smaller gives the single pass more steps)")
    parser.add_argument("--source-lr", type=float, default=None,
                        help="learning rate of the source models' pass (default: the training rate; quick: 1e-3)")
    parser.add_argument("--source-warmup-steps", type=int, default=None,
                        help="linear learning-rate warm-up of the source pass, in steps (default 50; the "
                             "user-order SIT does not train without one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--workers", type=int, default=2,
                        help="seeds trained in parallel processes (default 2: one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _resolve_data_dir(schema, data_dir: Path | None) -> Path:
    base = data_dir or Settings().data_dir
    for candidate in (base, base / schema.name):
        if (candidate / schema.log.path).is_file():
            return candidate
    raise FileNotFoundError(f"--data-dir: '{schema.log.path}' (log.path of schema {schema.name!r}) "
                            f"not found in {base} or {base / schema.name}")


def load_named_dataset(schema_path: Path | None, dataset: str | None, data_dir: Path | None,
                       synthetic_dir: Path):
    """The dataset a command names (``--schema FILE``, ``--dataset NAME`` or ``synthetic``, and
    ``--data-dir``) -> (schema, PreparedData). Raises SchemaError / FileNotFoundError."""
    from models.data.prepared import load_dataset
    from models.data.schema import DatasetSchema, load_schema
    from models.data.synthetic import CONTROLS, write_control, write_synthetic

    if dataset == "synthetic":
        data_dir = data_dir or synthetic_dir
        schema = DatasetSchema.from_toml(write_synthetic(data_dir))
    elif dataset in {f"synthetic-{kind}" for kind in CONTROLS}:
        data_dir = data_dir or synthetic_dir
        schema = DatasetSchema.from_toml(write_control(data_dir, dataset.split("-", 1)[1]))
    else:
        schema = DatasetSchema.from_toml(schema_path) if schema_path else load_schema(dataset or "movielens-100k")
        data_dir = _resolve_data_dir(schema, data_dir)
    return schema, load_dataset(schema, data_dir)


def run(args: argparse.Namespace) -> int:
    from models.data.schema import SchemaError
    from models.training.experiment import results_table, run_experiment, write_results
    from models.training.registry import ROWS, ExperimentConfig

    if args.list_rows:
        for name, spec in ROWS.items():
            print(f"{name:<30} {'(default) ' if spec.default else '          '}{spec.description}")
        return 0
    if args.seeds is not None and args.seeds < 1:
        print("iat experiment: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.users is not None and args.users < 1:
        print("iat experiment: --users must be >= 1", file=sys.stderr)
        return 2
    if args.unknown_label_rate is not None and not 0.0 <= args.unknown_label_rate < 1.0:
        print("iat experiment: --unknown-label-rate must lie in [0, 1)", file=sys.stderr)
        return 2
    if args.batch_fraction is not None and not 0.0 <= args.batch_fraction <= 1.0:
        print("iat experiment: --batch-fraction must lie in [0, 1]", file=sys.stderr)
        return 2
    if args.source_batch_size is not None and args.source_batch_size < 1:
        print("iat experiment: --source-batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.source_lr is not None and not args.source_lr > 0:
        print("iat experiment: --source-lr must be > 0", file=sys.stderr)
        return 2
    if args.source_warmup_steps is not None and args.source_warmup_steps < 0:
        print("iat experiment: --source-warmup-steps must be >= 0", file=sys.stderr)
        return 2
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    unknown = [r for r in rows or [] if r not in ROWS]
    if unknown:
        print(f"iat experiment: --rows: unknown {unknown}; registered: {sorted(ROWS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        schema, data = load_named_dataset(args.schema, args.dataset, args.data_dir, args.out / "synthetic-data")
    except (SchemaError, FileNotFoundError) as exc:
        print(f"iat experiment: {exc}", file=sys.stderr)
        return 2
    if args.users is not None:
        import numpy as np
        keep = np.random.default_rng(0).permutation(data.n_users)[: args.users]
        data = data.subset_users(np.sort(keep))
    cfg = ExperimentConfig.quick() if args.quick else ExperimentConfig()
    if args.unknown_label_rate is not None:
        cfg.model.unknown_label_rate = args.unknown_label_rate
    if args.history_len:
        cfg.model.history_len = args.history_len
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.batch_fraction is not None:
        cfg.batch_fraction = args.batch_fraction
    if args.source_batch_size is not None:
        cfg.source_batch_size = args.source_batch_size
    if args.source_lr is not None:
        cfg.source_lr = args.source_lr
    if args.source_warmup_steps is not None:
        cfg.source_warmup_steps = args.source_warmup_steps
    cfg.threads = args.threads
    cfg.workers = args.workers
    cfg.train.progress = not args.no_progress
    seeds = args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    n_users = len(set(data.user_index.tolist()))
    print(f"{data.name}: {data.n} instances, {n_users} users, tasks {data.tasks}, "
          f"split {[len(data.split_indices(s)) for s in (0, 1, 2)]}; seeds {seeds}", flush=True)
    results = run_experiment(data, cfg, rows, seeds)
    results["command"] = "iat experiment " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["experiment"] else None
    results["users"] = n_users
    results["users_subset"] = args.users  # None: every user of the dataset
    results["total_seconds"] = time.perf_counter() - t0
    json_path, png_path = write_results(results, args.out)
    print(results_table(results))
    print(f"wrote {json_path} and {png_path} in {results['total_seconds']:.0f}s")
    return 0


class RedisHistoryProvider:
    """``models.training.streaming.HistoryProvider`` on the instance store (storage/): the
    source models' time-ordered pass (``models.training.protocol``) writes each InsEmb to Redis
    and streaming training reads past InsEmbs back. With ``log_fetches``, ``fetches`` keeps
    (user, before_ms, ins_ids, timestamps_ms) of every history read, as the store returned it."""

    def __init__(self, store, source_version: str = "", log_fetches: bool = False):
        self.store = store
        self.source_version = source_version
        self.dim = store.layout.dim
        self.fetches: list[tuple] | None = [] if log_fetches else None

    def write(self, ins_ids, user_ids, ts_ms, embeddings) -> None:
        import numpy as np

        from storage.records import InstanceRecord

        embeddings = np.asarray(embeddings, dtype=np.float32)
        records = [InstanceRecord(ins_id=int(i), user_id=str(u), timestamp_ms=int(t), embedding=e,
                                  source_version=self.source_version)
                   for i, u, t, e in zip(ins_ids, user_ids, ts_ms, embeddings)]
        self.store.write_and_append(records)

    def fetch(self, user_ids, before_ms, limit):
        import numpy as np

        histories = self.store.read_histories([str(u) for u in user_ids], [int(t) for t in before_ms], limit)
        out = np.zeros((len(user_ids), limit, self.dim), dtype=np.float32)
        mask = np.zeros((len(user_ids), limit), dtype=bool)
        for b, history in enumerate(histories):
            n = min(len(history), limit)
            out[b, :n] = history.embeddings[:n]
            mask[b, :n] = True
            if self.fetches is not None:
                self.fetches.append((str(user_ids[b]), int(before_ms[b]), history.ins_ids[:n].copy(),
                                     history.timestamps_ms[:n].copy()))
        return out, mask
