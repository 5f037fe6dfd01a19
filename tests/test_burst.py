"""A burst of runs on one agent: its starts come before the records of its ends. The run
writer holds its writes while a burst starts (at most HOLD_MOST), the executor records the
ends of a burst's runs once it has started (their slots go to the next runs at once), and
the daily log files stay open between runs."""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import datetime

import pytest
from helpers import finished, start, wait_for

import cloudtask.agent.executor as executor_module
import cloudtask.agent.runwriter as runwriter_module
from cloudtask.agent import logfiles
from cloudtask.agent.executor import Executor
from cloudtask.agent.guard import GuardClient
from cloudtask.agent.logfiles import RunLog, log_path
from cloudtask.agent.runwriter import RunWriter

PY = sys.executable


def _claim(store, writer):
    """A stored claim the writer keeps (a run document, running)."""
    from helpers import make_task, run_document

    from cloudtask.clock import utcnow

    doc = run_document(make_task(store, f"t{time.monotonic_ns()}"), utcnow(), agent="a1")
    assert store.claim_runs([doc]) == [True]
    writer.track(doc)
    return doc


def test_writes_wait_while_a_burst_starts_and_no_longer(store, monkeypatch):
    monkeypatch.setattr(runwriter_module, "HOLD_MOST", 1.0)
    busy = threading.Event()
    busy.set()
    writer = RunWriter(store, flush_interval=0.05, owner="a1")
    writer.hold_while = busy.is_set
    writer.start()
    try:
        first = _claim(store, writer)
        writer.update(first["_id"], {"status": "succeeded", "exit_code": 0}, urgent=True)
        time.sleep(0.4)  # held: a burst is starting
        assert store.get_run(first["_id"])["status"] == "running"
        busy.clear()  # the burst has started: written at once
        wait_for(lambda: store.get_run(first["_id"])["status"] == "succeeded", timeout=2)
        # a burst that goes on and on holds writes HOLD_MOST at most
        busy.set()
        second = _claim(store, writer)
        asked = time.monotonic()
        writer.update(second["_id"], {"status": "failed", "exit_code": 1}, urgent=True)
        wait_for(lambda: store.get_run(second["_id"])["status"] == "failed", timeout=5)
        assert 0.8 <= time.monotonic() - asked < 3.0
    finally:
        busy.clear()
        writer.stop()


def test_a_stopping_writer_writes_at_once_whatever_starts(store):
    writer = RunWriter(store, flush_interval=0.05, owner="a1")
    writer.hold_while = lambda: True
    writer.start()
    doc = _claim(store, writer)
    writer.update(doc["_id"], {"status": "succeeded", "exit_code": 0}, urgent=True)
    began = time.monotonic()
    writer.stop(timeout=5)
    assert time.monotonic() - began < 2.0
    assert store.get_run(doc["_id"])["status"] == "succeeded"


@pytest.fixture
def guarded(writer, tmp_path):
    guard = GuardClient(fence=lambda: (None, 0.0), silent_after=60.0, kill_grace=1.0)
    guard.start()
    made = []

    def make(max_parallel: int) -> Executor:
        ex = Executor(
            agent_id="a1",
            log_dir=tmp_path / "logs",
            writer=writer,
            max_parallel=max_parallel,
            kill_grace=1.0,
            guard=guard,
        )
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.shutdown()
    guard.stop()


def test_the_ends_of_a_burst_are_recorded_once_it_has_started(store, writer, guarded, monkeypatch):
    """20 quick runs on 2 slots: each slot goes to the next run as soon as a run ends, and the
    ends (final states, journal, log footers) are recorded after the last run started."""
    monkeypatch.setattr(executor_module, "STARTING_GAP", 1.0)  # (a slow machine's gaps)
    monkeypatch.setattr(executor_module, "ENDS_MOST", 30.0)
    ex = guarded(2)
    recorded: dict[str, float] = {}
    update = writer.update

    def spy(run_id, fields, urgent=False, lazy=False):
        if fields.get("finished_at") is not None:
            recorded.setdefault(run_id, time.time())
        update(run_id, fields, urgent=urgent, lazy=lazy)

    writer.update = spy
    runs = [start(store, ex, {"command": ["true"]}) for _ in range(20)]
    docs = [finished(store, ctx.run_id, timeout=30) for ctx in runs]
    assert all(d["status"] == "succeeded" for d in docs)
    last_start = max(ctx.started_at.timestamp() for ctx in runs)
    assert min(recorded.values()) >= last_start
    text = log_path(ex.log_dir, "t", datetime.now().date()).read_text()
    assert all(f"run {ctx.run_id} succeeded exit 0" in text for ctx in runs)


