"""The agent's Windows code paths, as far as a Linux machine can run them (no test runs on
Windows itself; docs/operations.md says what that leaves untested):

* every module imports without what only POSIX has (``socket.CMSG_SPACE``, ``SIGKILL``,
  ``os.killpg`` ...), in a fresh interpreter with those removed (tests/windows_imports.py);
* the executor's path without a guard process and without process groups by session (the
  one Windows agents take: a thread per run, the tree found and ended through psutil and the
  run's environment tag) runs real processes: output, exit codes, and a timeout that leaves
  no process of the tree behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import finished, start, wait_for

from cloudtask.agent import executor as executor_module
from cloudtask.agent import proctree
from cloudtask.agent.executor import Executor

PY = sys.executable


def test_every_module_imports_without_the_posix_only_parts():
    script = Path(__file__).with_name("windows_imports.py")
    done = subprocess.run(
        [PY, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "all imported", done.stdout


@pytest.fixture
def windows_like(monkeypatch, writer, tmp_path):
    """An executor on the non-POSIX path: no guard, no run loop, no new session per run."""
    monkeypatch.setattr(proctree, "IS_POSIX", False)
    monkeypatch.setattr(executor_module, "IS_POSIX", False)
    # Windows starts a run in a new process group; Linux's Popen takes no such flag
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0, raising=False)
    ex = Executor(
        agent_id="win1",
        log_dir=tmp_path / "logs",
        writer=writer,
        max_parallel=4,
        kill_grace=1.0,
        guard=None,
    )
    assert ex._loop is None  # the thread-per-run path
    yield ex
    ex.shutdown()


def test_output_and_exit_codes_without_a_guard(store, windows_like):
    ctx = start(store, windows_like, {"command": [PY, "-c", "print('hello from a thread')"]})
    run = finished(store, ctx.run_id)
    assert run["status"] == "succeeded" and "hello from a thread" in run["output_tail"]
    ctx = start(store, windows_like, {"command": [PY, "-c", "import sys; sys.exit(3)"]})
    run = finished(store, ctx.run_id)
    assert run["status"] == "failed" and run["exit_code"] == 3


def test_a_timeout_ends_the_whole_tree_without_process_groups(store, windows_like):
    spawn = (
        "import subprocess, sys, time\n"
        "for _ in range(2): subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(100)'])\n"
        "time.sleep(100)"
    )
    ctx = start(store, windows_like, {"command": [PY, "-c", spawn], "timeout": "3s"})
    wait_for(lambda: ctx.proc is not None, message="the process did not start")
    pid = ctx.proc.pid
    wait_for(lambda: len(psutil.Process(pid).children()) >= 2, message="no children started")
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    run = finished(store, ctx.run_id)
    assert run["status"] == "timed_out"

    def gone(p: int) -> bool:
        try:
            return psutil.Process(p).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in tree), timeout=10, message="a process survived")
