"""Baselines of the served IAT model, same weights, same outputs (within 1e-5), more work:

- ``IATNaive``: the history re-encoded for every candidate (what shared attention saves).
- ``IATPerCandidate``: the formulation served before the user side was computed once per
  request: the behaviour sequence embedded and K/V-projected once per candidate, the history's
  keys/values copied per candidate and read by C single-query attentions (what
  ``IATRanking.user_state`` saves). ``iat bench model`` times it beside the served module.
"""
from __future__ import annotations

import torch

from models.nn.downstream import HistoryMemory
from models.runtime.modules import IATRanking


def per_candidate_batch(module: IATRanking, hist_items, hist_labels, hist_mask, cat, multi, num) -> dict:
    """The candidates' batch with the request's behaviour sequence and its past labels copied
    per candidate (embedded and projected per candidate by ``Backbone.fields``)."""
    c = cat.shape[0]
    seq = module.behaviour_sequence(hist_items, hist_mask)
    labels = module.sequence_labels(hist_labels, hist_mask)
    return {"cat": cat, "multi": multi, "num": num, "item": cat[:, module.item_column],
            "seq_items": seq.expand(c, -1), "seq_labels": labels.expand(c, -1, -1)}


class IATNaive(IATRanking):
    """The same weights, the history re-encoded for every candidate (what shared attention
    saves); outputs equal ``IATRanking``'s."""

    def forward(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms, cat, multi, num):
        tokens, mask = self.history_inputs(hist_emb, hist_labels, hist_ts, hist_mask, request_ms)
        c = cat.shape[0]
        memory = self.model.encode_history(tokens.expand(c, -1, -1).contiguous(), mask.expand(c, -1))
        batch = per_candidate_batch(self, hist_items, hist_labels, hist_mask, cat, multi, num)
        return torch.sigmoid(self.model.score(memory, batch))


class IATPerCandidate(IATRanking):
    """The history encoded once, but every other user-side step done per candidate (the
    previous serving formulation); outputs equal ``IATRanking``'s."""

    def forward(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms, cat, multi, num):
        tokens, mask = self.history_inputs(hist_emb, hist_labels, hist_ts, hist_mask, request_ms)
        memory = self.model.encode_history(tokens, mask)
        c = cat.shape[0]
        copied = HistoryMemory(memory.keys.expand(c, -1, -1, -1), memory.values.expand(c, -1, -1, -1),
                               memory.mask.expand(c, -1))
        batch = per_candidate_batch(self, hist_items, hist_labels, hist_mask, cat, multi, num)
        return torch.sigmoid(self.model.score(copied, batch))


def naive_ranking_model(version, trace: bool = False):
    """The served model's artifact ``version`` loaded as a ``RankingModel`` that answers with
    ``IATNaive`` on the same weights, its whole forward every call (never the loaded model's
    user/candidate halves, which would make it the shared model again); TorchScript with
    ``trace``, else eager. Used by the naive peer and by ``iat bench floor``."""
    import json
    import warnings

    from models.export import example_inputs
    from models.runtime.loader import load_ranking_model

    model = load_ranking_model(version, "eager", "cpu")
    naive = IATNaive(json.loads((version / "config.json").read_text())).eval()
    naive.load_state_dict(torch.load(version / "weights.pt", weights_only=True))
    if trace:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            naive = torch.jit.trace(naive, example_inputs(naive), check_trace=False)
    model._runner, model._split = naive, None
    assert not model.reuses_user_state
    return model
