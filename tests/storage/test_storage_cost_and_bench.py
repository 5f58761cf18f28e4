"""`iat storage-cost` (IAT Eq. 12) and a short run of `iat bench store` against the test server."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from cli import main
from harness import bench_store as bench


def test_eq12_fp32(capsys):
    assert main(["storage-cost", "--instances-per-day", "1000000", "--days", "30", "--dim", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == 1_000_000 * 30 * 64 * 4 == 7_680_000_000
    assert out["human"] == "7.15 GiB"


@pytest.mark.parametrize("dtype, per_instance", [("fp16", 128), ("int8", 64 + 4)])
def test_eq12_other_codecs(capsys, dtype, per_instance):
    main(["storage-cost", "--instances-per-day", "10", "--days", "2", "--dim", "64", "--dtype", dtype, "--json"])
    assert json.loads(capsys.readouterr().out)["bytes"] == 20 * per_instance


def test_readable_output(capsys):
    main(["storage-cost", "--instances-per-day", "1000", "--days", "1", "--dim", "64"])
    assert "= 256,000 bytes (250.00 KiB)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [(["--instances-per-day", "-5", "--days", "1", "--dim", "64"], "--instances-per-day must be a positive integer"),
     (["--instances-per-day", "5", "--days", "x", "--dim", "64"], "--days must be a positive integer"),
     (["--instances-per-day", "5", "--days", "1", "--dim", "0"], "--dim must be a positive integer"),
     (["--instances-per-day", "5", "--days", "1", "--dim", "8", "--dtype", "bf16"], "invalid choice: 'bf16'"),
     (["--days", "1", "--dim", "8"], "--instances-per-day")],
)
def test_bad_arguments_clear_error(args, message):
    proc = subprocess.run([sys.executable, "-c", "import sys; from cli import main; sys.exit(main())", "storage-cost", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bench_store_short_run(redis_server, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "store.json"
    args = parser.parse_args(["--redis-url", redis_server, "--lengths", "8,32", "--iterations", "20",
                              "--warmup", "2", "--json", str(out)])
    assert bench.run(args) == 0
    result = json.loads(out.read_text())
    assert {(r["limit"], r["method"]) for r in result["rows"]} == {(l, m) for l in (8, 32) for m in bench.METHODS}
    assert all(r["p99_us"] >= r["p50_us"] > 0 for r in result["rows"])
    assert [r["limit"] for r in result["ratios"]] == [8, 32]
    assert "fused/floor" in capsys.readouterr().out
