"""The two measurements behind the GIL change of the ranking forward (loadtests/RESULTS.md):
``harness.gil_waits`` (a forward alone and beside a Python-busy thread, with its inputs held in
C++ or not) and ``harness.saturation_ab`` (two checkouts at saturation in alternating slices),
run small on the session's quick export. What they measure is timing, so these check that they
run against real models and servers and report every cell; the mechanism itself is tested in
tests/models/test_user_side_once.py (every tensor handed to TorchScript has a second C++ reference)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gil_waits_reports_each_candidate_count_held_and_unheld(movielens_models):
    from harness.gil_waits import measure

    rows = measure(movielens_models.model_dir, [3, 7], history=5, seconds=0.05, rounds=1, unheld=True)
    assert {(r["candidates"], r["inputs"]) for r in rows} == {(3, "held"), (3, "unheld"), (7, "held"), (7, "unheld")}
    for r in rows:
        assert 0 < r["alone_ms"] and 0 < r["busy_ms"], r
    from models.runtime import loader
    assert loader._held_in_cpp.__name__ == "_held_in_cpp"  # put back after the unheld rounds


@pytest.mark.slow
def test_saturation_ab_drives_both_checkouts_in_alternating_slices(movielens_models, tmp_path):
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "-m", "harness.saturation_ab", "--base", str(REPO), "--model-dir",
           str(movielens_models.model_dir), "--candidates", "5", "--history", "8", "--concurrency", "2",
           "--slices", "2", "--slice-s", "0.5", "--data-dir", str(movielens_models.data_dir),
           "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [len(result["rps"]["base"]), len(result["rps"]["this"])] == [2, 2]
    assert all(x > 0 for side in result["rps"].values() for x in side), result
    assert result["ratio_min"] <= result["ratio_median"] <= result["ratio_max"]
