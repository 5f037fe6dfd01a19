"""The executor on real processes and a real MongoDB wire server: exit codes, output, timeouts
that leave no process behind, logs and their retention, concurrency, retries."""

from __future__ import annotations

import os
import sys
import threading
from datetime import date, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from helpers import finished, holds, journal_ends, start, wait_for

from cloudtask.agent.executor import Executor
from cloudtask.agent.guard import GuardClient
from cloudtask.agent.logfiles import cleanup_logs, log_path

PY = sys.executable


@pytest.fixture(params=["here", "guard"])
def executor(request, writer, tmp_path):
    """An executor that starts its processes itself, and one whose run guard starts them (as
    agents on POSIX do): every behaviour below holds for both."""
    guard = None
    if request.param == "guard":
        guard = GuardClient(fence=lambda: (None, 0.0), silent_after=60.0, kill_grace=1.0)
        guard.start()
    ex = Executor(
        agent_id="a1",
        log_dir=tmp_path / "logs",
        writer=writer,
        max_parallel=4,
        kill_grace=1.0,
        guard=guard,
    )
    yield ex
    ex.shutdown()
    if guard is not None:
        guard.stop()


def test_success_output_and_environment(store, executor, tmp_path):
    ctx = start(
        store,
        executor,
        {
            "command": [
                PY,
                "-c",
                "import os; print('hello', os.environ['CLOUDTASK_TASK'], os.environ['LEVEL']); print(os.environ['CLOUDTASK_RUN_ID'], os.environ['CLOUDTASK_ATTEMPT'], os.environ['CLOUDTASK_TRIGGER'], os.environ['CLOUDTASK_AGENT'], os.environ['CLOUDTASK_SCHEDULED_FOR'])",
            ],
            "env": {"LEVEL": "info"},
        },
    )
    run = finished(store, ctx.run_id)
    assert run["status"] == "succeeded"
    assert run["exit_code"] == 0
    lines = run["output_tail"].splitlines()
    assert lines[0] == "hello t info"
    run_id, attempt, trigger, agent, scheduled = lines[1].split()
    assert (run_id, attempt, trigger, agent) == (ctx.run_id, "0", "manual", "a1")
    assert (
        scheduled.endswith("Z")
        and datetime.fromisoformat(scheduled.replace("Z", "+00:00")) == run["scheduled_for"]
    )
    assert run["started_at"] <= run["finished_at"]
    assert run["duration"] >= 0
    logfile = log_path(tmp_path / "logs", "t", datetime.now().date())
    text = logfile.read_text()
    assert f"run {ctx.run_id} task t" in text and "hello t info" in text
    assert f"run {ctx.run_id} succeeded exit 0" in text


@pytest.mark.parametrize("code", [1, 3, 255])
def test_exit_codes_mark_failure(store, executor, code):
    ctx = start(store, executor, {"command": [PY, "-c", f"import sys; sys.exit({code})"]})
    run = finished(store, ctx.run_id)
    assert run["status"] == "failed"
    assert run["exit_code"] == code


def test_shell_command_and_stderr_captured(store, executor):
    ctx = start(store, executor, {"command": "echo out; echo err 1>&2; exit 2", "shell": True})
    run = finished(store, ctx.run_id)
    assert run["status"] == "failed" and run["exit_code"] == 2
    assert run["output_tail"].split() == ["out", "err"]


def test_missing_program_fails_with_message(store, executor):
    ctx = start(store, executor, {"command": ["/nonexistent/program-xyz"]})
    run = finished(store, ctx.run_id)
    assert run["status"] == "failed"
    assert "cannot start '/nonexistent/program-xyz'" in run["error"]


def test_missing_cwd_fails_with_message(store, executor, tmp_path):
    ctx = start(store, executor, {"command": ["true"], "cwd": str(tmp_path / "nowhere")})
    run = finished(store, ctx.run_id)
    assert run["status"] == "failed" and "nowhere" in run["error"]


