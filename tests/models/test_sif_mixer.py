"""SIF-Mixer: history encoded once, no leakage from the future or from other candidates."""
import numpy as np
import pytest
import torch

from models.nn.sif.mixer import SIFMixer
from models.nn.sif.spec import (
    CategoricalField,
    FeatureGroup,
    SampleInputs,
    SampleSchema,
)
from models.nn.sif.tokenizer import SampleTokenizer, codes_from_token_samples
from models.training.sif.history import gather_history
from models.training.sif.losses import alignment_loss

torch.set_num_threads(1)

MODES = [("factored", None), ("pooled", None), ("flat", None), ("factored", [1])]  # last: item id only


def schema() -> SampleSchema:
    return SampleSchema(
        categorical=(
            CategoricalField("user_id", 50),
            CategoricalField("age", 7),
            CategoricalField("item_id", 80),
            CategoricalField("hour", 24),
        ),
        multi=(CategoricalField("genre", 19),),
        numeric=("year",),
        groups=(
            FeatureGroup("user", ("user_id", "age")),
            FeatureGroup("item_id", ("item_id",)),
            FeatureGroup("item", ("genre", "year")),
            FeatureGroup("context", ("hour",)),
        ),
        item_id_field="item_id",
    )


def samples(shape, seed=0) -> SampleInputs:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, b, shape, generator=g) for b in (50, 7, 80, 24)], dim=-1)
    multi = torch.randint(0, 19, (*shape, 1, 2), generator=g)
    return SampleInputs(cat, torch.randn(*shape, 1, generator=g), multi)


def make(mode="factored", columns=None, seed=0):
    torch.manual_seed(seed)
    tok = SampleTokenizer(schema(), codebook_size=32, levels=3)
    tok.train()
    tok(samples((512,), seed=9))  # k-means initialisation of the codebooks from data
    mixer = SIFMixer(schema(), tok.quantizer.codebooks, history_mode=mode, history_columns=columns, n_blocks=2)
    mixer.eval()
    return tok, mixer


def history(b=3, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 32, (b, length, 4, 3), generator=g)
    recency = torch.randint(0, 32, (b, length), generator=g)
    mask = torch.rand(b, length, generator=g) > 0.25
    mask[0] = False  # a user without history
    outcomes = torch.randint(0, 2, (b, length, 1), generator=g)
    return codes, recency, mask, outcomes


@pytest.mark.parametrize("mode,columns", MODES)
def test_shapes_and_single_request_form(mode, columns):
    _, mixer = make(mode, columns)
    codes, recency, mask, outcomes = history()
    memory = mixer.encode_history(codes, recency, mask, outcomes)
    logits = mixer.score(memory, samples((3, 5)))
    assert logits.shape == (3, 5, 1) and torch.isfinite(logits).all()
    one = mixer.encode_history(codes[1:2], recency[1:2], mask[1:2], outcomes[1:2])
    assert mixer.score(one, samples((5,))).shape == (5, 1)
    assert mixer(codes, recency, mask, samples((3,)), outcomes).shape == (3, 1)


@pytest.mark.parametrize("mode,columns", MODES)
def test_candidate_scored_alone_equals_scored_among_100_others(mode, columns):
    _, mixer = make(mode, columns)
    codes, recency, mask, outcomes = history(b=1, length=30)
    memory = mixer.encode_history(codes, recency, mask, outcomes)
    many = samples((101,), seed=5)
    together = mixer.score(memory, many)
    for i in (0, 17, 100):
        alone = mixer.score(memory, many.index(slice(i, i + 1)))
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)
    assert together.std() > 0  # candidates do get different scores


