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
    """On synthetic data whose label depends on the user's recent labels, every row that reads
    past labels (IAT rows, and the base model whose sequence carries them) beats the base model
    that reads past item ids only; results files are written."""
    rows = ["base_item_ids_only", "base", "temporal_iat", "user_iat", "user_iat_full_attention"]
    res = run_experiment(data, small_config(), rows=rows, seeds=1, progress=lambda m: None)
    by = {r["model"]: r for r in res["rows"]}
    for name in ("base", "user_iat", "temporal_iat"):
        assert by[name]["auc"] > by["base_item_ids_only"]["auc"] + 0.02, name
    assert abs(by["user_iat"]["auc"] - by["user_iat_full_attention"]["auc"]) < 0.03
    for r in res["rows"]:
        assert set(r) >= {"model", "auc", "gauc", "logloss", "auc_std", "gauc_std", "logloss_std", "per_task"}
        assert set(r["per_task"]) == {"like", "love"}
    assert by["user_iat"]["runs"][0]["extra"]["source"]["protocol"] == "time_ordered"
    assert {c["name"] for c in res["comparisons"]} >= {"user_iat - base", "base - base_item_ids_only"}
    json_path, png_path = write_results(res, tmp_path)
    assert json.loads(json_path.read_text())["dataset"] == "synthetic"
    assert png_path.stat().st_size > 1000
    assert "user_iat_full_attention" in results_table(res)


def test_zero_insemb_control_is_user_iat_with_zero_insembs(data):
    """The control differs from user_iat by its InsEmbs alone: every InsEmb input zero, every
    other input of the same rows identical (past labels included), the same model config and
    the same initial weights for a seed."""
    from models.nn.base import FeatureShape
    from models.nn.downstream import IATDownstream
    from models.training.downstream import iat_batch
    from models.training.experiment import downstream_inputs
    from models.training.loop import set_seed

    cfg = small_config()
    cfg.train.epochs = 1
    e_user, mc_user, _ = downstream_inputs("user_iat", data, 0, cfg)
    e_zero, mc_zero, info = downstream_inputs("user_iat_zero_insemb", data, 0, cfg)
    cfg._shared.clear()
    assert mc_zero == mc_user and mc_user.label_side_info and mc_user.seq_label_side_info
    assert e_zero.shape == e_user.shape and not e_zero.any() and np.abs(e_user).sum(1).min() > 0
    assert info == {"insembs": "zero"}  # no source model trained for the control
    rows = data.split_indices(0)[::7]
    user_batch, zero_batch = iat_batch(data, rows, e_user, mc_user), iat_batch(data, rows, e_zero, mc_zero)
    assert user_batch.keys() == zero_batch.keys() >= {"hist_emb", "hist_labels", "seq_labels", "seq_items"}
    for key in user_batch:
        if key != "hist_emb":
            assert torch.equal(user_batch[key], zero_batch[key]), key
    mask = user_batch["hist_mask"]
    assert not zero_batch["hist_emb"].any()
    assert (user_batch["hist_emb"].abs().sum(-1)[mask] > 0).all()
    assert (user_batch["hist_labels"][mask] >= 0).all()  # past labels reach both rows
    shape = FeatureShape.of(data)
    set_seed(0)
    a = IATDownstream(mc_user, shape).state_dict()
    set_seed(0)
    b = IATDownstream(mc_zero, shape).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_insemb_control_is_a_default_row_and_compared():
    from models.training.experiment import COMPARISONS
    assert ROWS["user_iat_zero_insemb"].default
    pairs = {(a, b) for a, b, _ in COMPARISONS}
    assert {("user_iat", "user_iat_zero_insemb"), ("user_iat", "temporal_iat"),
            ("temporal_iat", "user_iat_zero_insemb"), ("user_iat", "base"), ("sif", "base"),
            ("user_iat", "user_iat_full_attention")} <= pairs


