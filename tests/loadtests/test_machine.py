"""harness/machine.py: the machine section of a benchmark report is measured, not written.
A real busy child process is sampled as this run's, and the report prints what was sampled."""
from __future__ import annotations

import subprocess
import sys
import time

from harness.machine import MachineSampler, cpu_model, machine_markdown

DEADLINE_S = 60.0


def test_sampler_counts_a_busy_child_as_this_runs_cpu_and_reports_it():
    burn = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"])
    try:
        with MachineSampler(interval_s=0.2) as machine:
            deadline = time.monotonic() + DEADLINE_S
            # a shared machine may give the child little CPU: wait until a sample has seen it run
            while not any(s["own_cpus"] > 0.02 for s in machine.samples) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        burn.kill()
        burn.wait()
    summary = machine.summary()
    assert summary["samples"] >= 1 and summary["own_cpus_max"] > 0.02
    assert summary["other_cpus_mean"] >= 0 and summary["load1_mean"] >= 0
    assert summary["cpu_model"] == cpu_model() and summary["logical_cpus"] >= 1
    text = machine_markdown(summary)
    assert cpu_model() in text and f"load average {summary['load1_mean']:.2f}" in text
    assert f"other processes {summary['other_cpus_mean']:.2f}" in text
    assert "two other busy helpers" not in text


def test_report_prints_the_sampled_machine_instead_of_fixed_text():
    from loadtests.report import render

    with MachineSampler(interval_s=0.1) as machine:
        time.sleep(0.3)
    results = {"meta": {"command": "python -m loadtests.report", "date": "today", "cpus": 2, "python": "3.11",
                        "machine": machine.summary()}}
    section = render(results)
    assert machine_markdown(results["meta"]["machine"]) in section
    assert "two other busy helpers" not in section


def test_a_process_the_run_drives_but_did_not_start_counts_as_its_own():
    """A Redis server or a peer started beside the bench (the report starts both) is this run's
    load, not another's: ``also_own``. The busy process here is not a descendant of this one."""
    started = subprocess.run(["sh", "-c", f"{sys.executable} -c 'import time\nend = time.time() + 60\n"
                              "while time.time() < end: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    pid = int(started.stdout.strip())
    try:
        with MachineSampler(interval_s=0.2) as other, MachineSampler(interval_s=0.2, also_own=[pid]) as own:
            deadline = time.monotonic() + DEADLINE_S
            while not (any(s["own_cpus"] > 0.02 for s in own.samples)
                       and any(s["other_cpus"] > 0.02 for s in other.samples)) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    assert max(s["own_cpus"] for s in own.samples) > 0.02
    assert max(s["other_cpus"] for s in other.samples) > 0.02
    assert max(s["own_cpus"] for s in other.samples) < max(s["own_cpus"] for s in own.samples)
