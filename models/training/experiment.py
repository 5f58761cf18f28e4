"""Offline experiment: the paper's model rows trained and evaluated on one ``PreparedData``.

Rows live in a registry so other modules add theirs without editing this file::

    from models.training.registry import register_row, RowResult
    def my_row(data, seed, cfg) -> RowResult: ...
    register_row("my_model", my_row)

A row function trains on the train split, tunes (early stopping) on validation only, and
returns probabilities for the validation and test rows (row order of
``data.split_indices(1)`` / ``(2)``) per task, plus ``extra`` (anything JSON-able, copied into
results.json). Source models are trained once per seed and shared between rows through
``cfg.shared(key, factory)``.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.data.prepared import PreparedData
from models.nn.base import BaseRanker, FeatureShape, ModelConfig
from models.nn.din import DINRanker
from models.nn.downstream import IATDownstream
from models.training.batches import feature_batch
from models.training.downstream import predict_downstream, train_downstream
from models.training.loop import fit, predict, set_seed, shuffled_batches
from models.training.metrics import auc, task_metrics
from models.training.protocol import ProtocolResult, protocol_insembs, two_pass_insembs
from models.training.registry import (
    ROWS,
    ExperimentConfig,
    RowFn,
    RowResult,
    register_row,
)
from models.training.statistics import mean_interval, mean_std, paired_difference

# ---------------------------------------------------------------- the paper's rows

def row_base(data: PreparedData, seed: int, cfg: ExperimentConfig, network: type = BaseRanker,
             name: str = "base", **overrides) -> RowResult:
    """A ranking model without InsEmbs (``network``: the base model, or the DIN baseline) on
    the instances' features and behaviour sequence, trained by ``fit`` on the same batches."""
    set_seed(seed)
    mc = replace(cfg.model, **overrides)
    model = network(mc, FeatureShape.of(data))
    train, val, test = (data.split_indices(s) for s in (0, 1, 2))
    rng = np.random.default_rng(seed)

    def forward(rows):
        return model(feature_batch(data, rows, mc.seq_len))

    def epoch_batches(epoch):
        for rows in shuffled_batches(train, cfg.train.batch_size, rng):
            yield feature_batch(data, rows, mc.seq_len), torch.from_numpy(data.labels[rows]), None

    def validate():
        model.eval()
        return data.labels[val], predict(forward, val)

    info = fit(model, epoch_batches, validate, cfg.train, desc=f"{name} s{seed}")
    return RowResult(predict(forward, val), predict(forward, test), {"train": info})


def source_result(kind: str, data: PreparedData, seed: int, cfg: ExperimentConfig) -> ProtocolResult:
    """The ``kind`` source model ("user", "temporal", "user_two_pass" or "user_after_sit", the
    user-order pass giving the downstream its SIT outputs) trained by the
    time-ordered protocol (``models.training.protocol``) and the InsEmbs the downstream reads;
    trained once per seed and shared by every row over that source."""
    def build():
        if kind == "user_two_pass":
            return two_pass_insembs(data, cfg.model, cfg.protocol(), seed)
        if kind == "user_after_sit":
            return protocol_insembs("user", data, cfg.model, replace(cfg.protocol(), insemb="after_sit"), seed)
        return protocol_insembs(kind, data, cfg.model, cfg.protocol(), seed)
    return cfg.shared((kind, id(data), seed), build)


DOWNSTREAM_ROWS: dict[str, tuple[str, dict]] = {}  # row name -> (InsEmb source, ModelConfig overrides)


def downstream_inputs(name: str, data: PreparedData, seed: int, cfg: ExperimentConfig
                      ) -> tuple[np.ndarray, ModelConfig, dict]:
    """What downstream row ``name`` trains on: (InsEmbs of every instance [N, d], its model
    config, the source's info). ``zero`` gives InsEmbs of zeros and no source at all: the
    control that isolates what the InsEmbs add (same seed, batches and side info as user_iat)."""
    source, overrides = DOWNSTREAM_ROWS[name]
    if source == "zero":
        e_all, src_info = np.zeros((data.n, cfg.model.insemb_dim), dtype=np.float32), {"insembs": "zero"}
    else:
        res = source_result(source, data, seed, cfg)
        e_all, src_info = res.insembs, res.info
    return e_all, replace(cfg.model, **overrides), src_info


