"""The models/RESULTS.md result of issue 17: progressive AUC over a replay of the period after the
offline training period, online (the ``OnlineLearner`` training on) against the offline model
frozen at the start (lr = 0), from the same ``iat train`` run (models.training.online_eval).

    iat train --dataset kuairand-pure --quick --max-users 8000 --out runs/kr-offline --threads 1
    python -m harness.online_result --run runs/kr-offline --dataset kuairand-pure --max-users 8000 \
        --seeds 5 --lr 2e-3 3e-4 --out runs/kr-online
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import torch

    from harness.online_replay import resolve_dataset
    from models.data.prepared import load_dataset
    from models.training.online_eval import at_points, mean_interval, replay_curve

    p = argparse.ArgumentParser(prog="python -m harness.online_result", description=__doc__)
    p.add_argument("--run", type=Path, required=True, help="the `iat train` run directory (source/, iat/)")
    p.add_argument("--dataset", default="kuairand-pure")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--max-users", type=int, required=True, help="the same users as the training run")
    p.add_argument("--seeds", type=int, default=5, help="online runs (seeds 0..N-1); the frozen run is one")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--history-limit", type=int, default=63)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--lr", type=float, nargs="+", default=[3e-4],
                   help="the online runs' learning rates (default 3e-4, the trainer's); --seeds runs of each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="folder for curves.json, the plot and table.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    schema, folder = resolve_dataset(args.dataset, args.data_dir)
    data = load_dataset(schema, folder)
    data = data.subset_users(np.arange(min(args.max_users, data.n_users)))
    rows = np.flatnonzero(data.split != 0)  # validation + test: the period after training
    task = data.tasks[0]
    print(f"{data.name}: replaying {len(rows):,} instances of {args.max_users} users ({task})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    kw = dict(batch_size=args.batch_size, history_limit=args.history_limit, window=args.window, task=task)
    t0 = time.perf_counter()
    frozen = replay_curve(args.run, data, rows, lr=0.0, seed=0, **kw)
    print(f"frozen: overall AUC iat {frozen.overall_auc['iat']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    online: dict[float, list] = {}
    for lr in args.lr:
        online[lr] = []
        for seed in range(args.seeds):
            online[lr].append(replay_curve(args.run, data, rows, lr=lr, seed=seed, **kw))
            print(f"online lr {lr:g} seed {seed}: overall AUC iat {online[lr][-1].overall_auc['iat']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    (args.out / "curves.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "n_replay": int(len(rows)),
         "frozen": asdict(frozen), "online": {str(lr): [asdict(c) for c in cs] for lr, cs in online.items()}},
        default=float))

    n = len(rows)
    points = [int(n * f) for f in (0.25, 0.5, 0.75, 1.0)]
    lines = [f"| model ({task}) | " + " | ".join(f"window AUC at {q:,}" for q in points) + " | overall AUC |",
             "| --- |" + " --- |" * (len(points) + 1)]
    for model in ("iat", "source"):
        cells = [f"{v:.4f}" for v in at_points(frozen, points, model)]
        lines.append(f"| {model}, frozen (lr = 0) | " + " | ".join(cells) + f" | {frozen.overall_auc[model]:.4f} |")
        for lr, curves in online.items():
            per_point = np.array([at_points(c, points, model) for c in curves])
            cells = ["{:.4f} ± {:.4f}".format(*mean_interval(per_point[:, j])) for j in range(len(points))]
            overall = "{:.4f} ± {:.4f}".format(*mean_interval([c.overall_auc[model] for c in curves]))
            lines.append(f"| {model}, online lr {lr:g} ({len(curves)} seeds) | " + " | ".join(cells) + f" | {overall} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(frozen, online, args.out / "progressive_auc.png", f"{data.name}: progressive {task} AUC "
         f"(window {args.window}), the {n:,} instances after training")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


def plot(frozen, online: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4), dpi=80, sharey=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, model in zip(axes, ("iat", "source")):
        ax.plot(frozen.instances, frozen.window_auc[model], color="black", linewidth=1.2, label="frozen (lr = 0)")
        for color, (lr, curves) in zip(colors, online.items()):
            arr = np.array([c.window_auc[model] for c in curves])
            ax.plot(curves[0].instances, np.nanmean(arr, axis=0), color=color, linewidth=1,
                    label=f"online, lr {lr:g} (mean of {len(curves)})")
            if len(curves) > 1:
                ax.fill_between(curves[0].instances, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0),
                                color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{model} model", fontsize=9)
        ax.set_xlabel("instances replayed (time order)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("progressive AUC (sliding window)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
