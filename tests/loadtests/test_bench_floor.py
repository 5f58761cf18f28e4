"""`iat bench floor`'s parts: the matrix products a forward runs, with their shapes, and their
FLOPs against torch's own FlopCounterMode on the same forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from harness.bench_floor import record_gemms, time_gemm


class Tower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.w = torch.nn.Parameter(torch.randn(5, 32, 8))

    def forward(self, x, q, k, v):
        h = self.proj(x)                                   # [3, 5, 16] -> [3, 5, 32]
        h = torch.einsum("btd,tdh->bth", h, self.w)        # batched over t
        return h.sum() + F.scaled_dot_product_attention(q, k, v).sum()


def test_recorded_products_have_the_forwards_shapes_and_flops():
    tower = Tower().eval()
    args = (torch.randn(3, 5, 16), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 11, 8), torch.randn(2, 4, 11, 6))
    with torch.inference_mode():
        gemms = record_gemms(lambda: tower(*args))
        with FlopCounterMode(display=False) as counter:
            tower(*args)
    assert gemms == {("addmm", (1, 15, 16, 32)): 1, ("bmm", (5, 3, 32, 8)): 1,
                     ("bmm", (8, 7, 8, 11)): 1, ("bmm", (8, 7, 11, 6)): 1}
    recorded = sum(2 * b * m * k * n * count for (_, (b, m, k, n)), count in gemms.items())
    assert recorded == counter.get_total_flops()


def test_a_gemm_is_timed_positive():
    assert 0 < time_gemm("bmm", (2, 8, 8, 8), budget_s=0.01) < 1.0
