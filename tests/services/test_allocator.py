"""Freed activations stay mapped: a real ranking model's forward at 500 candidates, in a model
worker thread as the service runs it, faults fresh pages in with glibc's defaults and next to
none once ``keep_freed_memory`` has set the thresholds (``harness.page_faults``: each side in
its own interpreter, since the thresholds are process-wide)."""
from __future__ import annotations

import sys

import pytest

from harness.page_faults import measure
from services.allocator import keep_freed_memory


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc thresholds")
def test_a_forward_reuses_freed_memory_instead_of_faulting_pages_in(movielens_models):
    default = measure(movielens_models.model_dir, 0, 500)
    kept = measure(movielens_models.model_dir, 256, 500)
    assert default["kept"] is False and kept["kept"] is True
    # measured: 2,000-3,600 faults per forward with glibc's defaults, 0-16 with the thresholds set
    assert default["faults_per_forward"] > 200, default
    assert kept["faults_per_forward"] < default["faults_per_forward"] / 10, (kept, default)


def test_zero_leaves_the_allocator_alone():
    assert keep_freed_memory(0) is False
