"""Session fixtures of the serving tests: one small serving set trained on real data and exported
once (``serving_run``), and its AOTInductor packages compiled once and shared by every test that
needs them (``aoti_versions``): compiling is by far the slowest step of the suite."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data.prepared import load_dataset
from models.data.schema import load_schema
from models.nn.base import ModelConfig
from models.training.loop import TrainConfig
from models.training.registry import ExperimentConfig

HISTORY_LEN = 32   # L of the test IAT model (the SIF model's L is max(8, L // 16) = 8)


def load_real_data(tmp_root: Path):
    """MovieLens-100K (first 150 users) from IAT_DATA_DIR / ../shared/data, else synthetic."""
    base = Path(os.environ.get("IAT_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
    schema = load_schema("movielens-100k")
    for folder in (base, base / schema.name):
        if (folder / schema.log.path).is_file():
            data = load_dataset(schema, folder)
            return data.subset_users(np.arange(150)), "movielens-100k"
    from models.data.synthetic import synthetic_data
    return synthetic_data(tmp_root / "synthetic", n_users=120, events_per_user=50), "synthetic"


@pytest.fixture(scope="session")
def serving_run(tmp_path_factory):
    """(data, run_dir, model_dir, versions {name: path}) - trained and exported once."""
    from models.export import export_run
    from models.training.serving_set import train_serving_set

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    data, _ = load_real_data(root)
    cfg = ExperimentConfig(model=ModelConfig(seq_len=8, history_len=HISTORY_LEN),
                           train=TrainConfig(epochs=1, progress=False), source_window=32)
    run_dir = train_serving_set(data, cfg, root / "run", progress=lambda m: None)
    versions = export_run(run_dir, root / "models", aoti=False, progress=lambda m: None)
    return data, run_dir, root / "models", versions


@pytest.fixture(scope="session")
def aoti_versions(serving_run, tmp_path_factory):
    """{name: version dir} of the serving set exported WITH its AOTInductor packages (CPU),
    compiled once per session whichever tests ask for it."""
    from models.export import export_run
    return export_run(serving_run[1], tmp_path_factory.mktemp("aoti"), aoti=True, progress=lambda m: None)
