"""`iat replay`: a dataset's instances, in time order, through the running online loop.

POST /v1/instances to the source service in batches (with their labels, or without them and then
POST /v1/labels once the replay's event clock is ``label_delay_s`` past each instance: late
labels), while polling the trainer's ``/v1/stats``. A tqdm bar counts the instances posted; its
postfix shows the trainer's progressive AUC per model for the first task and the versions it
has published. At the end (once the trainer has trained every accepted instance, or the wait is
over) a table of the polled points, and a PNG plot of progressive AUC vs instances trained with
the publish points marked.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODELS = ("source", "iat")


class ReplayError(Exception):
    """The replay cannot run: no trainer or source reachable, a bad dataset or argument."""


def resolve_dataset(name: str, data_dir: Path | None):
    """(schema, folder) of a shipped dataset schema under ``data_dir`` (or ``data_dir/name``)."""
    from models.data.schema import SchemaError, load_schema
    from services.config import Settings

    try:
        schema = load_schema(name)
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        raise ReplayError(f"--dataset: {exc}") from exc
    base = Path(data_dir) if data_dir else Settings().data_dir
    for folder in (base, base / schema.name):
        if (folder / schema.log.path).is_file():
            return schema, folder
    raise ReplayError(f"--dataset {name}: '{schema.log.path}' not found in {base} or {base / schema.name} "
                      "(set --data-dir or IAT_DATA_DIR)")


def replay_rows(data, users: np.ndarray, period: str) -> np.ndarray:
    """Rows of ``users`` in ``period`` ("after-train": validation + test; "all"), in time order."""
    from models.training.protocol import time_order

    keep = np.isin(data.user_index, users)
    if period == "after-train":
        keep &= data.split != 0
    elif period != "all":
        raise ReplayError(f"--period: 'after-train' or 'all', got {period!r}")
    return time_order(data, np.flatnonzero(keep))


def raw_for_rows(schema, folder: Path, data, rows: np.ndarray) -> list[dict]:
    """The POST /v1/instances body of each of ``rows`` (matched by InsID, so a deduplicated
    log's rows still find theirs), in the order of ``rows``."""
    from models.data.raw import raw_instances
    from models.runtime.hashing import ins_id

    wanted = {int(i): k for k, i in enumerate(data.ins_id[rows])}
    out: list[dict | None] = [None] * len(rows)
    for r in raw_instances(schema, folder):
        k = wanted.get(ins_id(r["request_id"], r["item_id"], r["timestamp_ms"]))
        if k is not None:
            out[k] = r
    missing = sum(r is None for r in out)
    if missing:
        raise ReplayError(f"--dataset {schema.name}: {missing} rows have no raw instance (a loader mismatch)")
    return out


@dataclass
class Point:
    at_s: float
    instances: int
    auc: dict[str, float]          # model -> window AUC of the first task (NaN: not yet)
    logloss: dict[str, float]
    published: int


@dataclass
class ReplayReport:
    task: str
    posted: int = 0
    accepted: int = 0
    labels_posted: int = 0
    start_instances: int = 0
    points: list[Point] = field(default_factory=list)
    published: list[dict] = field(default_factory=list)   # the trainer's, published during the replay
    complete: bool = False
    seconds: float = 0.0
    plot: Path | None = None

    @property
    def trained(self) -> int:
        return (self.points[-1].instances if self.points else self.start_instances) - self.start_instances


def trainer_stats(http, trainer_url: str) -> dict:
    import httpx

    try:
        response = http.get(trainer_url + "/v1/stats", timeout=30)
    except httpx.HTTPError as exc:
        raise ReplayError(f"no trainer reachable at {trainer_url} ({type(exc).__name__}: {exc}); "
                          "start one with `iat serve trainer` or pass --trainer") from exc
    if response.status_code != 200:
        raise ReplayError(f"trainer at {trainer_url}: GET /v1/stats answered {response.status_code}: "
                          f"{response.text[:200]}")
    return response.json()


def _point(stats: dict, task: str, t0: float) -> Point:
    prog = stats.get("progressive", {})
    get = lambda m, k: float(prog.get(m, {}).get(task, {}).get(k, math.nan))  # noqa: E731
    return Point(time.monotonic() - t0, int(stats["instances"]), {m: get(m, "auc") for m in MODELS},
                 {m: get(m, "logloss") for m in MODELS}, len(stats.get("published", [])))


def _postfix(p: Point, versions: int) -> str:
    fmt = lambda v: "  -  " if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    return f"trained {p.instances:,} auc iat {fmt(p.auc['iat'])} source {fmt(p.auc['source'])} versions {versions}"


def run_replay(raw: list[dict], tasks: list[str], source_url: str, trainer_url: str, batch_size: int = 256,
               late_labels: bool = False, label_delay_ms: int = 0, wait_s: float = 600.0,
               poll_s: float = 1.0, plot_path: Path | None = None, progress: bool | None = None,
               between_batches=None) -> ReplayReport:
    """Post ``raw`` (instances in time order) and follow the trainer (module docstring).
    ``between_batches()`` runs after each POST (the demo keeps the sequencer close behind)."""
    import httpx
    from tqdm import tqdm

    if batch_size < 1:
        raise ReplayError(f"--batch-size: must be >= 1, got {batch_size}")
    task = tasks[0]
    report = ReplayReport(task=task)
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as http:
        first = trainer_stats(http, trainer_url)
        report.start_instances = int(first["instances"])
        known = len(first.get("published", []))
        start_published = {p["ordinal"] for p in first.get("published", [])}
        report.points.append(_point(first, task, t0))
        pending: list[tuple[int, dict]] = []    # (labels due at event time ms, label update)
        last_poll = 0.0
        # progress None: a bar only on a terminal (CI logs stay clean)
        with tqdm(total=len(raw), unit="inst", desc="replay", disable=None if progress is None else not progress,
                  file=sys.stderr) as bar:
            for start in range(0, len(raw), batch_size):
                batch = raw[start:start + batch_size]
                if late_labels:
                    now_ms = batch[0]["timestamp_ms"]
                    due = [u for at, u in pending if at <= now_ms]
                    pending = [(at, u) for at, u in pending if at > now_ms]
                    report.labels_posted += _post_labels(http, source_url, due)
                    body = [{k: v for k, v in r.items() if k != "labels"} for r in batch]
                else:
                    body = batch
                try:
                    response = http.post(source_url + "/v1/instances", json={"instances": body})
                except httpx.HTTPError as exc:
                    raise ReplayError(f"no source service reachable at {source_url} ({type(exc).__name__}: {exc})") from exc
                if response.status_code != 200:
                    raise ReplayError(f"source at {source_url}: POST /v1/instances answered "
                                      f"{response.status_code}: {response.text[:300]}")
                result = response.json()
                report.posted += len(batch)
                report.accepted += int(result["accepted"])
                if late_labels:
                    for r, ins in zip(batch, result["ins_ids"]):
                        at = r["timestamp_ms"] + label_delay_ms
                        pending.append((at, {"user_id": r["user_id"], "ins_id": ins, "labels": r["labels"],
                                             "arrival_ms": at}))
                bar.update(len(batch))
                if between_batches is not None:
                    between_batches()
                if time.monotonic() - last_poll >= poll_s:
                    last_poll = time.monotonic()
                    stats = trainer_stats(http, trainer_url)
                    report.points.append(_point(stats, task, t0))
                    bar.set_postfix_str(_postfix(report.points[-1], len(stats.get("published", [])) - known))
            report.labels_posted += _post_labels(http, source_url, [u for _, u in pending])
            # the trainer finishes what was posted: wait for it, following the metrics
            bar.set_description("training")
            deadline = time.monotonic() + wait_s
            target = report.start_instances + report.accepted
            while True:
                stats = trainer_stats(http, trainer_url)
                report.points.append(_point(stats, task, t0))
                bar.set_postfix_str(_postfix(report.points[-1], len(stats.get("published", [])) - known))
                if stats["instances"] >= target:
                    report.complete = True
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(poll_s)
        report.published = [p for p in stats.get("published", []) if p["ordinal"] not in start_published]
    report.seconds = time.monotonic() - t0
    if plot_path is not None:
        report.plot = plot_replay(report, plot_path)
    return report


def _post_labels(http, source_url: str, updates: list[dict], chunk: int = 512) -> int:
    for start in range(0, len(updates), chunk):
        response = http.post(source_url + "/v1/labels", json={"updates": updates[start:start + chunk]})
        if response.status_code != 200:
            raise ReplayError(f"source at {source_url}: POST /v1/labels answered {response.status_code}: "
                              f"{response.text[:300]}")
    return len(updates)


def table(report: ReplayReport, rows: int = 12) -> str:
    """The polled points (about ``rows`` of them, the last always) and the versions published."""
    points = [p for p in report.points if p.instances > report.start_instances] or report.points[-1:]
    step = max(1, math.ceil(len(points) / rows))
    shown = points[::step]
    if shown[-1] is not points[-1]:
        shown.append(points[-1])
    fmt = lambda v: "   -  " if math.isnan(v) else f"{v:.4f}"  # noqa: E731
    lines = [f"progressive validation ({report.task}, the trainer's sliding window):",
             f"   {'time s':>7}{'trained':>10}{'auc iat':>9}{'auc src':>9}{'ll iat':>9}{'versions':>10}"]
    for p in shown:
        lines.append(f"   {p.at_s:>7.1f}{p.instances:>10,}{fmt(p.auc['iat']):>9}{fmt(p.auc['source']):>9}"
                     f"{fmt(p.logloss['iat']):>9}{p.published:>10}")
    lines.append(f"versions published during the replay: {len(report.published)}")
    for p in report.published:
        lines.append(f"   after {p['instances']:>8,} instances: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()))
    state = "all trained" if report.complete else "NOT all trained before the wait ended"
    lines.append(f"posted {report.posted:,} instances ({report.accepted:,} accepted, {report.labels_posted:,} "
                 f"late label updates); trainer trained {report.trained:,} ({state}) in {report.seconds:.0f}s")
    return "\n".join(lines)


def plot_replay(report: ReplayReport, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    x = [p.instances for p in report.points]
    for model, style in (("iat", "-o"), ("source", ":s")):
        ax.plot(x, [p.auc[model] for p in report.points], style, markersize=3, label=model)
    for i, p in enumerate(report.published):
        ax.axvline(p["instances"], color="tab:green", alpha=0.5, linestyle="--",
                   label="version published" if i == 0 else None)
    ax.set_xlabel("instances trained")
    ax.set_ylabel(f"progressive AUC ({report.task})")
    ax.set_title("online loop: predict-then-train AUC, sliding window", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
