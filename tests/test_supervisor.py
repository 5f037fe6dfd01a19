"""The supervisor of `cloudtask up`'s children: the restart and backoff logic with a fake
clock and fake processes (nothing sleeps), then real processes killed with kill -9."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
from helpers import wait_for

from cloudtask.supervisor import Supervisor, describe_exit

# --- fakes -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    pids = iter(range(100, 10_000))

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.pid = next(FakeProcess.pids)
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if self.returncode is None:
            self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None
        return self.returncode

    def die(self, code: int = -signal.SIGKILL) -> None:
        self.returncode = code


class Starts:
    """The supervisor's ``start``: records each start, hands out fake processes."""

    def __init__(self) -> None:
        self.started: list[tuple[str, FakeProcess]] = []

    def __call__(self, argv, log_path, env) -> FakeProcess:
        process = FakeProcess(list(argv))
        self.started.append((Path(log_path).stem, process))
        return process

    def of(self, name: str) -> list[FakeProcess]:
        return [p for n, p in self.started if n == name]


@pytest.fixture
def fake() -> tuple[Supervisor, FakeClock, Starts]:
    clock, starts = FakeClock(), Starts()
    return Supervisor(clock=clock, start=starts), clock, starts


def spawn_two(sup: Supervisor) -> None:
    sup.spawn("center", ["center"], Path("/logs/center.log"))
    sup.spawn("agent-1", ["agent"], Path("/logs/agent-1.log"))


# --- the restart logic, with a fake clock ------------------------------------------------------


def test_a_dead_child_is_restarted_after_a_second_and_the_others_keep_running(fake, caplog):
    sup, clock, starts = fake
    spawn_two(sup)
    center = sup.children["center"].process
    clock.advance(10)
    assert sup.poll() == []  # all alive: nothing to do

    starts.of("agent-1")[0].die()
    with caplog.at_level(logging.WARNING, logger="cloudtask.supervisor"):
        assert sup.poll() == []  # noted; it starts again in 1 s
    (record,) = caplog.records
    message = record.getMessage()
    assert "agent-1" in message and "killed by SIGKILL" in message
    assert f"pid {starts.of('agent-1')[0].pid}" in message and "/logs/agent-1.log" in message
    assert "after 10.0 s" in message and "again in 1 s" in message

    clock.advance(0.9)
    assert sup.poll() == []
    clock.advance(0.1)
    (restarted,) = sup.poll()
    assert restarted.name == "agent-1" and restarted.restarts == 1
    assert len(starts.of("agent-1")) == 2 and restarted.process is starts.of("agent-1")[1]
    assert restarted.argv == ["agent"]  # the same command line: the same config, id, data
    assert sup.children["center"].process is center and len(starts.of("center")) == 1
    assert sup.poll() == []


def test_backoff_doubles_to_30_seconds_and_resets_after_a_minute_up(fake):
    sup, clock, starts = fake
    spawn_two(sup)
    delays = []
    for _ in range(8):  # dies right after every start
        starts.of("agent-1")[-1].die(1)
        sup.poll()
        waited = 0.0
        while not sup.poll():
            clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert sup.children["agent-1"].exits == [1] * 8

    clock.advance(59)  # up for 59 s: still the long delay
    starts.of("agent-1")[-1].die(1)
    sup.poll()
    assert sup.children["agent-1"].restart_at == clock.now + 30

    clock.advance(30)
    sup.poll()
    clock.advance(60)  # up for a minute: the next restart is quick again
    starts.of("agent-1")[-1].die(1)
    sup.poll()
    assert sup.children["agent-1"].restart_at == clock.now + 1
    clock.advance(1)
    assert [c.name for c in sup.poll()] == ["agent-1"]
    assert len(starts.of("center")) == 1  # never touched


def test_two_children_dying_back_off_each_on_their_own(fake):
    sup, clock, starts = fake
    spawn_two(sup)
    starts.of("agent-1")[0].die()
    sup.poll()
    clock.advance(1)
    sup.poll()  # agent-1 restarted; its next delay is 2 s
    starts.of("agent-1")[1].die()
    starts.of("center")[0].die(2)
    sup.poll()
    assert sup.children["center"].restart_at == clock.now + 1
    assert sup.children["agent-1"].restart_at == clock.now + 2
    clock.advance(1)
    assert [c.name for c in sup.poll()] == ["center"]
    clock.advance(1)
    assert [c.name for c in sup.poll()] == ["agent-1"]


