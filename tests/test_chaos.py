"""The short chaos run: a whole cluster (3-node ZooKeeper ensemble, 2 centers, 3 agents behind
TCP proxies, 51 tasks) under at least 30 random faults of every kind, judged by what the tasks
themselves recorded (bench/chaos.py). The long run is ``make chaos``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# a whole cluster (its own ZooKeeper, MongoDB, centers and agents) under faults
pytestmark = [pytest.mark.external, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_thirty_fault_cycles_start_no_fire_twice_and_leave_nothing_unexplained(tmp_path):
    work = tmp_path / "chaos"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos.py"),
            "--cycles",
            "30",
            "--seed",
            "11",
            "--settle",
            "25",
            "--work",
            str(work),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops its whole cluster, then exits
        stdout, stderr = proc.communicate(timeout=100)
        raise AssertionError(f"the chaos run took too long:\n{stdout[-4000:]}") from None
    assert proc.returncode == 0, stderr[-4000:]
    lines = stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    report = "\n".join(lines[:-1])
    assert figures["fault_cycles"] >= 30, report
    assert figures["fires"] > 500, report  # the cluster did run through the faults
    # once-only and no-overlap, from the start and end records the tasks wrote
    assert figures["duplicates"] == 0, report
    assert figures["overlaps"] == 0, report
    # nothing lost without a record, nothing left claimed, no history that contradicts it
    assert figures["unexplained_misses"] == 0, report
    assert figures["stuck_runs"] == 0, report
    assert figures["lost_but_ran"] == 0, report
    assert figures["mislabelled"] == 0, report
    assert figures["crashes"] == 0, report  # no process gave up, every SIGTERM stopped
    assert figures["missed_ratio"] < 0.5, report
