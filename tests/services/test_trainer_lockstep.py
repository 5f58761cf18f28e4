"""The DDP trainers' lockstep rule (services/trainer/lockstep.py): the same plan on every rank
from the exchanged numbers; a quiet rank holds the others back only until the flush delay."""
from __future__ import annotations

from services.trainer.lockstep import plan_step

B = 64


def test_every_rank_steps_a_full_batch_only_when_every_rank_has_one():
    assert plan_step([64, 200], [0.0, 0.0], B, 2.0) == [64, 64]
    assert plan_step([63, 200], [0.0, 0.0], B, 2.0) is None  # rank 0 is still receiving


def test_a_quiet_rank_steps_what_it_has_or_nothing_after_the_flush_delay():
    assert plan_step([10, 200], [1.9, 0.0], B, 2.0) is None
    assert plan_step([10, 200], [2.0, 0.0], B, 2.0) == [10, 64]
    assert plan_step([0, 200], [5.0, 0.0], B, 2.0) == [0, 64]   # an empty, zero-loss batch on rank 0
    assert plan_step([0, 0], [9.0, 9.0], B, 2.0) is None        # nothing anywhere: no step
    assert plan_step([0, 200], [9.0, 0.0], B, 0.0) is None      # flush 0: full batches only, as one trainer


def test_one_rank_is_the_single_trainers_rule():
    assert plan_step([64], [0.0], B, 2.0) == [64]
    assert plan_step([10], [1.0], B, 2.0) is None
    assert plan_step([10], [2.5], B, 2.0) == [10]


def test_ranks_own_partitions_modulo_the_world_and_a_rank_outside_it_is_refused():
    import pytest

    from services.config import Settings

    owned = [Settings(stream_partitions=5, trainer_world_size=2, trainer_rank=r).trainer_owned_partitions
             for r in (0, 1)]
    assert owned == [[0, 2, 4], [1, 3]]
    assert Settings(stream_partitions=5, trainer_world_size=2, trainer_rank=1,
                    trainer_partitions="0,1").trainer_owned_partitions == [0, 1]  # an explicit share wins
    assert Settings(stream_partitions=4).trainer_owned_partitions == [0, 1, 2, 3]  # one trainer: all
    with pytest.raises(ValueError, match="IAT_TRAINER_RANK"):
        Settings(trainer_world_size=2, trainer_rank=2)
