"""The source pass's learning-rate warm-up, and what it is for: without it the user-order
source (its SIT) does not train at the experiments' rates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.prepared import load_dataset
from models.data.schema import DatasetSchema
from models.data.synthetic import write_control
from models.training.protocol import ProtocolConfig, _val_metrics, pass_insembs, run_pass
from models.training.registry import ExperimentConfig


def test_the_rate_rises_linearly_over_the_warmup_and_stays(tmp_path):
    data = load_dataset(DatasetSchema.from_toml(write_control(tmp_path, "negative", n_users=40)), tmp_path)
    cfg = ExperimentConfig()
    cfg.source_batch_size, cfg.source_warmup_steps, cfg.source_lr = 64, 4, 1e-3
    seen = []
    state, plan = run_pass("temporal", data, cfg.model, cfg.protocol(), 0,
                           on_train=lambda s, rows: seen.append(s.opt.param_groups[0]["lr"]))
    # on_train runs before a batch's step: the rate the previous step used
    assert seen[1:6] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert len(plan) > 6
    with pytest.raises(ValueError, match="warmup_steps"):
        ProtocolConfig(warmup_steps=-1)


@pytest.mark.slow
def test_the_user_order_source_trains_on_the_positive_control_only_with_the_warmup(tmp_path):
    """Synthetic positive control (models.data.synthetic.write_control): without the warm-up the
    SIT's loss stays at ln 2 (validation AUC about 0.5); with it the model learns the label."""
    torch.set_num_threads(1)
    data = load_dataset(DatasetSchema.from_toml(write_control(tmp_path, "positive")), tmp_path)
    after = np.flatnonzero(data.split != 0)
    aucs = {}
    for warmup in (0, 50):
        cfg = ExperimentConfig()
        cfg.model.history_len, cfg.source_batch_size, cfg.source_warmup_steps = 32, 128, warmup
        state, _ = run_pass("user", data, cfg.model, cfg.protocol(), 0)
        aucs[warmup] = _val_metrics(state, pass_insembs(state, after), cfg.protocol().window)["val_auc"]
    assert aucs[0] < 0.6 and aucs[50] > 0.75, aucs