def test_paired_differences_and_sample_std_in_results(data):
    """Two rows whose test AUC differ per seed: results.json holds ddof=1 stds, per-row 95%
    t-intervals and the paired difference by seed with its interval."""
    from models.training.experiment import COMPARISONS
    from models.training.statistics import t_quantile

    def noisy(shift):
        def row(d, seed, cfg):
            rng = np.random.default_rng(seed)
            val, test = d.split_indices(1), d.split_indices(2)
            score = d.labels[test] * (0.2 + 0.1 * seed + shift) + rng.random((len(test), len(d.tasks)))
            return RowResult(np.full((len(val), len(d.tasks)), 0.5), score, {})
        return row

    a, b = COMPARISONS[0][:2]
    saved = {n: ROWS.pop(n) for n in (a, b)}
    register_row(a, noisy(0.3))
    register_row(b, noisy(0.0))
    try:
        res = run_experiment(data, small_config(), rows=[a, b], seeds=3, progress=lambda m: None)
    finally:
        ROWS.update(saved)
    by = {r["model"]: r for r in res["rows"]}
    aucs = {n: [run["test"]["like"]["auc"] for run in by[n]["runs"]] for n in (a, b)}
    assert by[a]["auc_std"] == pytest.approx(np.std(aucs[a], ddof=1))
    half = t_quantile(0.975, 2) * np.std(aucs[a], ddof=1) / np.sqrt(3)
    assert by[a]["auc_ci95"] == pytest.approx([np.mean(aucs[a]) - half, np.mean(aucs[a]) + half])
    (comp,) = res["comparisons"]
    assert comp["name"] == f"{a} - {b}"
    diff = comp["per_task"]["like"]["auc"]
    d = np.subtract(aucs[a], aucs[b])
    assert diff["diffs"] == pytest.approx(d.tolist()) and diff["seeds"] == [0, 1, 2]
    half = t_quantile(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
    assert diff["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert diff["ci"][0] > 0  # the planted gap shows as an interval above 0
    table = results_table(res)
    assert f"{a} - {b}" in table and "95%" in table


def test_t_quantile_matches_tables():
    from models.training.statistics import t_quantile
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)


def test_quick_help_matches_the_quick_config(capsys):
    """`iat experiment --help` says what --quick runs, and that is ExperimentConfig.quick()."""
    import re

    from cli import main

    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    quick = re.search(r"--quick (.*?) --seeds SEEDS", text).group(1)
    q = ExperimentConfig.quick()
    epochs = int(re.search(r"(\d+) epochs?\b", quick).group(1))
    history = int(re.search(r"downstream L (\d+)", quick).group(1))
    seq = int(re.search(r"behaviour sequence (\d+)", quick).group(1))
    window = int(re.search(r"source window (\d+)", quick).group(1))
    assert (epochs, history, seq, window) == (q.train.epochs, q.model.history_len, q.model.seq_len,
                                              q.source_window)
    assert f"quick {q.model.history_len}" in re.search(r"--history-len HISTORY_LEN (.*?) --", text).group(1)
    from cli.experiment import DEFAULT_SEEDS, QUICK_SEEDS
    assert re.search(rf"{QUICK_SEEDS} seed unless --seeds", quick)
    assert DEFAULT_SEEDS >= 5
    source_batch = re.search(r"--source-batch-size SOURCE_BATCH_SIZE (.*?) --source-lr", text).group(1)
    assert f"quick: {q.source_batch_size};" in source_batch
    source_lr = re.search(r"--source-lr SOURCE_LR (.*?) --source-warmup", text).group(1)
    assert float(re.search(r"quick: ([0-9.e-]+)\)", source_lr).group(1)) == q.source_lr
    warmup = re.search(r"--source-warmup-steps SOURCE_WARMUP_STEPS (.*?) --threads", text).group(1)
    assert f"default {ExperimentConfig().source_warmup_steps};" in warmup


def test_comparisons_by_history_length_cover_the_test_split(data):
    """Every comparison carries its paired AUC difference per history-length bucket; the
    buckets partition the test split, and a row that is better only for users with a long
    history shows it there and not for the users without one."""
    from models.training.experiment import COMPARISONS

    lengths = data.history_length()

    def row(boost_long):
        def fn(d, seed, cfg):
            val, test = d.split_indices(1), d.split_indices(2)
            rng = np.random.default_rng(seed)
            score = rng.random((len(test), len(d.tasks)))
            if boost_long:
                long = lengths[test] >= 10
                score[long] += d.labels[test][long]
            return RowResult(np.full((len(val), len(d.tasks)), 0.5), score, {})
        return fn

    a, b = COMPARISONS[0][:2]
    saved = {n: ROWS.pop(n) for n in (a, b)}
    register_row(a, row(True))
    register_row(b, row(False))
    try:
        res = run_experiment(data, small_config(), rows=[a, b], seeds=3, progress=lambda m: None)
    finally:
        ROWS.update(saved)
    (comp,) = res["comparisons"]
    buckets = comp["auc_by_history"]
    assert sum(b["n"] for b in buckets.values()) == len(data.split_indices(2))
    long = [b for label, b in buckets.items() if b["n"] and label not in ("0", "1-9")]
    assert long and all(b["mean"] > 0.2 for b in long)
    if buckets["0"]["n"] and buckets["0"]["mean"] is not None:
        assert abs(buckets["0"]["mean"]) < 0.2  # same random scores for users without history
    assert "history length" in results_table(res)
