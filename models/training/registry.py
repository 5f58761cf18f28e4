"""The experiment's rows by name and the configuration every row receives."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from models.data.prepared import PreparedData
from models.nn.base import ModelConfig
from models.training.loop import TrainConfig
from models.training.protocol import ProtocolConfig


@dataclass
class RowResult:
    val_probs: np.ndarray    # float [n_val, T]
    test_probs: np.ndarray   # float [n_test, T]
    extra: dict = field(default_factory=dict)


RowFn = Callable[[PreparedData, int, "ExperimentConfig"], RowResult]


@dataclass
class RowSpec:
    name: str
    fn: RowFn
    default: bool = True  # run when no --rows are given
    description: str = ""


ROWS: dict[str, RowSpec] = {}


def register_row(name: str, fn: RowFn, *, default: bool = True, description: str = "") -> None:
    ROWS[name] = RowSpec(name, fn, default, description)


QUICK_SOURCE_BATCH, QUICK_SOURCE_LR = 256, 1e-3


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_window: int = 128   # SIT length in batch user-order training (streaming: window - 1 fetched)
    # The source models' time-ordered pass (models.training.protocol): the earliest fraction of
    # the training instances by time is trained in batch form, the rest streams (Eq. 7-8).
    batch_fraction: float = 0.5
    source_batch_size: int | None = None  # instances per step of the source pass (None: train.batch_size)
    source_lr: float | None = None        # the source pass's learning rate (None: train.lr)
    source_warmup_steps: int = 50         # its linear warm-up (ProtocolConfig.warmup_steps: the SIT needs it)
    threads: int = 1   # per worker process; 2 threads on 2 busy cores thrash
    workers: int = 1   # seeds run in parallel processes
    _shared: dict = field(default_factory=dict, repr=False)

    @classmethod
    def quick(cls) -> "ExperimentConfig":
        # The source pass at batch 1024 would be ~80 steps on MovieLens, most of them warm-up:
        # batches of 256 and a rate the SIT trains at (models/RESULTS.md, the synthetic controls).
        return cls(model=ModelConfig(seq_len=10, history_len=32),
                   train=TrainConfig(epochs=1, patience=1, batch_size=1024, lr=3e-3), source_window=64,
                   source_batch_size=QUICK_SOURCE_BATCH, source_lr=QUICK_SOURCE_LR)

    def shared(self, key: Any, factory: Callable[[], Any]) -> Any:
        """Memoise ``factory()`` under ``key`` for the duration of one experiment run."""
        if key not in self._shared:
            self._shared[key] = factory()
        return self._shared[key]

    def protocol(self) -> ProtocolConfig:
        """The source models' pass: SIT window and batches as configured, history L - 1."""
        return ProtocolConfig(batch_fraction=self.batch_fraction, window=self.source_window,
                              history_limit=max(1, self.source_window - 1),
                              batch_size=self.source_batch_size or self.train.batch_size,
                              lr=self.source_lr or self.train.lr, warmup_steps=self.source_warmup_steps)

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "train": asdict(self.train),
                "source_window": self.source_window, "insemb_protocol": "time_ordered",
                "batch_fraction": self.batch_fraction, "source_batch_size": self.protocol().batch_size,
                "source_lr": self.protocol().lr, "source_warmup_steps": self.source_warmup_steps}
