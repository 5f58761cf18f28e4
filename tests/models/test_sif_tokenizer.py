"""Sample Tokenizer (HGAQ): sub-token layout, residual VQ, determinism, dead codes, health, storage."""
import numpy as np
import pytest
import torch

from models.nn.sif.rvq import ResidualVQ
from models.nn.sif.spec import (
    CategoricalField,
    FeatureGroup,
    SampleInputs,
    SampleSchema,
    split_into_subtokens,
)
from models.nn.sif.tokenizer import SampleTokenizer, codes_from_token_samples
from models.training.sif.compression import (
    compression_ratio,
    raw_sample_bytes,
    token_sample_bytes,
)
from models.training.sif.health import code_perplexity, codebook_health
from models.training.sif.losses import auxiliary_pctr_loss

torch.set_num_threads(1)


def toy_schema() -> SampleSchema:
    return SampleSchema(
        categorical=(
            CategoricalField("user_id", 200),
            CategoricalField("age", 7),
            CategoricalField("gender", 2),
            CategoricalField("occupation", 21),
            CategoricalField("zip", 50),
            CategoricalField("item_id", 300),
            CategoricalField("hour", 24),
            CategoricalField("weekday", 7),
        ),
        multi=(CategoricalField("genre", 19),),
        numeric=("year", "popularity"),
        groups=(
            FeatureGroup("user", ("user_id", "age", "gender", "occupation", "zip")),
            FeatureGroup("item_id", ("item_id",)),
            FeatureGroup("item", ("genre", "year", "popularity")),
            FeatureGroup("context", ("hour", "weekday")),
        ),
        item_id_field="item_id",
    )


def toy_inputs(n: int, seed: int = 0) -> SampleInputs:
    g = torch.Generator().manual_seed(seed)
    buckets = [200, 7, 2, 21, 50, 300, 24, 7]
    cat = torch.stack([torch.randint(0, b, (n,), generator=g) for b in buckets], dim=1)
    multi = torch.randint(-1, 19, (n, 1, 3), generator=g)
    multi[:, :, 0] = multi[:, :, 0].clamp(min=0)  # at least one genre
    num = torch.randn(n, 2, generator=g)
    return SampleInputs(cat, num, multi)


def test_adaptive_subtokens_follow_ceil_f_over_k():
    schema = toy_schema()
    layout = split_into_subtokens(schema, k=4)
    per_group = {}
    for t in layout:
        per_group.setdefault(t.group, []).append(t.fields)
    assert {g: len(v) for g, v in per_group.items()} == {"user": 2, "item_id": 1, "item": 1, "context": 1}
    assert per_group["user"] == [("user_id", "age", "gender"), ("occupation", "zip")]  # even split, 3 + 2
    assert len(split_into_subtokens(schema, k=1)) == 11  # one field per sub-token
    assert len(split_into_subtokens(schema, k=2)) == 3 + 1 + 2 + 1


def test_schema_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        SampleSchema(categorical=(CategoricalField("a", 3),), groups=(FeatureGroup("user", ("a", "nope")),))
    with pytest.raises(ValueError, match="'item_id' must sit alone"):
        SampleSchema(
            categorical=(CategoricalField("item_id", 3), CategoricalField("cat", 3)),
            groups=(FeatureGroup("item", ("item_id", "cat")),),
            item_id_field="item_id",
        )
    tok = SampleTokenizer(toy_schema(), codebook_size=16)
    bad = toy_inputs(8)
    bad.categorical[3, 6] = 24  # hour out of range
    with pytest.raises(ValueError, match="'hour'"):
        tok.tokenize(bad)
    nan = toy_inputs(8)
    nan.numeric[2, 1] = float("nan")
    with pytest.raises(ValueError, match="'popularity'"):
        tok.tokenize(nan)


def trained_tokenizer(steps: int = 60, **kwargs) -> tuple[SampleTokenizer, SampleInputs]:
    torch.manual_seed(0)
    tok = SampleTokenizer(toy_schema(), **kwargs)
    data = toy_inputs(4096, seed=1)
    labels = (data.numeric[:, :1] > 0).float()  # popularity decides the label
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, 4096, (512,))
        out = tok(data.index(idx))
        loss = auxiliary_pctr_loss(out.aux_logits, labels[idx]) + out.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        tok.quantizer.reseed_dead_codes()
    return tok, data


