"""The architecture of ARCHITECTURE.md, enforced: import-linter contracts (pyproject.toml), a
broken one caught, and the ranking service running without the training stack."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "models", "storage", "services", "harness", "loadtests", "cli")
LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
        "--no-cache"]
# What the serving runtime must never load: training, experiments, data loading, export, benches,
# plotting. (tqdm is not on the list: `import torch` itself loads it, through torch.hub.)
NOT_IN_SERVING = ("models.training", "models.data", "models.export", "harness", "loadtests", "matplotlib")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_importing_training_from_the_ranking_service_breaks_a_contract(tmp_path):
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "out"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    serving = tmp_path / "services" / "ranking" / "serving.py"
    serving.write_text(serving.read_text() + "\nimport models.training.loop  # noqa: E402,F401\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "The serving runtime does not import training" in result.stdout
    assert "BROKEN" in result.stdout and "services.ranking.serving -> models.training.loop" in result.stdout


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` lines: 'import time: self | cumulative | name'."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.slow
def test_ranking_service_loads_no_training_module(movielens_models, redis_server, tmp_path):
    """`iat serve ranking` (the same entry point) under ``-X importtime``: every module the process
    imports is listed on stderr, lazy imports included; the model is loaded, warmed up and
    serves a Score before the process is stopped."""
    from harness.processes import free_port

    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "ranking.log"
    env = {"REDIS_URL": redis_server, "IAT_MODEL_DIR": str(movielens_models.model_dir),
           "IAT_RANKING_GRPC_PORT": str(grpc_port), "IAT_RELOAD_INTERVAL_S": "0",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "cli", "serve", "ranking",
                                 "--port", str(http_port)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            import time
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                pytest.fail("ranking service not ready:\n" + log.read_text()[-3000:])
            body = {"request_id": "r", "user_id": "1", "request_time_ms": 900_000_000_000,
                    "candidates": [{"item_id": "50"}, {"item_id": "181"}]}
            scored = httpx.post(f"http://127.0.0.1:{http_port}/v1/score", json=body, timeout=30)
            assert scored.status_code == 200, scored.text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    modules = _imported_modules(log.read_text())
    assert "models.runtime.loader" in modules and "services.ranking.serving" in modules  # the parse works
    loaded = sorted(m for m in modules if m.split(".")[0] in ("models", "harness", "loadtests", "matplotlib")
                    and any(m == bad or m.startswith(bad + ".") for bad in NOT_IN_SERVING))
    assert loaded == [], f"the ranking service imported {loaded}"