def fit_downstream_row(name: str, data: PreparedData, seed: int, cfg: ExperimentConfig
                       ) -> tuple[IATDownstream, np.ndarray, dict]:
    """Row ``name``'s downstream model trained on its InsEmbs: (model, InsEmbs, info). The
    ``user_iat`` row and ``iat train`` (``serving_set``) both call this: the model served is
    the model evaluated."""
    e_all, mc, src_info = downstream_inputs(name, data, seed, cfg)
    set_seed(seed)
    model, info = train_downstream(data, e_all, mc, cfg.train, seed, desc=f"{name} s{seed}")
    return model, e_all, {"train": info, "source": src_info}


def _downstream_row(name: str, source: str, **overrides) -> RowFn:
    DOWNSTREAM_ROWS[name] = (source, overrides)

    def row(data: PreparedData, seed: int, cfg: ExperimentConfig) -> RowResult:
        model, e_all, info = fit_downstream_row(name, data, seed, cfg)
        val, test = data.split_indices(1), data.split_indices(2)
        return RowResult(predict_downstream(model, data, val, e_all),
                         predict_downstream(model, data, test, e_all), info)
    return row


register_row("base", row_base,
             description="base ranking model (Eq. 1-3); its behaviour sequence carries past labels")
register_row("base_item_ids_only", lambda d, s, c: row_base(d, s, c, seq_label_side_info=False),
             default=False, description="base model whose behaviour sequence has item ids only (no labels)")
register_row("temporal_iat", _downstream_row("temporal_iat", "temporal"),
             description="downstream over temporal-order InsEmbs, shared-history attention")
register_row("user_iat", _downstream_row("user_iat", "user"),
             description="downstream over user-order (SIT) InsEmbs, shared-history attention")
register_row("user_iat_zero_insemb", _downstream_row("user_iat_zero_insemb", "zero"),
             description="control: user_iat with every InsEmb zero (same side info, seed, batches)")
register_row("user_iat_full_attention", _downstream_row("user_iat_full_attention", "user", attention="full"),
             description="as user_iat, full attention over [query; history] (the paper's)")
register_row("user_iat_no_label_side_info",
             _downstream_row("user_iat_no_label_side_info", "user", label_side_info=False,
                             seq_label_side_info=False),
             description="as user_iat without past labels (neither in the IAT nor the behaviour sequence)")
register_row("user_iat_id_query", _downstream_row("user_iat_id_query", "user", query="id"),
             description="as user_iat with the candidate item id as the query")
register_row("user_iat_two_pass", _downstream_row("user_iat_two_pass", "user_two_pass"), default=False,
             description="as user_iat with two-pass user-order InsEmbs (App. A.3)")

# The DIN baseline and the IAT paper's remaining ablations (Tab. 4), off by default.
register_row("din", lambda d, s, c: row_base(d, s, c, network=DINRanker, name="din"), default=False,
             description="DIN (target attention, MLP) on base's features and labelled behaviour sequence")
register_row("user_iat_insemb_after_sit",
             _downstream_row("user_iat_insemb_after_sit", "user_after_sit"), default=False,
             description="as user_iat, the stored InsEmb taken after the SIT, not before (Tab. 4)")
register_row("user_iat_transformer_after_fi",
             _downstream_row("user_iat_transformer_after_fi", "user", iat_position="after_fi"),
             default=False,
             description="as user_iat, the IAT output joined after the feature interaction (Tab. 4)")
register_row("user_iat_no_other_side_info",
             _downstream_row("user_iat_no_other_side_info", "user", gap_side_info=False), default=False,
             description="as user_iat without the other side info (instance age), labels kept (Tab. 4)")
register_row("temporal_iat_no_other_side_info",
             _downstream_row("temporal_iat_no_other_side_info", "temporal", gap_side_info=False),
             default=False,
             description="as temporal_iat without the other side info (instance age), labels kept (Tab. 4)")


# The SIF rows register themselves (they import the registry, never this module: no cycle).
import models.training.sif.rows  # noqa: E402,F401

# ---------------------------------------------------------------- running and reporting

METRICS = ("auc", "gauc", "logloss")

