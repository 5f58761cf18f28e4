"""Ranking metrics: AUC, GAUC (per user, impression weighted), LogLoss."""
from __future__ import annotations

import numpy as np


def auc(y, p) -> float:
    """Area under the ROC curve (ties get half credit); NaN when only one class is present."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise ValueError(f"y and p differ in length: {len(y)} != {len(p)}")
    n_pos = float((y > 0.5).sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    p_sorted = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(p_sorted)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(p)]))
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    rank_sum = ranks[y > 0.5].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(y, p, groups) -> float:
    """Impression-weighted mean of per-group AUC; groups with a single class are skipped."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    groups = np.asarray(groups).ravel()
    order = np.argsort(groups, kind="mergesort")
    g_sorted = groups[order]
    cuts = np.flatnonzero(g_sorted[1:] != g_sorted[:-1]) + 1
    total, weight = 0.0, 0.0
    for rows in np.split(order, cuts):
        yy = y[rows]
        if yy.min() == yy.max():
            continue
        total += len(rows) * auc(yy, p[rows])
        weight += len(rows)
    return float(total / weight) if weight else float("nan")


def logloss(y, p, eps: float = 1e-7) -> float:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def task_metrics(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray,
                 tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {"auc", "gauc", "logloss"}} for [N, T] labels and probabilities."""
    return {task: {"auc": auc(labels[:, t], probs[:, t]),
                   "gauc": gauc(labels[:, t], probs[:, t], groups),
                   "logloss": logloss(labels[:, t], probs[:, t])}
            for t, task in enumerate(tasks)}
