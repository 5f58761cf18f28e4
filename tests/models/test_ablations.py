"""The DIN baseline and the IAT paper's ablations (Tab. 4) as experiment rows: each runs through
the experiment and changes what it claims to change, with defaults untouched; DIN's attention
masks padding and never reads the instance itself or a later one."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.data.synthetic import synthetic_data
from models.nn.base import FeatureShape, ModelConfig
from models.nn.din import DINAttention, DINRanker
from models.nn.downstream import IATDownstream
from models.training.batches import feature_batch
from models.training.downstream import iat_batch
from models.training.experiment import COMPARISONS, run_experiment
from models.training.loop import TrainConfig
from models.training.protocol import ProtocolConfig, protocol_insembs
from models.training.registry import ROWS, ExperimentConfig

CFG = ModelConfig(emb_dim=8, seq_len=8, history_len=16, insemb_dim=16, sit_ffn=32, adapt_dim=24, iat_width=16)
PCFG = ProtocolConfig(batch_fraction=0.5, window=16, history_limit=6, batch_size=64)
NEW_ROWS = ("din", "user_iat_insemb_after_sit", "user_iat_transformer_after_fi",
            "user_iat_no_other_side_info", "temporal_iat_no_other_side_info")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=40, n_items=50, events_per_user=25)


def test_new_rows_are_registered_off_by_default_and_compared():
    for name in NEW_ROWS:
        assert not ROWS[name].default and ROWS[name].description, name
    pairs = {(a, b) for a, b, _ in COMPARISONS}
    assert {("user_iat", "user_iat_insemb_after_sit"), ("user_iat", "user_iat_transformer_after_fi"),
            ("user_iat", "user_iat_no_other_side_info"), ("temporal_iat", "temporal_iat_no_other_side_info"),
            ("user_iat", "din"), ("base", "din")} <= pairs


def test_new_rows_run_through_the_experiment(data):
    cfg = ExperimentConfig(model=CFG, train=TrainConfig(epochs=1, patience=1, batch_size=128, progress=False),
                           source_window=16)
    rows = ["user_iat", *NEW_ROWS]
    res = run_experiment(data, cfg, rows=rows, seeds=1, progress=lambda m: None)
    by = {r["model"]: r for r in res["rows"]}
    assert set(by) == set(rows)
    for name in rows:  # run_experiment rejects predictions of the wrong shape; metrics are real
        assert 0.0 < by[name]["auc"] < 1.0 and np.isfinite(by[name]["logloss"]), name
    assert by["user_iat_insemb_after_sit"]["runs"][0]["extra"]["source"]["insemb"] == "after_sit"
    assert "insemb" not in by["user_iat"]["runs"][0]["extra"]["source"]  # default pass untouched
    names = {c["name"] for c in res["comparisons"]}
    assert {"user_iat - user_iat_insemb_after_sit", "user_iat - din"} <= names
    # the rows' predictions themselves: one probability per validation / test row and task
    val, test = data.split_indices(1), data.split_indices(2)
    for name in ("din", "user_iat_transformer_after_fi"):
        out = ROWS[name].fn(data, 0, cfg)
        assert out.val_probs.shape == (len(val), len(data.tasks))
        assert out.test_probs.shape == (len(test), len(data.tasks))
        assert ((out.test_probs > 0) & (out.test_probs < 1)).all()


# ---------------------------------------------------------------- InsEmb stored after the SIT

def test_insemb_after_sit_changes_what_is_stored_not_how_the_source_trains(data):
    before = protocol_insembs("user", data, CFG, PCFG, seed=0)
    after = protocol_insembs("user", data, CFG, replace(PCFG, insemb="after_sit"), seed=0)
    # the same source model: the option changes only what the downstream reads
    a, b = before.model.state_dict(), after.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert after.info["insemb"] == "after_sit" and "insemb" not in before.info
    assert after.info["val_auc"] == before.info["val_auc"]
    assert before.insembs.shape == after.insembs.shape
    for split in (0, 1, 2):  # stored during the pass (train) and by the final model (val, test)
        rows = data.split_indices(split)
        assert np.abs(after.insembs[rows]).sum(1).min() > 0
        gap = np.abs(after.insembs[rows] - before.insembs[rows]).max(1)
        assert (gap > 1e-3).all(), split
    # test rows: the final model's SIT over the pre-SIT history, i.e. its own sit output
    from models.training.source import labelled_batch
    from models.training.streaming import streaming_sit
    r = data.split_indices(2)[:5]
    hist = data.history_index(PCFG.history_limit)[r]
    mask = hist >= 0
    with torch.no_grad():
        z, e = streaming_sit(after.model.eval(), labelled_batch(data, r, CFG),
                             torch.from_numpy(before.insembs[np.clip(hist, 0, None)] * mask[..., None]),
                             torch.from_numpy(mask))
    np.testing.assert_allclose(after.insembs[r], z.numpy(), atol=1e-5)
    np.testing.assert_allclose(before.insembs[r], e.numpy(), atol=1e-5)


def test_insemb_option_is_checked(data):
    with pytest.raises(ValueError, match="insemb"):
        ProtocolConfig(insemb="middle")
    with pytest.raises(ValueError, match="insemb"):
        protocol_insembs("temporal", data, CFG, replace(PCFG, insemb="after_sit"), seed=0)


# ---------------------------------------------------------------- downstream variants

def _iat_inputs(data, cfg):
    rows = data.split_indices(2)[:32]
    rng = np.random.default_rng(0)
    e_all = rng.normal(size=(data.n, cfg.insemb_dim)).astype(np.float32)
    other = rng.normal(size=(data.n, cfg.insemb_dim)).astype(np.float32)
    return iat_batch(data, rows, e_all, cfg), iat_batch(data, rows, other, cfg)


@pytest.mark.parametrize("attention", ["shared", "full"])
def test_transformer_after_fi_keeps_the_history_out_of_the_feature_interaction(data, attention):
    batch, other = _iat_inputs(data, CFG)
    for position, history_in_fi in (("before_fi", True), ("after_fi", False)):
        torch.manual_seed(0)
        model = IATDownstream(replace(CFG, attention=attention, iat_position=position),
                              FeatureShape.of(data)).eval()
        fi_out = []
        hook = model.backbone.fi[-1].register_forward_hook(lambda m, i, o, out=fi_out: out.append(o))
        with torch.no_grad():
            logits = [model(batch), model(other)]
        hook.remove()
        assert not torch.allclose(logits[0], logits[1], atol=1e-5), position  # the history matters
        assert torch.allclose(fi_out[0], fi_out[1], atol=1e-6) != history_in_fi, position
    assert model.backbone.n_tokens == CFG.n_feature_tokens  # after FI: no extra token
    with pytest.raises(ValueError, match="iat_position"):
        IATDownstream(replace(CFG, iat_position="nowhere"), FeatureShape.of(data))


def test_no_other_side_info_ignores_the_instances_age(data):
    batch, _ = _iat_inputs(data, CFG)
    later = dict(batch, ts_ms=batch["ts_ms"] + 3_600_000 * 500)  # every history instance older
    for gap_side_info in (True, False):
        torch.manual_seed(0)
        model = IATDownstream(replace(CFG, gap_side_info=gap_side_info), FeatureShape.of(data)).eval()
        with torch.no_grad():
            moved = not torch.allclose(model(batch), model(later), atol=1e-6)
        assert moved == gap_side_info
        assert (model.gap_side is not None) == gap_side_info
        assert model.cfg.label_side_info  # labels stay: the paper drops the other side info only


# ---------------------------------------------------------------- DIN

def test_din_attention_masks_padding():
    torch.manual_seed(0)
    att = DINAttention(8)
    q, keys = torch.randn(4, 8), torch.randn(4, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5, [False] * 6])
    garbage = torch.where(mask[..., None], keys, torch.randn_like(keys) * 100)
    with torch.no_grad():
        out, out_garbage = att(q, keys, mask), att(q, garbage, mask)
        truncated = att(q[1:2], keys[1:2, :3], mask[1:2, :3])
    torch.testing.assert_close(out, out_garbage, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:2], truncated, rtol=1e-6, atol=1e-6)
    assert not out[3].any()  # nothing valid: no interest
    assert out[0].abs().sum() > 0


def test_din_never_reads_the_instance_itself_or_later_ones(data):
    """Scrambling every instance at or after a request's time (all users), and the request's
    own label, leaves DIN's prediction unchanged; flipping the past labels moves it."""
    torch.manual_seed(0)
    model = DINRanker(CFG, FeatureShape.of(data)).eval()
    hist_len = data.history_length()
    requests = [r for r in np.random.default_rng(0).permutation(data.n) if hist_len[r] >= 3][:6]
    for r in requests:
        rng = np.random.default_rng(int(r))
        future = data.ts_ms >= data.ts_ms[r]
        future[r] = False
        n_f = int(future.sum())
        assert n_f > 0
        labels, item_hash, cat = data.labels.copy(), data.item_hash.copy(), data.cat.copy()
        labels[future] = 1.0 - labels[future]
        labels[r] = 1.0 - labels[r]
        item_hash[future] = rng.integers(0, data.n_buckets, n_f)
        cat[future] = rng.integers(0, data.n_buckets, (n_f, cat.shape[1]))
        changed = data.with_arrays(labels=labels, item_hash=item_hash, cat=cat)
        past = (data.ts_ms < data.ts_ms[r]) & (data.user_index == data.user_index[r])
        flipped = data.with_arrays(labels=np.where(past[:, None], 1 - data.labels, data.labels))
        with torch.no_grad():
            out, out_changed, out_flipped = (model(feature_batch(d, np.array([r]), CFG.seq_len))
                                             for d in (data, changed, flipped))
        torch.testing.assert_close(out, out_changed, rtol=0, atol=1e-6)
        assert not torch.allclose(out, out_flipped, atol=1e-6)


def test_din_reads_past_labels_like_base_and_can_drop_them(data):
    shape = FeatureShape.of(data)
    assert DINRanker(CFG, shape).seq_labels is not None  # the same side info as base
    assert DINRanker(replace(CFG, seq_label_side_info=False), shape).seq_labels is None
