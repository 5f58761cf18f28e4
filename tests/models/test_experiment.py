"""The experiment runner on synthetic data: registry, results.json layout, the planted signal."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import ModelConfig
from models.training.experiment import results_table, run_experiment, write_results
from models.training.loop import TrainConfig
from models.training.registry import ROWS, ExperimentConfig, RowResult, register_row


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=120, n_items=150, events_per_user=50)


def small_config():
    return ExperimentConfig(model=ModelConfig(emb_dim=8, seq_len=10, history_len=24, insemb_dim=32,
                                              sit_ffn=64, adapt_dim=48, iat_width=16),
                            train=TrainConfig(epochs=3, patience=1, batch_size=128, progress=False),
                            source_window=32)


def test_registry_accepts_external_rows(data):
    def constant(d, seed, cfg):
        val, test = d.split_indices(1), d.split_indices(2)
        return RowResult(np.full((len(val), len(d.tasks)), 0.5), np.full((len(test), len(d.tasks)), 0.5),
                         {"note": "constant"})
    register_row("constant_for_test", constant, default=False)
    try:
        assert "constant_for_test" in ROWS and not ROWS["constant_for_test"].default
        res = run_experiment(data, small_config(), rows=["constant_for_test"], seeds=2, progress=lambda m: None)
        row = res["rows"][0]
        assert row["model"] == "constant_for_test" and row["auc"] == 0.5 and row["auc_std"] == 0.0
        assert row["runs"][0]["extra"] == {"note": "constant"}
        with pytest.raises(ValueError, match="unknown rows"):
            run_experiment(data, small_config(), rows=["nope"], seeds=1)
    finally:
        ROWS.pop("constant_for_test")


def test_default_rows_are_the_papers():
    names = [n for n, s in ROWS.items() if s.default]
    for expected in ("base", "temporal_iat", "user_iat", "user_iat_full_attention",
                     "user_iat_no_label_side_info", "user_iat_id_query"):
        assert expected in names


@pytest.mark.slow
def test_planted_signal_direction_and_results_files(data, tmp_path):
    """On synthetic data whose label depends on the user's recent labels, IAT rows (past
    instances + labels) beat the base model (past item ids only); results files are written."""
    rows = ["base", "temporal_iat", "user_iat", "user_iat_full_attention"]
    res = run_experiment(data, small_config(), rows=rows, seeds=1, progress=lambda m: None)
    by = {r["model"]: r for r in res["rows"]}
    assert by["user_iat"]["auc"] > by["base"]["auc"] + 0.02
    assert by["temporal_iat"]["auc"] > by["base"]["auc"] + 0.02
    assert abs(by["user_iat"]["auc"] - by["user_iat_full_attention"]["auc"]) < 0.03
    for r in res["rows"]:
        assert set(r) >= {"model", "auc", "gauc", "logloss", "auc_std", "gauc_std", "logloss_std", "per_task"}
        assert set(r["per_task"]) == {"like", "love"}
    assert res["rows"][1]["runs"][0]["extra"]["source"]["insemb_protocol"] == "user_crossfit"
    json_path, png_path = write_results(res, tmp_path)
    assert json.loads(json_path.read_text())["dataset"] == "synthetic"
    assert png_path.stat().st_size > 1000
    assert "user_iat_full_attention" in results_table(res)
