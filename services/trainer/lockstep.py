"""Trainer processes that train together (DDP): the process group, and the one rule by which
every rank takes the same steps (services/trainer/trainer.py's docstring tells the whole design).

Before each step the ranks exchange (``all_gather``) what each has ready: its buffered
instances, how long its partitions have been quiet, and (rank 0's) whether the wall-clock
publish interval has elapsed. Every rank then computes the same ``plan_step`` from the same
numbers, so all take the step or none does, with the same collectives in the same order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def plan_step(buffered: list[int], idle_s: list[float], batch_size: int, flush_s: float) -> list[int] | None:
    """How many instances each rank trains in the next step, or None (no step now).

    - every rank holds a full batch: a full batch each;
    - else, when some rank holds instances and every rank short of a full batch has been quiet
      ``flush_s`` (``flush_s`` 0: never), each rank trains what it has, up to a batch: partial
      batches, and an empty one (zero loss) for a quiet rank, so that ranks with data never wait
      forever on a quiet one.

    With one rank this is the single trainer's rule (a full batch, or a partial one after
    ``flush_s`` without new entries)."""
    if all(b >= batch_size for b in buffered):
        return [batch_size] * len(buffered)
    if flush_s > 0 and any(b > 0 for b in buffered) and all(
            b >= batch_size or idle >= flush_s for b, idle in zip(buffered, idle_s)):
        return [min(b, batch_size) for b in buffered]
    return None


def backend_for(device: torch.device) -> str:
    """gloo for models on the CPU, NCCL for models on a CUDA device."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Exchange:
    buffered: list[int]
    idle_s: list[float]
    publish_due: bool      # rank 0's clock decides the wall-clock publish interval for all


class Lockstep:
    """This process's membership of the trainers' process group (``init_process_group`` at
    construction: it returns once every rank has joined the rendezvous)."""

    def __init__(self, world: int, rank: int, url: str, backend: str, timeout_s: float) -> None:
        self.world, self.rank = world, rank
        if not dist.is_initialized():
            log.info("trainer: rank %d of %d joining %s (%s)", rank, world, url, backend)
            dist.init_process_group(backend, init_method=url, world_size=world, rank=rank,
                                    timeout=timedelta(seconds=timeout_s))
        log.info("trainer: rank %d of %d in the process group", rank, world)

    def exchange(self, buffered: int, idle_s: float, publish_due: bool) -> Exchange:
        mine = torch.tensor([float(buffered), float(idle_s), float(publish_due)], dtype=torch.float64)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        rows = torch.stack(out)
        return Exchange([int(v) for v in rows[:, 0]], [float(v) for v in rows[:, 1]], bool(rows[0, 2]))

    def gather_ints(self, values: list[int], width: int) -> list[list[int]]:
        """Every rank's ``values`` (at most ``width``; padded with -1)."""
        mine = torch.full((width,), -1, dtype=torch.int64)
        mine[:len(values)] = torch.tensor(values[:width], dtype=torch.int64)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return [[int(v) for v in row if v >= 0] for row in out]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
