"""The user side computed once per request equals the per-candidate formulation it replaced.

``IATRanking`` projects the behaviour sequence (item ids and their past labels) once for all
candidates and reads the shared history memory with one multi-query attention;
``harness.naive.IATPerCandidate`` is the previous formulation (the sequence and its labels
embedded and projected per candidate, the history's keys/values copied per candidate, C
single-query attentions) with the same weights. On the session's serving set (real MovieLens
rows, tests/models/conftest.py), for 1, 100 and 500 candidates, empty, short and full
histories, with all labels known and with unknown (-1) history labels, every runtime's scores
equal the previous formulation's within 1e-5; so does the runtime's reuse of an encoded user
state across request times (eager, and the exported TorchScript, which holds the two halves).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from contract.history import History
from harness.naive import IATPerCandidate
from models.runtime.loader import load_ranking_model
from tests.models.test_serving import HISTORY_LEN, pick_requests, service_inputs

CANDIDATES = (1, 100, 500)
HOUR_MS = 3_600_000


def previous_formulation(version):
    """The served call path (eager) with the previous forward, same weights."""
    model = load_ranking_model(version, "eager", "cpu")
    module = IATPerCandidate(json.loads((version / "config.json").read_text())).eval()
    module.load_state_dict(torch.load(version / "weights.pt", weights_only=True))
    model._runner, model._split = module, None
    return model


def with_unknown_labels(data):
    """The same rows with 30% of instances' labels unknown and 30% of the rest missing task 0."""
    rng = np.random.default_rng(3)
    labels = data.labels.copy()
    hidden = rng.random(data.n) < 0.3
    labels[hidden] = -1
    labels[(rng.random(data.n) < 0.3) & ~hidden, 0] = -1
    return data.with_arrays(labels=labels)


@pytest.fixture(scope="module")
def loaded(serving_run):
    """{runtime: {"iat": ranking model, "source": source model}} of the exported serving set."""
    from models.runtime.loader import load_source_model
    versions = serving_run[3]
    return {rt: {"iat": load_ranking_model(versions["iat"], rt, "cpu"),
                 "source": load_source_model(versions["source"], rt, "cpu")} for rt in ("eager", "torchscript")}


@pytest.fixture(scope="module")
def previous(serving_run):
    return previous_formulation(serving_run[3]["iat"])


@pytest.fixture(scope="module")
def requests(serving_run, loaded):
    """{(labels, history, C): (history, request time, cat, multi, num)} from real timelines."""
    data = serving_run[0]
    source = loaded["eager"]["source"]
    out = {}
    for kind, d in (("known", data), ("unknown", with_unknown_labels(data))):
        for label, row in pick_requests(d, HISTORY_LEN).items():
            for c in CANDIDATES:
                history, cat, multi, num = service_inputs(d, source, row, c)
                out[(kind, label, c)] = (history, int(d.ts_ms[row]), cat, multi, num)
    return out


def test_requests_cover_histories_and_unknown_labels(previous, requests):
    lengths = {label: previous.prepare(h, t).length for (_, label, _), (h, t, *_) in requests.items()}
    assert lengths["empty"] == 0 and lengths["one"] == 1 and lengths["full"] == HISTORY_LEN
    history, t = requests[("unknown", "full", 1)][:2]
    seen = history.labels[history.timestamps_ms < t][:HISTORY_LEN]
    assert (seen < 0).any() and (seen >= 0).any()
    # the labels are inputs of the user side: unknown ones move the scores
    known = previous.score(*requests[("known", "full", 100)])
    unknown = previous.score(*requests[("unknown", "full", 100)])
    assert np.abs(known - unknown).max() > 1e-4


def _check(model, previous, requests, name):
    for (kind, label, c), (history, t, cat, multi, num) in requests.items():
        ref = previous.score(history, t, cat, multi, num)
        got = model.score(history, t, cat, multi, num)
        assert got.shape == (c, len(model.tasks))
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{name} {kind} {label} C={c}")


@pytest.mark.parametrize("runtime", ["eager", "torchscript"])
def test_every_runtime_equals_the_per_candidate_formulation(loaded, previous, requests, runtime):
    model = loaded[runtime]["iat"]
    assert model.reuses_user_state  # the exported TorchScript holds the two halves beside forward
    _check(model, previous, requests, runtime)


@pytest.mark.slow
def test_aoti_equals_the_per_candidate_formulation(aoti_versions, previous, requests):
    _check(load_ranking_model(aoti_versions["iat"], "aoti", "cpu"), previous, requests, "aoti")