# The comparisons results.json reports as paired differences (A - B, same seed and split), when
# both rows ran: (A, B, what the difference measures).
COMPARISONS = (
    ("user_iat", "user_iat_zero_insemb", "what user-order InsEmbs add (the IAT claim)"),
    ("user_iat", "temporal_iat", "user-order vs temporal-order source"),
    ("temporal_iat", "user_iat_zero_insemb", "what temporal-order InsEmbs add"),
    ("user_iat", "base", "IAT vs the base model, both given past labels"),
    ("temporal_iat", "base", "temporal-order IAT vs the base model, both given past labels"),
    ("sif", "base", "SIF vs the base model"),
    ("sif_equal_budget", "base", "SIF on the IAT rows' budget vs the base model"),
    ("sif_equal_budget", "sif", "what the IAT rows' budget gives SIF"),
    ("user_iat", "sif_equal_budget", "IAT vs SIF on the same budget"),
    ("user_iat", "user_iat_full_attention", "shared-history vs full attention"),
    ("base", "base_item_ids_only", "what past labels add to the base model's sequence"),
    ("user_iat_two_pass", "user_iat", "two-pass (App. A.3) vs one-pass user-order InsEmbs"),
    ("user_iat", "user_iat_insemb_after_sit", "InsEmb stored before vs after the SIT (Tab. 4)"),
    ("user_iat", "user_iat_transformer_after_fi",
     "IAT output before vs after the feature interaction (Tab. 4)"),
    ("user_iat", "user_iat_no_other_side_info", "what the other side info (instance age) adds, user order"),
    ("temporal_iat", "temporal_iat_no_other_side_info",
     "what the other side info (instance age) adds, temporal order"),
    ("user_iat", "din", "IAT vs DIN, both given past labels"),
    ("base", "din", "the base model vs DIN, the same features"),
)


# History-length buckets (IAT Fig. 5b, SIF Table 6): a test instance's bucket is how many earlier
# instances its user has in the log (training period included), lower edges.
HISTORY_BUCKETS = (0, 1, 10, 50, 200)


