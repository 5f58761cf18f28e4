"""Cross-request batching: the candidates of several requests scored in one forward equal each
request scored alone.

``IATRanking.score_users`` runs the candidate side of R requests as one batch, each request's
candidates reading only its own user state (stacked, histories padded with mask False);
``RankingModel.score_batch`` is what the ranking service's batcher calls. On the session's
serving set (real MovieLens rows), with empty, short and full histories, known and unknown
history labels and uneven candidate counts, every request's scores equal ``score_prepared`` of
that request alone and the previous per-candidate formulation within 1e-5, in eager and in the
exported TorchScript; a bad request fails alone; an artifact exported before ``score_users``
still loads and scores (one request at a time).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from models.export import example_inputs
from models.runtime.loader import load_ranking_model
from models.runtime.modules import stack_user_states
from tests.models.test_serving import HISTORY_LEN, pick_requests, service_inputs
from tests.models.test_user_side_once import previous_formulation, with_unknown_labels

COUNTS = (1, 100, 37, 2, 500, 9)  # uneven, so padding slots exist in every batch


@pytest.fixture(scope="module")
def requests(serving_run):
    """[(history, request time, cat, multi, num)] over both label kinds, 3 history lengths and
    the candidate counts above, cycled."""
    from models.runtime.loader import load_source_model
    data = serving_run[0]
    source = load_source_model(serving_run[3]["source"], "eager", "cpu")
    out = []
    for kind, d in enumerate((data, with_unknown_labels(data))):
        for j, row in enumerate(pick_requests(d, HISTORY_LEN).values()):
            c = COUNTS[(3 * kind + j) % len(COUNTS)]
            history, cat, multi, num = service_inputs(d, source, row, c)
            t = int(d.ts_ms[row])
            out.append((history.select(history.timestamps_ms < t), t, cat, multi, num))
    return out


@pytest.fixture(scope="module")
def previous(serving_run):
    return previous_formulation(serving_run[3]["iat"])


def _batch(model, requests):
    return [(model.prepare(h, t), t, cat, multi, num) for h, t, cat, multi, num in requests]


@pytest.mark.parametrize("runtime", ["eager", "torchscript"])
def test_a_batch_of_requests_equals_each_request_alone(serving_run, requests, previous, runtime):
    model = load_ranking_model(serving_run[3]["iat"], runtime, "cpu")
    assert model.batches_requests  # the exported TorchScript holds score_users
    lengths = {model.prepare(h, t).length for h, t, *_ in requests}
    assert {0, 1, HISTORY_LEN} <= lengths
    got = model.score_batch(_batch(model, requests))
    assert len(got) == len(requests)
    for k, ((h, t, cat, multi, num), scores) in enumerate(zip(requests, got)):
        alone = model.score_prepared(model.prepare(h, t), t, cat, multi, num)
        assert scores.shape == (len(cat), len(model.tasks)), k
        np.testing.assert_allclose(scores, alone, atol=1e-5, rtol=0, err_msg=f"{runtime} request {k}")
        np.testing.assert_allclose(scores, previous.score(h, t, cat, multi, num), atol=1e-5, rtol=0,
                                   err_msg=f"{runtime} request {k} against the previous formulation")
    # each request's rows are its own: the batch is not one request's scores repeated
    assert not np.allclose(got[2][:1], got[5][:1], atol=1e-4)  # same row, other labels


@pytest.mark.parametrize("runtime", ["eager", "torchscript"])
def test_a_bad_request_fails_alone(serving_run, requests, runtime):
    model = load_ranking_model(serving_run[3]["iat"], runtime, "cpu")
    batch = _batch(model, requests[:3])
    prepared, t, cat, multi, num = batch[1]
    batch[1] = (prepared, t, cat[:, :-1], multi, num)  # one column short
    got = model.score_batch(batch)
    assert isinstance(got[1], ValueError) and "cat" in str(got[1])
    for k in (0, 2):
        np.testing.assert_allclose(got[k], model.score_prepared(*batch[k]), atol=1e-5, rtol=0)


def test_score_users_equals_score_user_on_arbitrary_rows(serving_run):
    """Any rows (labels -1/0/1, random features), several requests of different history lengths
    and candidate counts, in eager and in the traced method."""
    model = load_ranking_model(serving_run[3]["iat"], "torchscript", "cpu")
    module = load_ranking_model(serving_run[3]["iat"], "eager", "cpu")._runner
    shapes = ((2, 3), (HISTORY_LEN, 40), (9, 1), (17, 2))
    reqs = [example_inputs(module, n_history=n, n_candidates=c) for n, c in shapes]
    with torch.inference_mode():
        states = [module.user_state(*r[:6]) for r in reqs]
        alone = [module.score_user(*s, *r[6:]) for s, r in zip(states, reqs)]
        stacked, slots, pad_index = stack_user_states(states, [c for _, c in shapes])
        cands = [torch.cat([r[k] for r in reqs]) for k in (6, 7, 8)]
        for runner in (module, model._runner):
            together = runner.score_users(*stacked, slots, pad_index, *cands)
            torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


def test_an_artifact_without_score_users_still_scores_a_batch(serving_run, requests, tmp_path):
    """A TorchScript exported before cross-request batching (forward and the two halves only)."""
    module = load_ranking_model(serving_run[3]["iat"], "eager", "cpu")._runner
    inputs = example_inputs(module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        state = module.user_state(*inputs[:6])
        old = torch.jit.trace_module(module, {"forward": inputs, "user_state": inputs[:6],
                                              "score_user": (*state, *inputs[6:])}, check_trace=False)
    old.save(str(tmp_path / "old.pt"))
    model = load_ranking_model(serving_run[3]["iat"], "torchscript", "cpu")
    model._runner = model._split = torch.jit.load(str(tmp_path / "old.pt"))
    assert model.reuses_user_state and not model.batches_requests
    batch = _batch(model, requests)
    for got, one in zip(model.score_batch(batch), batch):
        np.testing.assert_allclose(got, model.score_prepared(*one), atol=0, rtol=0)