def test_output_tail_is_last_64k(store, executor):
    ctx = start(
        store,
        executor,
        {
            "command": [
                PY,
                "-c",
                "import sys\nfor i in range(20000): print(f'line {i:06d}')\nprint('END')",
            ]
        },
    )
    run = finished(store, ctx.run_id)
    tail = run["output_tail"]
    assert len(tail.encode()) <= 64 * 1024
    assert tail.rstrip().endswith("END")
    assert "line 019999" in tail and "line 000000" not in tail


def test_timeout_kills_whole_tree(store, executor):
    ctx = start(
        store,
        executor,
        {"command": "sleep 100 & sleep 100", "shell": True, "timeout": "3s"},
    )
    wait_for(lambda: ctx.proc is not None, message="process did not start")
    pid = ctx.proc.pid
    wait_for(lambda: len(psutil.Process(pid).children()) >= 2, message="children did not start")
    children = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    run = finished(store, ctx.run_id)
    assert run["status"] == "timed_out"
    assert "timeout" in run["error"]
    for child in children + [pid]:
        assert not _alive(child), f"process {child} survived the timeout"
    assert _tagged(ctx.run_id) == []


def test_timeout_kills_grandchild_that_escaped_with_setsid(store, executor):
    ctx = start(
        store,
        executor,
        {
            "command": [
                PY,
                "-c",
                "import os, subprocess, time\nsubprocess.Popen(['setsid', 'sleep', '100'])\ntime.sleep(100)",
            ],
            "timeout": "3s",
        },
    )
    wait_for(lambda: _tagged(ctx.run_id), message="grandchild did not start")
    run = finished(store, ctx.run_id)
    assert run["status"] == "timed_out"
    wait_for(lambda: _tagged(ctx.run_id) == [], timeout=5, message="escaped grandchild survived")


def test_background_leftovers_are_reaped_after_normal_exit(store, executor):
    ctx = start(store, executor, {"command": "sleep 100 & echo started", "shell": True})
    run = finished(store, ctx.run_id)
    assert run["status"] == "succeeded"
    wait_for(lambda: _tagged(ctx.run_id) == [], timeout=5, message="background child survived")


def test_a_killed_run_is_asked_to_stop_first(store, executor):
    """SIGTERM first, so a task can clean up in its grace (runs must not inherit an ignored
    SIGTERM from whatever started them)."""
    script = (
        "import signal, sys, time\n"
        "def done(*_): print('cleaned up', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, done)\n"
        "print('ready', flush=True)\n"
        "time.sleep(100)"
    )
    ctx = start(store, executor, {"command": [PY, "-c", script]})
    wait_for(lambda: "ready" in store.get_run(ctx.run_id)["output_tail"], message="not running")
    assert executor.kill(ctx.run_id, "killed by test")
    run = finished(store, ctx.run_id)
    assert run["status"] == "killed" and "cleaned up" in run["output_tail"]


def test_kill_running_run(store, executor):
    ctx = start(store, executor, {"command": ["sleep", "100"]})
    wait_for(lambda: store.get_run(ctx.run_id)["status"] == "running", message="not running")
    assert executor.kill(ctx.run_id, "killed by test")
    run = finished(store, ctx.run_id)
    assert run["status"] == "killed" and run["error"] == "killed by test"
    assert executor.kill("no-such-run") is False


def test_the_guard_notes_the_agents_reason_for_ending_a_run(store, executor, tmp_path):
    """An agent that dies between ending a run and recording its end leaves only its guard's
    journal note for its next life: the note says killed or timed out and why, not "ended by
    signal 15"."""
    if executor.guard is None:
        pytest.skip("only a run guard keeps a journal")
    journal = tmp_path / "runs-1.log"
    journal.touch()
    executor.guard.set_journal(str(journal))
    killed = start(store, executor, {"command": ["sleep", "100"]})
    slow = start(store, executor, {"command": ["sleep", "100"], "timeout": "2s"})
    wait_for(lambda: killed.proc is not None, message="not started")
    executor.kill(killed.run_id, "the task was paused, deleted or moved")
    ends = wait_for(
        lambda: (lambda e: e if {killed.run_id, slow.run_id} <= e.keys() else None)(
            journal_ends(journal)
        ),
        timeout=30,
        message="the guard noted no end",
    )
    assert ends[killed.run_id]["status"] == "killed"
    assert ends[killed.run_id]["error"] == "the task was paused, deleted or moved"
    assert ends[slow.run_id]["status"] == "timed_out"
    assert "timeout of 2s" in ends[slow.run_id]["error"]