def history_bucket_labels(edges=HISTORY_BUCKETS) -> list[str]:
    labels = []
    for lo, hi in zip(edges, (*edges[1:], None)):
        labels.append(f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"))
    return labels


def by_history_length(data: PreparedData, rows: np.ndarray, probs: np.ndarray, edges=HISTORY_BUCKETS) -> dict:
    """{bucket: {"n", "auc"}} of the headline task over ``rows`` grouped by history length."""
    lengths = data.history_length()[rows]
    which = np.searchsorted(np.asarray(edges), lengths, side="right") - 1
    out = {}
    for k, label in enumerate(history_bucket_labels(edges)):
        mask = which == k
        out[label] = {"n": int(mask.sum()),
                      "auc": auc(data.labels[rows][mask, 0], probs[mask, 0]) if mask.any() else float("nan")}
    return out


def compare_rows(per_row: dict[str, list[dict]], tasks: list[str]) -> list[dict]:
    """Paired differences with 95% t-intervals for every ``COMPARISONS`` pair that ran, per
    task and metric, and of the headline task's AUC per history-length bucket."""
    out = []
    for a, b, meaning in COMPARISONS:
        if a not in per_row or b not in per_row:
            continue
        per_task = {}
        for task in tasks:
            per_task[task] = {metric: paired_difference(
                {r["seed"]: r["test"][task][metric] for r in per_row[a]},
                {r["seed"]: r["test"][task][metric] for r in per_row[b]}) for metric in METRICS}
        entry = {"name": f"{a} - {b}", "a": a, "b": b, "meaning": meaning, "per_task": per_task}
        if all("by_history" in r for r in per_row[a] + per_row[b]):
            entry["auc_by_history"] = {
                label: {**paired_difference({r["seed"]: r["by_history"][label]["auc"] for r in per_row[a]},
                                            {r["seed"]: r["by_history"][label]["auc"] for r in per_row[b]}),
                        "n": per_row[a][0]["by_history"][label]["n"]}
                for label in per_row[a][0]["by_history"]}
        out.append(entry)
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _run_seed(data: PreparedData, cfg: ExperimentConfig, names: list[str], seed: int,
              progress: Callable[[str], None] = print) -> dict[str, dict]:
    torch.set_num_threads(cfg.threads)
    cfg._shared.clear()  # source models are shared within a seed, not across seeds
    val, test = data.split_indices(1), data.split_indices(2)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        res = ROWS[name].fn(data, seed, cfg)
        if res.test_probs.shape != (len(test), len(data.tasks)):
            raise ValueError(f"row {name}: test_probs has shape {res.test_probs.shape}, "
                             f"expected {(len(test), len(data.tasks))}")
        out[name] = {
            "seed": seed, "seconds": time.perf_counter() - t0,
            "test": task_metrics(data.labels[test], res.test_probs, data.user_index[test], data.tasks),
            "val": task_metrics(data.labels[val], res.val_probs, data.user_index[val], data.tasks),
            "by_history": by_history_length(data, test, res.test_probs),
            "extra": _jsonable(res.extra)}
        m = out[name]["test"][data.tasks[0]]
        progress(f"seed {seed} {name:<30} test {data.tasks[0]} AUC {m['auc']:.4f} "
                 f"GAUC {m['gauc']:.4f} LogLoss {m['logloss']:.4f} ({out[name]['seconds']:.0f}s)")
    cfg._shared.clear()
    return out


def share_group(name: str) -> str:
    """Rows in one group share source models, so they run in the same process."""
    source = DOWNSTREAM_ROWS.get(name, ("", {}))[0]
    if source in ("temporal", "user"):
        return source
    return name


_FORKED: tuple | None = None  # (data, cfg) handed to forked workers


def _forked_unit(unit: tuple[int, list[str]]) -> dict[str, dict]:
    data, cfg = _FORKED
    seed, names = unit
    return {(seed, k): v for k, v in
            _run_seed(data, cfg, names, seed, progress=lambda m: print(m, flush=True)).items()}


def run_experiment(data: PreparedData, cfg: ExperimentConfig, rows: list[str] | None = None,
                   seeds: int = 3, progress: Callable[[str], None] = print) -> dict:
    """Train and evaluate each row for ``seeds`` seeds; returns the results.json content.
    With ``cfg.workers > 1``, (seed, share group) units run in forked processes of
    ``cfg.threads`` threads each; rows sharing a source model stay in one process."""
    global _FORKED
    names = rows or [n for n, spec in ROWS.items() if spec.default]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; registered: {sorted(ROWS)}")
    val, test = data.split_indices(1), data.split_indices(2)
    data.history_index(cfg.model.history_len)  # computed once, inherited by workers
    data.history_index(cfg.model.seq_len)
    data.history_length()
    started = time.perf_counter()
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(share_group(name), []).append(name)
    units = [(seed, group) for seed in range(seeds) for group in groups.values()]
    units.sort(key=lambda u: -len(u[1]))  # biggest first: better packing on few workers
    workers = max(1, min(cfg.workers, len(units)))
    results: dict[tuple[int, str], dict] = {}
    if workers == 1:
        for seed in range(seeds):
            results.update({(seed, k): v for k, v in _run_seed(data, cfg, names, seed, progress).items()})
    else:
        import multiprocessing as mp
        _FORKED = (data, cfg)
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                for part in pool.imap_unordered(_forked_unit, units, chunksize=1):
                    results.update(part)
        finally:
            _FORKED = None
    per_row = {name: [results[(seed, name)] for seed in range(seeds)] for name in names}
    out_rows = []
    for name in names:
        runs = per_row[name]
        per_task = {}
        for task in data.tasks:
            entry = {}
            for metric in METRICS:
                stats = mean_interval([r["test"][task][metric] for r in runs])
                entry[metric], entry[f"{metric}_std"], entry[f"{metric}_ci95"] = (
                    stats["mean"], stats["std"], stats["ci"])
            entry["val_auc"], entry["val_auc_std"] = mean_std([r["val"][task]["auc"] for r in runs])
            per_task[task] = entry
        head = per_task[data.tasks[0]]
        out_rows.append({"model": name, **{k: head[k] for k in
                        ("auc", "gauc", "logloss", "auc_std", "gauc_std", "logloss_std", "auc_ci95",
                         "gauc_ci95", "logloss_ci95", "val_auc", "val_auc_std")},
                         "per_task": per_task, "seconds_per_seed": mean_std([r["seconds"] for r in runs])[0],
                         "description": ROWS[name].description,
                         "runs": [{"seed": r["seed"], "test": r["test"], "val": r["val"],
                                   "by_history": r["by_history"], "extra": r["extra"]} for r in runs]})
    return _jsonable({"dataset": data.name, "tasks": data.tasks, "headline_task": data.tasks[0],
                      "seeds": seeds, "n_instances": data.n,
                      "split_sizes": {"train": len(data.split_indices(0)), "val": len(val), "test": len(test)},
                      "config": cfg.to_dict(), "wall_seconds": time.perf_counter() - started,
                      "std": "sample standard deviation over seeds (ddof=1)",
                      "intervals": "95% Student-t intervals over seeds; comparisons are paired by seed",
                      "rows": out_rows, "comparisons": compare_rows(per_row, data.tasks)})


def _fmt(value) -> str:
    return "nan" if value is None else f"{value:.4f}"


def _fmt_ci(ci) -> str:
    return "n/a (1 seed)" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def results_table(results: dict) -> str:
    """Rows (mean ± sample std over seeds, every task), then the paired comparisons with
    their 95% intervals (headline task)."""
    tasks = results["tasks"]
    head = f"{'model':<30}" + "".join(f" {t + ' ' + m:>22}" for t in tasks for m in ("AUC", "GAUC", "LogLoss"))
    lines = [head, "-" * len(head)]
    for row in results["rows"]:
        cells = []
        for t in tasks:
            pt = row["per_task"][t]
            for m in METRICS:
                val, std = pt[m], pt[f"{m}_std"]
                cells.append(f" {_fmt(val)} ± {0.0 if std is None else std:.4f}".rjust(23))
        lines.append(f"{row['model']:<30}" + "".join(cells))
    comparisons = results.get("comparisons") or []
    if comparisons:
        task = results["headline_task"]
        lines += ["", f"paired differences A - B, test {task}, {results['seeds']} seeds "
                      "(mean, 95% t-interval):",
                  f"{'comparison':<48} {'AUC':>9} {'AUC 95% CI':>20} {'GAUC':>9} {'GAUC 95% CI':>20}"]
        for c in comparisons:
            auc_d, gauc_d = c["per_task"][task]["auc"], c["per_task"][task]["gauc"]
            lines.append(f"{c['name']:<48} {_fmt(auc_d['mean']):>9} {_fmt_ci(auc_d['ci']):>20} "
                         f"{_fmt(gauc_d['mean']):>9} {_fmt_ci(gauc_d['ci']):>20}")
        with_buckets = [c for c in comparisons if c.get("auc_by_history")]
        if with_buckets:
            labels = list(with_buckets[0]["auc_by_history"])
            counts = ", ".join(f"{b}: {with_buckets[0]['auc_by_history'][b]['n']}" for b in labels)
            lines += ["", f"paired test {task} AUC differences by the user's history length "
                          f"(earlier instances; test instances per bucket: {counts}):",
                      f"{'comparison':<48}" + "".join(f" {b:>24}" for b in labels)]
            for c in with_buckets:
                cells = [f"{_fmt(c['auc_by_history'][b]['mean'])} {_fmt_ci(c['auc_by_history'][b]['ci'])}"
                         if c['auc_by_history'][b]['n'] else "- (no test instances)" for b in labels]
                lines.append(f"{c['name']:<48}" + "".join(f" {x:>24}" for x in cells))
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2))
    png_path = out / "results.png"
    plot_results(results, png_path)
    return json_path, png_path