def test_stop_terminates_every_child_and_restarts_none(fake):
    sup, clock, starts = fake
    spawn_two(sup)
    starts.of("agent-1")[0].die()
    sup.poll()  # waiting for its restart
    sup.stop(grace=1)
    assert starts.of("center")[0].signals == [signal.SIGTERM]
    assert starts.of("agent-1")[0].signals == []  # dead already
    clock.advance(3600)
    assert sup.poll() == [] and len(starts.started) == 2


def test_kill_sends_sigkill_at_once(fake):
    sup, _, starts = fake
    spawn_two(sup)
    sup.kill()
    assert [p.signals for _, p in starts.started] == [[signal.SIGKILL], [signal.SIGKILL]]
    assert sup.poll() == []


def test_a_child_that_cannot_start_again_is_retried_later(fake, caplog):
    sup, clock, starts = fake
    spawn_two(sup)
    starts.of("agent-1")[0].die(1)
    sup.poll()

    def broken(argv, log_path, env):
        raise OSError("no such file")

    sup._start = broken
    clock.advance(1)
    with caplog.at_level(logging.ERROR, logger="cloudtask.supervisor"):
        assert sup.poll() == []
    assert "cannot start the agent-1 again" in caplog.text
    sup._start = starts
    clock.advance(1.9)
    assert sup.poll() == []
    clock.advance(0.1)  # the next delay (2 s) is over
    assert [c.name for c in sup.poll()] == ["agent-1"]


def test_names_are_unique_and_exits_are_described(fake):
    sup, _, _ = fake
    spawn_two(sup)
    with pytest.raises(ValueError):
        sup.spawn("center", ["again"], Path("/logs/x.log"))
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


# --- real processes ----------------------------------------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_real_children_one_killed_is_restarted_the_other_keeps_its_pid(tmp_path):
    sup = Supervisor(first_delay=0.2)
    try:
        a = sup.spawn("a", SLEEPER, tmp_path / "a.log")
        b = sup.spawn("b", SLEEPER, tmp_path / "b.log")
        a_pid, b_pid = a.pid, b.pid
        os.kill(a_pid, signal.SIGKILL)
        restarted = wait_for(sup.poll, timeout=10, interval=0.05, message="not restarted")
        assert [c.name for c in restarted] == ["a"]
        assert a.pid != a_pid and a.running()
        assert b.pid == b_pid and b.running()
        assert psutil.Process(a.pid).cmdline()[-1] == SLEEPER[-1]
        assert psutil.Process(a.pid).ppid() == os.getpid()
        assert (tmp_path / "a.log").read_text().count("starting:") == 2
    finally:
        sup.stop(grace=5)
    for child in (a, b):
        assert not child.running()
        assert not psutil.pid_exists(child.pid) or (
            psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        )


def test_real_children_are_in_a_session_of_their_own(tmp_path):
    """A Ctrl-C in the terminal reaches `cloudtask up` only: it stops each child itself."""
    sup = Supervisor()
    try:
        child = sup.spawn("a", SLEEPER, tmp_path / "a.log")
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
    finally:
        sup.stop(grace=5)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('rea' + 'dy', flush=True); time.sleep(60)",
    ]
    sup = Supervisor()
    child = sup.spawn("stubborn", stubborn, tmp_path / "s.log")
    wait_for(lambda: "\nready" in (tmp_path / "s.log").read_text(), timeout=10)
    sup.stop(grace=0.5)
    assert child.process.returncode == -signal.SIGKILL


@pytest.mark.skipif(os.name != "posix", reason="process trees: POSIX")
def test_kill_also_kills_what_a_child_started(tmp_path):
    parent = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        f"subprocess.Popen({SLEEPER!r}, start_new_session=True); time.sleep(60)",
    ]
    sup = Supervisor()
    child = sup.spawn("agent", parent, tmp_path / "agent.log")
    grandchild = wait_for(lambda: psutil.Process(child.pid).children(), timeout=10)[0]
    sup.kill()
    child.process.wait(timeout=5)
    wait_for(
        lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE,
        timeout=5,
    )
