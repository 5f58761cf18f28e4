"""The source models' time-ordered protocol (models.training.protocol), checked through a real
Redis instance store: every InsEmb is stored before its instance is trained on, streaming
reads only strictly earlier instances of the same user, two-pass keeps each user's late job,
and `iat train` serves the model the `user_iat` row evaluates."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import ModelConfig
from models.training.loop import TrainConfig
from models.training.protocol import (
    ProtocolConfig,
    plan_pass,
    protocol_insembs,
    run_pass,
    time_order,
    two_pass_insembs,
)
from models.training.registry import ExperimentConfig

CFG = ModelConfig(emb_dim=8, seq_len=8, history_len=16, insemb_dim=16, sit_ffn=32, adapt_dim=24, iat_width=16)
PCFG = ProtocolConfig(batch_fraction=0.5, window=16, history_limit=6, batch_size=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=40, n_items=50, events_per_user=25)


def _redis_provider(redis_client, log_fetches=False):
    from cli.experiment import RedisHistoryProvider
    from storage.instance_store import InstanceStore

    store = InstanceStore(redis_client, prefix="proto", dim=CFG.insemb_dim, codec="fp32",
                          retention_days=None, max_sequence_length=1024)
    return store, RedisHistoryProvider(store, source_version="proto", log_fetches=log_fetches)


def _stored(store, data, rows) -> dict[int, np.ndarray]:
    """ins_id -> the InsEmb Redis holds for it (read as serving reads histories)."""
    users = sorted({str(u) for u in data.user_ids[data.user_index[rows]]})
    out = {}
    for user, history in zip(users, store.read_histories(users, [2**52] * len(users), 1024)):
        out.update({int(i): e for i, e in zip(history.ins_ids, history.embeddings)})
    return out


@pytest.mark.parametrize("kind", ["user", "temporal"])
def test_each_insemb_is_in_the_store_before_its_instance_is_trained_on(data, redis_client, kind):
    store, provider = _redis_provider(redis_client)
    log = []  # per trained instance: (row, its record was in Redis, Redis held what the model embeds now)

    final = []

    def on_train(state, rows):
        held = _stored(store, data, rows)
        now = state.embed(rows)
        for k, r in enumerate(rows):
            ins = int(data.ins_id[r])
            log.append((int(r), ins in held, ins in held and np.array_equal(held[ins], now[k])))
        final[:] = [state]

    res = protocol_insembs(kind, data, CFG, PCFG, seed=0, provider=provider, on_train=on_train)
    train = data.split_indices(0)
    trained = [r for r, _, _ in log]
    assert sorted(trained) == sorted(train.tolist())  # every training instance once
    assert all(present for _, present, _ in log)  # its record was in Redis before the step
    assert all(same for _, _, same in log)  # ... holding what the pre-step model embeds
    assert res.info["batches"]["batch"] > 0 and res.info["batches"]["stream"] > 0
    # the downstream trains on the stored InsEmbs, exactly as Redis serves them
    held = _stored(store, data, train)
    np.testing.assert_array_equal(res.insembs[train], np.stack([held[int(data.ins_id[r])] for r in train]))
    # and the final model's InsEmbs differ from those written during the pass
    assert not np.allclose(res.insembs[train], final[0].embed(train))
    later = np.flatnonzero(data.split != 0)
    np.testing.assert_allclose(res.insembs[later], final[0].embed(later), rtol=1e-6)


def test_streaming_fetches_only_strictly_earlier_instances_of_the_same_user(data, redis_client):
    _, provider = _redis_provider(redis_client, log_fetches=True)
    state, plan = run_pass("user", data, CFG, PCFG, seed=1, provider=provider)
    ins_to_row = {int(i): r for r, i in enumerate(data.ins_id)}
    written_before: set[int] = set()
    k = 0
    for batch in plan:
        if batch.kind == "stream":
            for r in batch.rows:
                user, before, ins_ids, ts = provider.fetches[k]
                k += 1
                assert user == str(data.user_ids[data.user_index[r]]) and before == data.ts_ms[r]
                rows = [ins_to_row[int(i)] for i in ins_ids]
                assert all(data.user_index[h] == data.user_index[r] for h in rows)
                assert all(data.ts_ms[h] < data.ts_ms[r] for h in rows)
                assert (np.diff(ts) <= 0).all()  # newest first
                expected = [h for h in written_before if data.user_index[h] == data.user_index[r]
                            and data.ts_ms[h] < data.ts_ms[r]]
                expected = sorted(expected, key=lambda h: data.ts_ms[h])[::-1][:PCFG.history_limit]
                assert sorted(rows) == sorted(expected)
        written_before.update(int(r) for r in batch.rows)
    assert k == len(provider.fetches) == sum(len(b.rows) for b in plan if b.kind == "stream") > 0
    assert any(len(f[2]) for f in provider.fetches)


def test_the_pass_is_time_ordered_and_splits_batch_from_streaming(data):
    train = data.split_indices(0)
    plan = plan_pass(data, train, PCFG, np.random.default_rng(0))
    ordered = time_order(data, train)
    cut = round(len(train) * PCFG.batch_fraction)
    batch_rows = np.concatenate([b.rows for b in plan if b.kind == "batch"])
    stream_rows = np.concatenate([b.rows for b in plan if b.kind == "stream"])
    assert sorted(batch_rows.tolist()) == sorted(ordered[:cut].tolist())
    np.testing.assert_array_equal(stream_rows, ordered[cut:])
    for b in plan:
        for q in b.seqs:  # user-order windows: one user, in time order
            assert len(set(data.user_index[q].tolist())) == 1 and (np.diff(data.ts_ms[q]) >= 0).all()
    with pytest.raises(ValueError, match="batch_fraction"):
        ProtocolConfig(batch_fraction=1.5)


def test_two_pass_stores_each_users_insembs_from_the_job_that_sees_it_late(data):
    res = two_pass_insembs(data, CFG, PCFG, seed=0)
    order = np.random.default_rng(0).permutation(data.n_users)
    forward, _ = run_pass("user", data, CFG, PCFG, 0, user_order=order)
    backward, _ = run_pass("user", data, CFG, PCFG, 1, user_order=order[::-1].copy())
    train = data.split_indices(0)
    late_forward = np.isin(data.user_index[train], order[len(order) // 2:])
    assert late_forward.any() and (~late_forward).any()
    np.testing.assert_allclose(res.insembs[train[late_forward]], forward.stored[train[late_forward]], rtol=1e-6)
    np.testing.assert_allclose(res.insembs[train[~late_forward]], backward.stored[train[~late_forward]], rtol=1e-6)
    assert res.info["users_from_forward"] == data.n_users - data.n_users // 2


def test_iat_train_serves_the_user_iat_rows_model(data, tmp_path):
    """`iat train` and the `user_iat` row: the same source pass and the same downstream weights
    for the same seed and config (the served model is the evaluated one)."""
    from models.training.experiment import fit_downstream_row, predict_downstream
    from models.training.registry import ROWS
    from models.training.serving_set import train_serving_set

    cfg = ExperimentConfig(model=CFG, train=TrainConfig(epochs=1, batch_size=64, progress=False), source_window=16)
    row = ROWS["user_iat"].fn(data, 0, cfg)
    cfg._shared.clear()
    model, e_all, info = fit_downstream_row("user_iat", data, 0, cfg)
    cfg._shared.clear()
    np.testing.assert_allclose(row.test_probs, predict_downstream(model, data, data.split_indices(2), e_all),
                               rtol=1e-6)
    assert info["source"]["protocol"] == "time_ordered"
    run_dir = train_serving_set(data, cfg, tmp_path / "run", seed=0, progress=lambda m: None)
    served = torch.load(run_dir / "iat" / "weights.pt", weights_only=True)
    ours = model.state_dict()
    assert ours and all(torch.equal(served[f"model.{k}"], v) for k, v in ours.items())
    assert json.loads((run_dir / "run.json").read_text())["metrics"]["source"]["protocol"] == "time_ordered"


@pytest.mark.parametrize("command, flag, value", [("experiment", "--batch-fraction", "1.5"),
                                                 ("train", "--batch-fraction", "-0.1"),
                                                 ("experiment", "--source-batch-size", "0")])
def test_protocol_flags_are_checked(command, flag, value, tmp_path, capsys):
    import argparse

    module = __import__(f"cli.{command}", fromlist=["run"])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(["--dataset", "synthetic", "--out", str(tmp_path / "out"), flag, value])
    assert module.run(args) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_experiment_config_sets_the_pass():
    cfg = ExperimentConfig(model=CFG, train=TrainConfig(batch_size=256, lr=1e-3), source_window=32,
                           batch_fraction=0.25)
    p = cfg.protocol()
    assert (p.batch_fraction, p.window, p.history_limit, p.batch_size, p.lr) == (0.25, 32, 31, 256, 1e-3)
    cfg.source_batch_size = 64
    assert cfg.protocol().batch_size == 64 and cfg.to_dict()["source_batch_size"] == 64
