"""`iat demo --online` end to end on a small MovieLens slice: the four services and the trainer
as real processes, the replay through the loop (768 instances: a step every 128, a version every 256), a plot, and the newest published version served
by ranking and source."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import movielens_dir

pytestmark = pytest.mark.slow


def test_online_demo_publishes_versions_that_ranking_and_source_serve(tmp_path):
    data_dir = movielens_dir()
    if not (data_dir / "ml-100k.inter").exists():
        pytest.skip(f"MovieLens-100K not found at {data_dir} (set IAT_DATA_DIR)")
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--online", "--data-dir", str(data_dir.parent), "--max-users", "60",
         "--limit", "768", "--publish-every", "256", "--out", str(out)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, env={**os.environ, "CI": "true"})
    text = result.stdout
    assert result.returncode == 0, text[-4000:] + result.stderr[-3000:]
    for step in ("1/5 data", "2/5 training", "3/5 starting", "4/5 replaying", "5/5 the published versions"):
        assert step in text, step
    # the table: polled points, then the versions the trainer published during the replay
    assert "progressive validation (like" in text and "auc iat" in text
    published = re.findall(r"after\s+([\d,]+) instances: source (\S+), iat (\S+)", text)
    assert len(published) == 3 and [int(n.replace(",", "")) for n, _, _ in published] == [256, 512, 768], published
    assert "posted 768 instances" in text and "all trained" in text
    # the newest published version is the one served, by ranking and by source
    newest_source, newest_iat = published[-1][1].rstrip(","), published[-1][2]
    assert f"ranking (iat_ranking_model_info) serves iat {newest_iat}: the newest published" in text
    assert f"source (GET /v1/model) serves source {newest_source}: the newest published" in text
    plot = out / "progressive_auc.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