def test_log_files_stay_open_and_one_deleted_meanwhile_is_opened_anew(tmp_path):
    first = RunLog(tmp_path, "job")
    first.line("one")
    first.close()
    path = log_path(tmp_path, "job", datetime.now().date())
    assert path.read_text() == "one\n"
    path.unlink()  # someone cleans up
    second = RunLog(tmp_path, "job")
    second.line("two")
    second.close()
    assert path.read_text() == "two\n"
    third = RunLog(tmp_path, "job")
    third.line("three")
    third.close()
    assert path.read_text() == "two\nthree\n"


def test_the_log_files_kept_open_are_bounded(tmp_path, monkeypatch):
    files = logfiles._OpenFiles(most=3)
    monkeypatch.setattr(logfiles, "_FILES", files)
    for round_ in range(2):
        for n in range(5):
            runlog = RunLog(tmp_path, f"task{n}")
            runlog.line(f"round {round_}")
            runlog.close()
    assert len(files._fds) == 3
    for n in range(5):
        text = log_path(tmp_path, f"task{n}", datetime.now().date()).read_text()
        assert text == "round 0\nround 1\n"
    files.close_all()
    assert not files._fds


def test_runs_of_one_task_write_whole_blocks_to_its_shared_file(store, writer, guarded):
    """Concurrent runs of a task share the file's descriptor; each run's block (header,
    output, footer) lands in one piece."""
    ex = guarded(8)
    script = "import os; print('\\n'.join([os.environ['CLOUDTASK_RUN_ID']] * 200))"
    runs = [start(store, ex, {"command": [PY, "-c", script]}) for _ in range(8)]
    for ctx in runs:
        assert finished(store, ctx.run_id)["status"] == "succeeded"
    lines = log_path(ex.log_dir, "t", datetime.now().date()).read_text().splitlines()
    for ctx in runs:
        at = [i for i, line in enumerate(lines) if ctx.run_id in line]
        assert len(at) == 202 and at == list(range(at[0], at[0] + 202))  # header, 200, footer


def test_no_descriptor_is_left_open_per_run(store, writer, guarded):
    ex = guarded(4)
    start(store, ex, {"command": ["true"]})  # (its log file stays open, once)
    wait_for(lambda: not ex.active(), timeout=10)
    before = len(os.listdir("/proc/self/fd"))
    runs = [start(store, ex, {"command": ["true"]}) for _ in range(30)]
    for ctx in runs:
        finished(store, ctx.run_id)
    wait_for(lambda: not ex.active(), timeout=10)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_a_cancelled_timer_lets_go_of_its_run_at_once():
    """A run's timeout is a timer of the run loop, cancelled when the run ends: the run is not
    kept until the timeout would have come, and the heap does not fill with dead timers."""
    import gc
    import weakref

    from cloudtask.agent.run import RunLoop

    class Run:
        pass

    loop = RunLoop("test-timers")
    loop.start()
    try:
        refs, done = [], threading.Event()

        def arm_and_cancel():
            for _ in range(1000):
                run = Run()
                refs.append(weakref.ref(run))
                loop.call_at(time.monotonic() + 3600, print, run).cancel()
            done.set()

        loop.call_soon(arm_and_cancel)
        assert done.wait(5)
        gc.collect()
        assert sum(1 for r in refs if r() is not None) == 0
        sized = threading.Event()
        sizes = []
        loop.call_soon(lambda: (sizes.append(len(loop._timers)), sized.set()))
        assert sized.wait(5) and sizes[0] < 600  # (compacted as they are added)
    finally:
        loop.stop()