def test_running_output_tail_is_updated_live(store, executor):
    ctx = start(
        store,
        executor,
        {"command": [PY, "-u", "-c", "import time\nprint('first', flush=True)\ntime.sleep(30)"]},
    )
    wait_for(
        lambda: "first" in (store.get_run(ctx.run_id).get("output_tail") or ""),
        timeout=10,
        message="tail not live",
    )
    assert store.get_run(ctx.run_id)["status"] == "running"
    executor.kill(ctx.run_id)


def test_max_parallel_queues_in_order(store, writer, tmp_path):
    ex = Executor(
        agent_id="a1", log_dir=tmp_path / "logs", writer=writer, max_parallel=2, kill_grace=1.0
    )
    try:
        runs = [
            start(store, ex, {"command": [PY, "-c", "import time; time.sleep(0.5)"]})
            for _ in range(5)
        ]
        holds(  # never more than two at once, while they go through
            lambda: [store.get_run(r.run_id)["status"] for r in runs].count("running") <= 2,
            seconds=1.0,
        )
        docs = [finished(store, r.run_id) for r in runs]
        assert all(d["status"] == "succeeded" for d in docs)
        starts = [d["started_at"] for d in docs]
        assert starts == sorted(starts)  # FIFO
        # with 2 slots, 5 runs of 0.5 s need at least 3 rounds
        assert (max(d["finished_at"] for d in docs) - min(starts)).total_seconds() >= 1.3
    finally:
        ex.shutdown()


def test_log_retention_removes_only_old_files(tmp_path):
    logs = tmp_path / "logs"
    today = date(2026, 11, 23)
    keep, old = [], []
    for task in ("a", "b"):
        for age in (0, 1, 13, 14, 15, 40):
            p = log_path(logs, task, today - timedelta(days=age))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
            (old if age > 14 else keep).append(p)
    other = logs / "a" / "notes.txt"
    other.write_text("not a log")
    only_old = log_path(logs, "c", today - timedelta(days=30))
    only_old.parent.mkdir(parents=True)
    only_old.write_text("x")
    deleted = cleanup_logs(logs, 14, today=today)
    assert sorted(deleted) == sorted(old + [only_old])
    assert all(p.exists() for p in keep) and other.exists()
    assert not (logs / "c").exists()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tagged(run_id: str) -> list[int]:
    found = []
    for p in psutil.process_iter():
        try:
            if (
                p.pid != os.getpid()
                and p.environ().get("CLOUDTASK_RUN_ID") == run_id
                and _alive(p.pid)
            ):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_log_dir_path_is_per_task_and_day(tmp_path):
    assert log_path(Path("/l"), "job", date(2026, 1, 2)) == Path("/l/job/2026-01-02.log")


def test_threaded_collection_used_where_pipes_cannot_be_selected(store, executor, monkeypatch):
    """The Windows path (a pump thread per run), exercised here: output, exit code, timeout."""
    import cloudtask.agent.executor as executor_module

    monkeypatch.setattr(executor_module, "IS_POSIX", False)
    ok = start(store, executor, {"command": [PY, "-c", "print('threaded'); raise SystemExit(4)"]})
    slow = start(
        store, executor, {"command": [PY, "-c", "import time; time.sleep(60)"], "timeout": "1s"}
    )
    run = finished(store, ok.run_id)
    assert (run["status"], run["exit_code"], run["output_tail"].strip()) == (
        "failed",
        4,
        "threaded",
    )
    assert finished(store, slow.run_id)["status"] == "timed_out"


def test_timeout_holds_for_a_process_that_closed_its_output(store, executor):
    ctx = start(
        store,
        executor,
        {"command": "exec >/dev/null 2>&1; sleep 30", "shell": True, "timeout": "1s"},
    )
    run = finished(store, ctx.run_id, timeout=15)
    assert run["status"] == "timed_out"
    assert (run["finished_at"] - run["started_at"]).total_seconds() < 10


