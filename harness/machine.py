"""What a benchmark report says about the machine: measured during the run, never fixed text.

    with MachineSampler() as machine:   # samples in a background thread while the bench runs
        ...
    result["machine"] = machine.summary()
    print(machine_markdown(result["machine"]))

The static part (CPU model, cores, affinity, cgroup CPU quota, torch version and threads) is read
once; the dynamic part is sampled every ``interval_s``: the load average, the whole machine's busy
CPUs, this process tree's (the bench, the services it started, their Redis) and the difference,
which is what other processes took from the cores the figures were measured on.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

# A process of another tree using at least this share of a core over the run counts as busy.
BUSY_SHARE = 0.10


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """The machine as this process sees it, read once."""
    import torch

    from services.cpus import available_cpus, cgroup_cpu_limit

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = psutil.cpu_count()
    return {"cpu_model": cpu_model(), "logical_cpus": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False), "affinity_cpus": affinity,
            "cgroup_cpu_quota": cgroup_cpu_limit(), "available_cpus": available_cpus(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": _gpu(torch)}


def _gpu(torch) -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


class MachineSampler:
    """Samples load and CPU use in a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, interval_s: float = 1.0, also_own: Iterable[int] = ()) -> None:
        """``also_own``: pids of processes this run drives that it did not start (a Redis server
        or a peer started beside it), counted as this run's, not as another's."""
        self.interval_s = interval_s
        self.root = psutil.Process()
        self.also_own = set(also_own)
        self.static = describe()
        self.samples: list[dict] = []
        self._cpu_by_pid: dict[int, tuple[float, str]] = {}  # pid -> (cpu seconds, name) at the last sample
        self._other_seconds: dict[tuple[int, str], float] = {}  # CPU seconds of other processes over the run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._ended = 0.0

    def __enter__(self) -> "MachineSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "MachineSampler":
        self._started = time.monotonic()
        psutil.cpu_percent()  # the first call only sets the reference point
        self._last = (time.monotonic(), self._process_cpu())
        self._thread = threading.Thread(target=self._run, name="machine-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "MachineSampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._ended = time.monotonic()
        return self

    def _own_pids(self) -> set[int]:
        try:
            return {self.root.pid, *self.also_own, *(p.pid for p in self.root.children(recursive=True))}
        except psutil.Error:
            return {self.root.pid, *self.also_own}

    def _process_cpu(self) -> dict[int, tuple[float, str]]:
        out = {}
        for p in psutil.process_iter(["name", "cpu_times"]):
            times = p.info.get("cpu_times")
            if times is not None:
                out[p.pid] = (times.user + times.system, p.info.get("name") or "?")
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        now, cpu = time.monotonic(), self._process_cpu()
        then, before = self._last
        wall = max(now - then, 1e-6)
        own_pids = self._own_pids()
        own = other = 0.0
        for pid, (seconds, name) in cpu.items():
            delta = max(0.0, seconds - before.get(pid, (seconds, name))[0]) if pid in before else 0.0
            if pid in own_pids:
                own += delta
            else:
                other += delta
                self._other_seconds[(pid, name)] = self._other_seconds.get((pid, name), 0.0) + delta
        self._last = (now, cpu)
        self.samples.append({"t": now - self._started, "load1": os.getloadavg()[0],
                             "busy_cpus": psutil.cpu_percent() / 100 * psutil.cpu_count(),
                             "own_cpus": own / wall, "other_cpus": other / wall})

    def summary(self) -> dict:
        """The static description and the run's statistics (mean and max of each sampled figure)."""
        seconds = (self._ended or time.monotonic()) - self._started
        out = {**self.static, "seconds": round(seconds, 1), "samples": len(self.samples),
               "sampled_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for key in ("load1", "busy_cpus", "own_cpus", "other_cpus"):
            values = [s[key] for s in self.samples]
            out[f"{key}_mean"] = round(sum(values) / len(values), 2) if values else None
            out[f"{key}_max"] = round(max(values), 2) if values else None
        busy = sorted(((s, name) for (_, name), s in self._other_seconds.items() if s >= BUSY_SHARE * seconds),
                      reverse=True)
        out["other_busy_processes"] = len(busy)
        out["other_processes_on_cpu"] = sum(1 for s in self._other_seconds.values() if s >= 0.5)
        out["other_top"] = [{"name": name, "cpus": round(s / max(seconds, 1e-6), 2)} for s, name in busy[:5]]
        return out


def machine_markdown(m: dict) -> str:
    """One paragraph: what the figures beside it were measured on, and what else ran meanwhile."""
    quota = f"cgroup CPU quota {m['cgroup_cpu_quota']:g}" if m.get("cgroup_cpu_quota") else "no cgroup CPU quota"
    text = (f"Machine (measured during the run): {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
            f"({m['physical_cores']} physical cores), {m['affinity_cpus']} in this process's affinity, {quota}, "
            f"so {m['available_cpus']} available; {m['memory_gib']} GiB; "
            f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}; Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} intra-op threads in the bench process).")
    if m.get("samples"):
        others = ", ".join(f"{t['name']} {t['cpus']:.2f}" for t in m.get("other_top", []))
        text += (f" Over the {m['seconds']:.0f} s run ({m['samples']} samples): load average "
                 f"{m['load1_mean']:.2f} (max {m['load1_max']:.2f}); busy CPUs {m['busy_cpus_mean']:.2f} of "
                 f"{m['logical_cpus']}, of which this run's processes {m['own_cpus_mean']:.2f} and other processes "
                 f"{m['other_cpus_mean']:.2f} (max {m['other_cpus_max']:.2f}); "
                 + (f"{m['other_processes_on_cpu']} other processes ran at least 0.5 CPU-s, "
                    if m.get("other_processes_on_cpu") is not None else "")
                 + f"{m['other_busy_processes']} other process(es) used over {BUSY_SHARE:.0%} of a core over the run"
                 + (f" (CPUs: {others})" if others else "") + ".")
        if (m.get("other_cpus_mean") or 0) >= 0.25:
            text += (" The machine was shared: absolute figures are noisy; ratios are from one run, "
                     "methods interleaved.")
        else:
            text += " The machine was otherwise quiet."
    return text
