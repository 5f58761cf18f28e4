"""Real `iat` service processes on loopback: started, waited on, stopped.

The demo, the benchmarks, the soak run and the tests all run the services as separate
processes (what production runs), never in-process stand-ins; this is the one way they do it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

IAT = [sys.executable, "-m", "cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``iat <args> --port <http_port>`` with ``env`` added to this process's environment,
    output appended to ``log_path``; ``cwd``: run another checkout's ``iat`` (``python -m cli``
    imports the working directory's packages first)."""

    def __init__(self, args: list[str], *, log_path: Path, env: dict[str, str] | None = None,
                 http_port: int | None = None, new_session: bool = False, cwd: Path | None = None) -> None:
        self.http_port = http_port or free_port()
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            IAT + list(args) + ["--port", str(self.http_port)], env={**os.environ, **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
            # new_session: a terminal's Ctrl-C reaches only the parent, which stops children in order
            start_new_session=new_session,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait(self, path: str = "/readyz", timeout_s: float = 120.0) -> "ServiceProcess":
        """Until ``path`` answers 200; raises with the log's tail if the process exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[3:5]} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.proc.args[3:5]} not answering {path} in {timeout_s}s:\n{self.log_tail()}")

    def kill(self, sig: int = 9) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if not self._log.closed:
            self._log.close()


def ensure_quick_models(model_dir: Path, data_dir: Path, max_users: int = 300) -> Path:
    """The quick serving set trained on ``max_users`` MovieLens users and exported without AOTI
    into ``model_dir``, unless it already holds one (about a minute of CPU, more when busy)."""
    from models.runtime.loader import latest_version

    model_dir = Path(model_dir)
    if all(latest_version(model_dir, n) is not None for n in ("iat", "sif", "source")):
        return model_dir
    run_dir = model_dir.parent / (model_dir.name + "-run")
    subprocess.run(IAT + ["train", "--dataset", "movielens-100k", "--data-dir", str(data_dir), "--out", str(run_dir),
                          "--quick", "--epochs", "1", "--max-users", str(max_users), "--no-progress"],
                   check=True, stdin=subprocess.DEVNULL)
    subprocess.run(IAT + ["export", "--from", str(run_dir), "--out", str(model_dir), "--no-aoti"],
                   check=True, stdin=subprocess.DEVNULL)
    return model_dir