def plot_results(results: dict, path: Path) -> None:
    """Per row: test AUC / GAUC of the headline task, mean with its 95% interval over seeds;
    and the paired differences (A - B) with their 95% intervals, a line at 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    comparisons = results.get("comparisons") or []
    task = results["headline_task"]
    names = [r["model"] for r in rows]
    n_panels = 2 + (1 if comparisons else 0)
    height = 0.45 * max(len(rows), len(comparisons)) + 2.5
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, height))

    def errors(means, cis):
        lo = [m - c[0] if c else 0.0 for m, c in zip(means, cis)]
        hi = [c[1] - m if c else 0.0 for m, c in zip(means, cis)]
        return [lo, hi]

    for ax, metric in zip(axes, ("auc", "gauc")):
        means = [r["per_task"][task][metric] for r in rows]
        means = [np.nan if m is None else m for m in means]
        cis = [r["per_task"][task][f"{metric}_ci95"] for r in rows]
        ax.errorbar(means, range(len(rows)), xerr=errors(means, cis), fmt="o", color="tab:blue", capsize=3)
        ends = [v for m, c in zip(means, cis) for v in (c or [m, m]) if np.isfinite(v)]
        if ends:  # few seeds give wide t-intervals: keep the axis on the AUC scale
            pad = max(max(ends) - min(ends), 0.01) * 0.05
            ax.set_xlim(max(0.0, min(ends) - pad), min(1.0, max(ends) + pad))
        ax.set_yticks(range(len(rows)), names if metric == "auc" else [""] * len(rows))
        ax.set_title(f"{task} test {metric.upper()} (mean, 95% CI, {results['seeds']} seeds)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    if comparisons:
        ax = axes[-1]
        means = [c["per_task"][task]["auc"]["mean"] for c in comparisons]
        means = [np.nan if m is None else m for m in means]
        cis = [c["per_task"][task]["auc"]["ci"] for c in comparisons]
        ax.errorbar(means, range(len(comparisons)), xerr=errors(means, cis), fmt="s", color="tab:red", capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.yaxis.tick_right()
        ax.set_yticks(range(len(comparisons)), [c["name"] for c in comparisons])
        ax.set_title("paired AUC difference A - B (95% CI)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{results['dataset']}: {len(rows)} rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
