"""Online against frozen: the progressive (predict-then-train) AUC of a replay of the period
after a model's training period, in time order, by ``models.training.online.replay``.

Both runs start from the same trained source + iat models (a ``iat train`` run directory) and
see the same instances in the same batches; they differ only in the learning rate:

- **online**: the ``OnlineLearner`` keeps training both models on each batch after predicting it
  (what the trainer service does);
- **frozen**: the same code with ``lr = 0`` (Adam's update is ``lr`` times its step, so no
  weight moves): the offline model frozen at the start of the replay. Its source still embeds
  and stores each new instance, as the serving source service does, so its histories are as
  fresh as the online run's; only the weights are old.

A curve point is the sliding-window metrics (``ProgressiveValidation``) after a batch; the
overall AUC is over every prediction of the replay.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from contract.artifacts import CONFIG_FILE, WEIGHTS_FILE
from models.data.prepared import PreparedData
from models.runtime.modules import build_module
from models.training.metrics import auc
from models.training.online import OnlineLearner, empty_like, replay
from models.training.protocol import ProtocolConfig, time_order


def load_run_module(folder: Path):
    """A serving module (``SourceEncoder`` / ``IATRanking``) from a run or version folder."""
    module = build_module(json.loads((folder / CONFIG_FILE).read_text()))
    module.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return module


@dataclass
class ReplayCurve:
    """One replay: ``instances[i]`` trained after batch i, the window's AUC per model then, and
    the overall AUC per model of every prediction (first task unless ``task`` says)."""
    lr: float
    seed: int
    task: str
    instances: list[int] = field(default_factory=list)
    window_auc: dict[str, list[float]] = field(default_factory=lambda: {"source": [], "iat": []})
    overall_auc: dict[str, float] = field(default_factory=dict)


def replay_curve(run_dir: Path, data: PreparedData, rows: np.ndarray, lr: float, seed: int,
                 batch_size: int = 256, history_limit: int = 63, window: int = 2048, task: str | None = None,
                 progress=None) -> ReplayCurve:
    """Replay ``rows`` (any order: sorted by time here) from the models in ``run_dir``."""
    task = task or data.tasks[0]
    t = data.tasks.index(task)
    source, iat = load_run_module(run_dir / "source"), load_run_module(run_dir / "iat")
    pcfg = ProtocolConfig(batch_fraction=0.0, history_limit=history_limit, batch_size=batch_size, lr=lr)
    learner = OnlineLearner(source.source, iat.model, empty_like(data), pcfg, seed=seed, window=window)
    curve = ReplayCurve(lr=lr, seed=seed, task=task)
    probs: dict[str, list[np.ndarray]] = {"source": [], "iat": []}
    labels: list[np.ndarray] = []

    def on_step(learner: OnlineLearner, result) -> None:
        probs["source"].append(result.source_probs[:, t])
        probs["iat"].append(result.iat_probs[:, t])
        curve.instances.append(learner.instances)
        for model, tasks in learner.progressive.metrics().items():
            curve.window_auc[model].append(float(tasks[task]["auc"]))
        if progress is not None:
            progress(learner)

    # the labels in the order the replay steps them: time order, as replay sorts
    ordered = time_order(data, rows)
    labels.append(data.labels[ordered, t])
    before = {k: v.clone() for k, v in iat.state_dict().items()} if lr == 0 else None
    replay(learner, data, ordered, batch_size, on_step=on_step)
    if before is not None:  # what "frozen" means here, checked rather than assumed
        moved = [k for k, v in iat.state_dict().items() if not torch.equal(v, before[k])]
        if moved:
            raise AssertionError(f"lr = 0 moved the iat weights {moved[:3]}")
    y = np.concatenate(labels)
    for model in ("source", "iat"):
        curve.overall_auc[model] = float(auc(y, np.concatenate(probs[model])))
    return curve


def at_points(curve: ReplayCurve, points: list[int], model: str = "iat") -> list[float]:
    """The window AUC after the first batch whose instance count reaches each point."""
    inst = np.asarray(curve.instances)
    out = []
    for p in points:
        i = int(np.searchsorted(inst, p))
        out.append(curve.window_auc[model][min(i, len(inst) - 1)])
    return out


# Student's t, 0.975 quantile, by degrees of freedom (no scipy in the environment)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(T975.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v)))