def test_setsid_leftover_after_normal_exit_is_ended(store, executor):
    ctx = start(store, executor, {"command": "setsid sleep 30 & echo main done", "shell": True})
    run = finished(store, ctx.run_id, timeout=15)
    assert run["status"] == "succeeded" and "main done" in run["output_tail"]
    assert (run["finished_at"] - run["started_at"]).total_seconds() < 5
    wait_for(lambda: _tagged(ctx.run_id) == [], timeout=5, message="setsid leftover survived")


def test_many_runs_with_output_and_timeouts_share_one_reader_thread(store, writer, tmp_path):
    """40 processes at once, each printing over a second (some past their timeout), are all
    read, timed out and recorded by the run loop: the agent's threads do not grow with the
    runs (a thread per run would add 40)."""
    guard = GuardClient(fence=lambda: (None, 0.0), silent_after=60.0, kill_grace=1.0)
    guard.start()
    ex = Executor(
        agent_id="a1",
        log_dir=tmp_path / "logs",
        writer=writer,
        max_parallel=40,
        kill_grace=1.0,
        guard=guard,
    )
    script = (
        "import sys, time\n"
        "for i in range(int(sys.argv[1])):\n"
        "    print(sys.argv[2], i, flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    try:
        before = threading.active_count()
        runs = []
        for n in range(40):
            slow = n % 4 == 0  # 30 lines over 3 s, timed out after 1 s
            task = {"command": [PY, "-c", script, "30" if slow else "8", f"run{n}"]}
            if slow:
                task["timeout"] = "1s"
            runs.append((start(store, ex, task), slow))
        wait_for(lambda: all(ctx.proc is not None for ctx, _ in runs), message="not started")
        assert threading.active_count() <= before + 6  # the loop, starters, enders: not 40
        for ctx, slow in runs:
            run = finished(store, ctx.run_id, timeout=30)
            if slow:
                assert run["status"] == "timed_out", run
                assert f"{ctx.spec.command[4]} 0" in run["output_tail"]
            else:
                assert run["status"] == "succeeded", run
                lines = run["output_tail"].splitlines()
                assert lines == [f"{ctx.spec.command[4]} {i}" for i in range(8)]
        text = log_path(tmp_path / "logs", "t", datetime.now().date()).read_text()
        for ctx, slow in runs:
            assert f"run {ctx.run_id} {'timed_out' if slow else 'succeeded'}" in text
    finally:
        ex.shutdown()
        guard.stop()


def test_a_burst_beyond_max_parallel_runs_every_fire_once(store, executor):
    """More fires than slots, all at once: every one runs, once, never more than
    ``max_parallel`` (4) at a time, and each slot goes to the next fire when its run ends."""
    script = "import os, time; print(os.environ['CLOUDTASK_RUN_ID'], time.time()); time.sleep(0.05)"
    runs = [start(store, executor, {"command": [PY, "-c", script]}) for _ in range(24)]
    docs = [finished(store, ctx.run_id, timeout=60) for ctx in runs]
    assert [d["status"] for d in docs] == ["succeeded"] * 24
    spans = []
    for ctx, d in zip(runs, docs):
        run_id, _ = d["output_tail"].split()
        assert run_id == ctx.run_id
        spans.append((d["started_at"], d["finished_at"]))
    for at, _ in spans:  # at any run's start, at most 4 runs have started and not finished
        assert sum(1 for s, f in spans if s <= at < f) <= 4


def test_output_without_a_newline_and_a_pause_reaches_the_log_file(store, executor, tmp_path):
    """The loop writes a run's log buffer out when its output pauses (half a second)."""
    script = "import sys, time; sys.stdout.write('partial'); sys.stdout.flush(); time.sleep(30)"
    ctx = start(store, executor, {"command": [PY, "-c", script]})
    logfile = log_path(tmp_path / "logs", "t", datetime.now().date())
    wait_for(
        lambda: logfile.exists() and "partial" in logfile.read_text(),
        timeout=10,
        message="the paused output stayed in the buffer",
    )
    executor.kill(ctx.run_id, "done")
    assert finished(store, ctx.run_id)["status"] == "killed"
