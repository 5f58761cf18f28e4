"""The five SIF rows of `iat experiment` run end to end on the synthetic generator's data."""
import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.training.registry import ROWS, ExperimentConfig
from models.training.sif.rows import prepare_inputs

SIF_ROWS = ["sif", "sif_item_id_only", "sif_dense_raw", "sif_pooled_then_attend", "sif_flat_attention"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("synthetic"), n_users=80, events_per_user=30)


def test_rows_are_registered():
    assert set(SIF_ROWS) <= set(ROWS)


def test_inputs_put_the_item_id_alone_and_compact_ids(data):
    prepared = prepare_inputs(data)
    groups = {g.name: g.fields for g in prepared.schema.groups}
    assert groups["item_id"] == (data.item_field,)
    assert data.item_field not in groups["item"]
    cat = prepared.inputs.categorical
    for j, f in enumerate(prepared.schema.categorical):
        assert 0 <= int(cat[:, j].min()) and int(cat[:, j].max()) < f.buckets
    assert prepared.raw_bytes == 4 * (len(data.cat_fields) + len(data.num_fields)) + 4 * float(
        (data.multi >= 0).sum(-1).mean(0).sum()
    )


def test_each_sif_row_runs_and_reports_compression_and_health(data):
    cfg = ExperimentConfig.quick()
    cfg.train.progress = False
    cfg.train.epochs = 1
    n_val, n_test = len(data.split_indices(1)), len(data.split_indices(2))
    extras = {}
    for name in SIF_ROWS:
        result = ROWS[name].fn(data, 0, cfg)
        assert result.val_probs.shape == (n_val, len(data.tasks))
        assert result.test_probs.shape == (n_test, len(data.tasks))
        assert np.isfinite(result.test_probs).all()
        assert ((result.test_probs > 0) & (result.test_probs < 1)).all()
        extras[name] = result.extra
    n_s = extras["sif"]["n_subtokens"]
    assert extras["sif"]["token_bytes"] == n_s * 3  # uint8 codes, R = 3
    assert extras["sif"]["compression_ratio"] > 1
    assert extras["sif_item_id_only"]["compression_ratio"] == pytest.approx(n_s * extras["sif"]["compression_ratio"])
    assert extras["sif_dense_raw"]["compression_ratio"] < 1  # fp32 vectors are bigger than the raw sample
    levels = extras["sif"]["codebook_health"]["levels"]
    errors = [lvl["relative_error"] for lvl in levels]
    assert errors[0] > errors[1] > errors[2]
    assert all(lvl["perplexity"] >= 1 for lvl in levels)


@pytest.mark.slow  # trains two SIF rows
def test_the_equal_budget_row_gets_the_iat_rows_history_rows_and_epochs(data):
    """`sif_equal_budget` (issue 13): history L = the downstream L, every training row, the
    experiment's epochs; the default `sif` row is capped below all three."""
    cfg = ExperimentConfig.quick()
    cfg.train.progress = False
    cfg.train.epochs = 3
    cfg.train.patience = 3
    cfg.model.history_len = 16
    equal = ROWS["sif_equal_budget"].fn(data, 0, cfg).extra
    assert equal["history_len"] == cfg.model.history_len
    assert equal["train_rows_per_epoch"] == len(data.split_indices(0))
    assert len(equal["train"]["epochs"]) == 3
    default = ROWS["sif"].fn(data, 0, cfg).extra
    assert default["history_len"] < cfg.model.history_len and len(default["train"]["epochs"]) <= 2