@pytest.mark.parametrize("mode,columns", MODES)
def test_target_never_changes_the_encoded_history(mode, columns):
    _, mixer = make(mode, columns)
    codes, recency, mask, outcomes = history()
    seen = []
    original = mixer.encode_history

    def recording(*args, **kwargs):
        memory = original(*args, **kwargs)
        seen.append(memory)
        return memory

    mixer.encode_history = recording
    a = mixer(codes, recency, mask, samples((3,), seed=3), outcomes)
    b = mixer(codes, recency, mask, samples((3,), seed=4), outcomes)
    assert not torch.allclose(a, b)
    for x, y in zip(seen[0], seen[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("mode,columns", MODES)
def test_masked_history_slots_do_not_matter(mode, columns):
    _, mixer = make(mode, columns)
    codes, recency, mask, outcomes = history()
    target = samples((3, 4), seed=7)
    before = mixer.score(mixer.encode_history(codes, recency, mask, outcomes), target)
    noisy_codes = torch.where(mask[..., None, None], codes, torch.randint_like(codes, 0, 32))
    noisy_recency = torch.where(mask, recency, torch.randint_like(recency, 0, 32))
    noisy_outcomes = torch.where(mask[..., None], outcomes, 1 - outcomes)
    after = mixer.score(mixer.encode_history(noisy_codes, noisy_recency, mask, noisy_outcomes), target)
    torch.testing.assert_close(before, after, rtol=0, atol=1e-6)
    # a real slot does matter (the check above could fail)
    changed = codes.clone()
    b, l = mask.nonzero()[0].tolist()
    changed[b, l] = (changed[b, l] + 7) % 32
    moved = mixer.score(mixer.encode_history(changed, recency, mask, outcomes), target)
    assert not torch.allclose(before[b], moved[b], atol=1e-6)


def test_no_leakage_from_samples_at_or_after_the_request_time():
    """Changing an instance that is not strictly before the request leaves its prediction unchanged."""
    tok, mixer = make()
    n = 40
    log = samples((n,), seed=11)
    timestamps = torch.arange(n, dtype=torch.float64) * 60.0
    timestamps[20] = timestamps[19]  # a same-time instance: not history for request 19
    labels = torch.randint(0, 2, (n, 1))
    requests = torch.tensor([19, 30])
    # a careless index that offers every earlier-or-equal row (newest first), even the request itself
    index = torch.stack([torch.arange(int(r) + 2, int(r) - 15, -1).clamp(min=-1) for r in requests])
    index[index > n - 1] = -1

    def predict(log_samples, lab):
        codes = codes_from_token_samples(tok.tokenize(log_samples), tok.n_subtokens, tok.levels)
        hist = gather_history(codes, index, timestamps, timestamps[requests], lab)
        memory = mixer.encode_history(hist.rows, hist.recency, hist.mask, hist.outcomes)
        return mixer.score_rows(memory, mixer.project_target(log_samples.index(requests)).unsqueeze(1))

    base = predict(log, labels)
    future = SampleInputs(log.categorical.clone(), log.numeric.clone(), log.multi.clone())
    future_labels = labels.clone()
    for row in (19, 20, 21):  # row 19 is request 0 itself; 20 shares its timestamp; 21 is later
        future.categorical[row] = (future.categorical[row] + 3) % torch.tensor([50, 7, 80, 24])
        future.numeric[row] += 5.0
        future_labels[row] = 1 - future_labels[row]
    # the target features of request 0 changed too; score only the history part by reusing them
    changed = predict(future, future_labels)
    future_target_only = predict(
        SampleInputs(
            torch.where(torch.arange(n)[:, None] == 19, future.categorical, log.categorical),
            torch.where(torch.arange(n)[:, None] == 19, future.numeric, log.numeric),
            log.multi,
        ),
        labels,
    )
    torch.testing.assert_close(changed[0], future_target_only[0], rtol=0, atol=1e-6)
    # request 1 (row 30) sees rows 19-21 in its past: its prediction must move
    assert not torch.allclose(changed[1], base[1], atol=1e-6)


def test_stored_uint8_codes_are_accepted():
    tok, mixer = make()
    stored = tok.tokenize(samples((2 * 6,), seed=2)).reshape(2, 6, -1)
    assert stored.dtype == np.uint8
    codes = codes_from_token_samples(stored, tok.n_subtokens, tok.levels)
    as_uint8 = torch.from_numpy(stored).reshape(2, 6, tok.n_subtokens, tok.levels)
    mask = torch.ones(2, 6, dtype=torch.bool)
    recency = torch.zeros(2, 6, dtype=torch.long)
    a = mixer.score(mixer.encode_history(codes, recency, mask), samples((2, 3)))
    b = mixer.score(mixer.encode_history(as_uint8, recency, mask), samples((2, 3)))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="codes"):
        mixer.encode_history(codes[..., :2], recency, mask)


def test_alignment_pulls_the_target_projection_onto_the_codebook():
    tok, mixer = make()
    tok.eval()
    data = samples((256,), seed=3)
    q = mixer.reconstruct(tok.quantize(data))
    opt = torch.optim.Adam(mixer.target_projection.parameters(), lr=1e-2)
    first = float(alignment_loss(mixer.project_target(data), q).detach())
    for _ in range(60):
        loss = alignment_loss(mixer.project_target(data), q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    assert mixer.codebooks.grad is None  # sg(q): the codebook is not pulled towards P(x)


def test_dense_rows_history():
    schema_ = schema()
    mixer = SIFMixer(schema_, None)
    rows = torch.randn(2, 5, 4, 32)
    memory = mixer.encode_history_rows(rows, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool))
    assert mixer.score(memory, samples((2, 3))).shape == (2, 3, 1)
    with pytest.raises(ValueError, match="no codebooks"):
        mixer.encode_history(torch.zeros(2, 5, 4, 3, dtype=torch.long), torch.zeros(2, 5), torch.ones(2, 5))
