"""Past labels as side info: unknown (-1) is its own value; ids never trained read a trained
row; SIF's rare and unseen feature ids share one trained row."""
from __future__ import annotations

import numpy as np
import torch

from models.nn.features import LabelEmbedding


def test_unknown_is_its_own_id_and_padding_is_zero():
    emb = LabelEmbedding(n_tasks=2, dim=4)
    labels = torch.tensor([[[1, 0], [-1, 0], [0, 0], [-1, -1]]])
    mask = torch.tensor([[True, True, True, False]])
    ids = emb.ids(labels, mask)
    assert ids.tolist() == [[2 + 1 * 3, 0 + 1 * 3, 1 + 1 * 3, 9]]  # sum (y_t + 1) 3^t; 9 = padding
    assert len(set(ids[0, :3].tolist())) == 3  # unknown differs from 0 and from 1
    emb.eval()
    assert not emb(labels, mask)[0, 3].any()


def test_training_shows_unknowns_at_the_rate_and_eval_maps_untrained_ids():
    torch.manual_seed(0)
    emb = LabelEmbedding(n_tasks=2, dim=4, unknown_rate=0.2)
    labels = torch.randint(0, 2, (64, 50, 2))
    mask = torch.ones(64, 50, dtype=torch.bool)
    emb.train()
    ids = emb.ids(labels, mask)
    digits = torch.stack([ids % 3, ids // 3 % 3], -1)  # per task: 0 unknown, 1 negative, 2 positive
    rate = (digits == 0).float().mean().item()
    assert 0.25 < rate < 0.42, rate  # 1 - 0.8 * 0.8 = 0.36 per task
    assert (digits == 0).all(-1).any() and ((digits == 0).sum(-1) == 1).any()  # whole and partial
    # only fully known combinations trained (rate 0): an unknown id at eval reads padding
    fresh = LabelEmbedding(n_tasks=2, dim=4, unknown_rate=0.0)
    assert fresh.seen.tolist() == [False] * 4 + [True, True, False, True, True, True]  # known + pad
    fresh.train()
    fresh(labels, mask)
    fresh.eval()
    with torch.no_grad():
        out = fresh(torch.tensor([[[-1, 1]]]), torch.tensor([[True]]))
    assert not out.any()
    # with the all-unknown id trained, an untrained partial combination reads that row
    fresh.train()
    fresh(torch.full((1, 1, 2), -1), torch.ones(1, 1, dtype=torch.bool))
    fresh.eval()
    with torch.no_grad():
        got = fresh(torch.tensor([[[-1, 1]]]), torch.tensor([[True]]))
    assert torch.equal(got[0, 0], fresh.table.weight[0])
    assert fresh.seen[0] and not fresh.seen[2 * 3 + 0]


def test_sif_rare_and_unseen_ids_share_a_trained_row():
    from models.runtime.modules import VocabCompactor
    from models.training.sif.rows import MIN_COUNT, _compact, train_vocabulary

    values = np.array([5, 5, 7, 9, 9, 9, -1, 11, 5])
    train = np.arange(7)  # 11 only after the train split; 7 once in train
    compact, size = _compact(values, train)
    assert MIN_COUNT == 2 and train_vocabulary(values[train]).tolist() == [5, 9]
    assert compact.tolist() == [1, 1, 0, 2, 2, 2, -1, 0, 1] and size == 3
    assert (compact[train] == 0).any()  # row 0 is trained on the rare ids
    comp = VocabCompactor.build([train_vocabulary(values[train])], 1 << 16)
    served = comp(torch.from_numpy(values), torch.zeros(1, dtype=torch.long), comp.starts[:1])
    assert served.tolist() == compact.tolist()