def test_the_module_halves_equal_its_forward_on_arbitrary_rows(loaded, previous):
    """user_state / score_user hold for any input rows (labels -1, 0, 1), not only a featurizer's."""
    from models.export import example_inputs
    module = loaded["eager"]["iat"]._runner
    for n, c in ((2, 2), (9, 17), (HISTORY_LEN, 500)):
        inputs = example_inputs(module, n_history=n, n_candidates=c)
        with torch.inference_mode():
            halves = module.score_user(*module.user_state(*inputs[:6]), *inputs[6:])
            torch.testing.assert_close(halves, module(*inputs), atol=0, rtol=0)
            torch.testing.assert_close(halves, previous._runner(*inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("runtime", ["eager", "torchscript"])
def test_a_user_state_is_reused_across_request_times_until_its_age_buckets_move(
        serving_run, previous, requests, runtime):
    model = load_ranking_model(serving_run[3]["iat"], runtime, "cpu")
    assert model.reuses_user_state
    history, t, cat, multi, num = requests[("unknown", "full", 100)]
    history = history.select(history.timestamps_ms < t)  # what the store returns for t: the same later
    prepared = model.prepare(history, t)
    first = model.score_prepared(prepared, t, cat, multi, num)
    state = prepared.state
    np.testing.assert_allclose(first, previous.score(history, t, cat, multi, num), atol=1e-5, rtol=0)

    # a second later: same age buckets (log2 hours), the encoded state is reused as it is
    again = model.score_prepared(prepared, t + 1_000, cat, multi, num)
    assert prepared.state is state
    np.testing.assert_allclose(again, previous.score(history, t + 1_000, cat, multi, num), atol=1e-5, rtol=0)

    # a year later every bucket moved: encoded again, and equal to scoring from scratch
    later = t + 365 * 24 * HOUR_MS
    moved = model.score_prepared(prepared, later, cat, multi, num)
    assert prepared.state is not state
    np.testing.assert_allclose(moved, previous.score(history, later, cat, multi, num), atol=1e-5, rtol=0)
    assert not np.allclose(moved, first, atol=1e-6), "the age buckets are inputs: scores must move"


class _UseCounts:
    """Stands in for a runner (or its halves): records each tensor argument's C++ use count at
    the call, then calls the real one."""

    def __init__(self, runner):
        self.runner, self.counts = runner, []

    def _record(self, fn):
        def call(*tensors):
            self.counts += [t._use_count() for t in tensors]
            return fn(*tensors)
        return call

    def __call__(self, *tensors):
        return self._record(self.runner)(*tensors)

    def __getattr__(self, name):
        return self._record(getattr(self.runner, name))


@pytest.mark.parametrize("halves", [True, False])
def test_every_tensor_handed_to_torchscript_has_a_second_cpp_reference(serving_run, requests, halves):
    """A tensor with a Python object whose C++ count falls from 2 to 1 inside a call takes the
    GIL there (models/runtime/loader.py, _held_in_cpp); each input must be held from outside,
    for the user/candidate halves and for the one-call forward (AOTI, older artifacts)."""
    model = load_ranking_model(serving_run[3]["iat"], "torchscript", "cpu")
    history, t, cat, multi, num = requests[("unknown", "full", 100)]
    history = history.select(history.timestamps_ms < t)
    want = model.score(history, t, cat, multi, num)
    if halves:
        model._split = recorder = _UseCounts(model._split)
    else:
        model._split, model._runner = None, (recorder := _UseCounts(model._runner))
    prepared = model.prepare(history, t)
    got = [model.score_prepared(prepared, t, cat, multi, num) for _ in range(2)]  # encoded, then reused
    for scores in got:
        np.testing.assert_array_equal(scores, want)
    assert len(recorder.counts) == (6 + 6 + 3 + 6 + 3 if halves else 2 * 9)
    assert min(recorder.counts) >= 2, recorder.counts
    if halves:  # and the candidates of two requests in one forward (cross-request batching)
        recorder.counts.clear()
        batched = model.score_batch([(prepared, t, cat, multi, num), (model.prepare(history, t), t, cat[:5],
                                                                       multi[:5], num[:5])])
        np.testing.assert_allclose(batched[0], want, atol=1e-5, rtol=0)
        assert recorder.counts and min(recorder.counts) >= 2, recorder.counts


def test_the_age_bucket_key_equals_gap_bucket_at_and_around_every_bucket_edge():
    """The reuse key (numpy) and the model's ``gap_bucket`` (torch) give the same buckets,
    in particular where floor(log2(1 + hours)) steps: 1 + hours = 2^k exactly, and 1 ms either side."""
    from models.nn.downstream import N_GAP_BUCKETS, gap_bucket
    from models.runtime.loader import _age_buckets

    request = 1_700_000_000_000
    edges = np.array([(2 ** k - 1) * HOUR_MS for k in range(N_GAP_BUCKETS + 2)], dtype=np.int64)
    ages = np.unique(np.concatenate([edges - 1, edges, edges + 1, np.random.default_rng(0).integers(0, 2**40, 500)]))
    ages = ages[ages >= 0]
    ts = torch.from_numpy(request - ages)
    mask = torch.from_numpy(np.arange(len(ages)) % 7 != 3)  # masked slots read as age 0
    request_t = torch.tensor([request])
    want = gap_bucket(request_t, torch.where(mask, ts, request_t))
    got = _age_buckets(request_t.numpy(), ts.numpy(), mask.numpy())
    assert got.dtype == np.int64 and got.tobytes() == want.numpy().tobytes()
    assert set(want.unique().tolist()) == set(range(N_GAP_BUCKETS))


def test_an_empty_history_scores_the_same_prepared_or_not(serving_run, loaded, previous):
    data = serving_run[0]
    model = loaded["eager"]["iat"]
    empty = History.empty(model.embedding_dim, len(model.tasks))
    rows = np.arange(7)
    cat, multi, num = data.cat[rows], data.multi[rows], data.num[rows]
    t = int(data.ts_ms[0])
    np.testing.assert_allclose(model.score_prepared(model.prepare(empty, t), t, cat, multi, num),
                               previous.score(empty, t, cat, multi, num), atol=1e-5, rtol=0)