def test_reconstruction_error_falls_with_each_level_and_health_reports_it():
    tok, data = trained_tokenizer(codebook_size=64)
    tok.eval()
    out = tok(data)
    errors = out.level_error.tolist()
    assert len(errors) == 3
    assert errors[0] > errors[1] > errors[2] > 0
    health = codebook_health(tok.quantizer, out.z, out.codes)
    rel = [lvl["relative_error"] for lvl in health["levels"]]
    assert rel[0] > rel[1] > rel[2]
    assert rel[0] < 1.0  # the first level already explains part of the signal
    for lvl in health["levels"]:
        assert 0 < lvl["usage"] <= 1
        assert 1 <= lvl["perplexity"] <= 64


def test_codes_are_deterministic_per_sample_and_compact():
    tok, data = trained_tokenizer(steps=20, codebook_size=256)
    batch = data.index(slice(0, 300))
    first = tok.tokenize(batch)
    assert first.dtype == np.uint8 and first.shape == (300, tok.n_subtokens * 3)
    again = tok.tokenize(batch)
    np.testing.assert_array_equal(first, again)
    alone = np.concatenate([tok.tokenize(batch.index(slice(i, i + 1))) for i in range(0, 300, 37)])
    np.testing.assert_array_equal(alone, first[::37])
    perm = torch.randperm(300)
    shuffled = tok.tokenize(batch.index(perm))
    np.testing.assert_array_equal(shuffled, first[perm.numpy()])
    # training mode (batch statistics, usage updates) does not change the stored codes
    assert tok.training
    codes = codes_from_token_samples(first, tok.n_subtokens, 3)
    assert codes.shape == (300, tok.n_subtokens, 3) and codes.dtype == torch.int64


def test_wide_codebooks_use_uint16():
    tok = SampleTokenizer(toy_schema(), codebook_size=300, levels=2)
    codes = tok.tokenize(toy_inputs(16))
    assert codes.dtype == np.uint16 and codes.shape == (16, tok.n_subtokens * 2)


def _train_toy_vq(reseed: bool, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    centers = torch.randn(128, 8, generator=g) * 3
    vq = ResidualVQ(1, 8, levels=1, codebook_size=64, reseed_dead_codes=reseed)
    with torch.no_grad():
        vq.codebooks.mul_(0.1)  # every code starts bunched near the origin
    opt = torch.optim.Adam(vq.parameters(), lr=0.01)
    for _ in range(300):
        idx = torch.randint(0, 128, (256,), generator=g)
        z = (centers[idx] + 0.1 * torch.randn(256, 8, generator=g)).unsqueeze(1)
        out = vq(z)
        opt.zero_grad()
        out.commit_loss.backward()
        opt.step()
        vq.reseed_dead_codes()
    vq.eval()
    idx = torch.randint(0, 128, (4096,), generator=g)
    z = (centers[idx] + 0.1 * torch.randn(4096, 8, generator=g)).unsqueeze(1)
    return float(code_perplexity(vq(z).codes[..., 0], 64)[0])


def test_dead_code_reseeding_raises_code_usage():
    without = _train_toy_vq(reseed=False)
    with_reseed = _train_toy_vq(reseed=True)
    assert with_reseed > 1.3 * without, (without, with_reseed)


def test_aux_head_trains_the_codebook_vectors():
    tok = SampleTokenizer(toy_schema(), codebook_size=16)
    out = tok(toy_inputs(64))
    auxiliary_pctr_loss(out.aux_logits, torch.ones_like(out.aux_logits)).backward()
    assert tok.quantizer.codebooks.grad is not None and tok.quantizer.codebooks.grad.abs().sum() > 0
    assert tok.encoder.projections[0].weight.grad.abs().sum() > 0  # straight-through to the encoder


def test_compression_ratio_from_schema():
    schema = toy_schema()
    raw = raw_sample_bytes(schema, {"genre": 1.7})
    assert raw == pytest.approx(4 * (10 + 1.7))
    tok = SampleTokenizer(schema)
    assert tok.token_bytes == token_sample_bytes(tok.n_subtokens, 3, 256) == 5 * 3
    assert compression_ratio(raw, tok.token_bytes) == pytest.approx(raw / 15)


def test_schema_without_numerics_or_multi_values():
    schema = SampleSchema(
        categorical=(CategoricalField("user_id", 10), CategoricalField("item_id", 20)),
        groups=(FeatureGroup("user", ("user_id",)), FeatureGroup("item_id", ("item_id",))),
        item_id_field="item_id",
    )
    tok = SampleTokenizer(schema, codebook_size=8)
    inputs = SampleInputs(torch.stack([torch.arange(6) % 10, torch.arange(6) % 20], 1), torch.zeros(6, 0))
    tok(inputs)
    assert tok.tokenize(inputs).shape == (6, 2 * 3)
