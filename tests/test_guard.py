"""The run guard with real processes and real faults: an agent killed with SIGKILL or frozen
with SIGSTOP leaves no run behind; nothing starts under a fence that ran out; a keepalive
deadline ends its run even while the agent cannot; a dead guard is replaced."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from helpers import holds, journal_ends, wait_for

from cloudtask.agent.guard import PULSE_EVERY, GuardClient, GuardGone, SpawnRefused
from cloudtask.agent.run import RunLoop

# An "agent": a process with a guard, which starts `sleep 60` through it and then waits.
HOST = """
import os, sys, time
from cloudtask.agent.guard import GuardClient
silent_after, deadline_in = float(sys.argv[1]), float(sys.argv[2])
guard = GuardClient(
    fence=lambda: ("s1", time.monotonic() + 3600), silent_after=silent_after, kill_grace=0.5
)
if len(sys.argv) > 3:
    guard.set_journal(sys.argv[3])
guard.start()
proc = guard.spawn("r1", "s1", ["sleep", "60"], dict(os.environ), None)
if deadline_in > 0:
    guard.set_deadline("r1", time.monotonic() + deadline_in)
print(proc.pid, guard.pid, flush=True)
code = proc.wait()
print("exit", code, proc.ended_by_guard, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def host():
    started: list[subprocess.Popen] = []

    def start(silent_after: float = 60.0, deadline_in: float = 0.0, journal: str | None = None):
        extra = [journal] if journal else []
        proc = subprocess.Popen(
            [sys.executable, "-c", HOST, str(silent_after), str(deadline_in), *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        run_pid, guard_pid = map(int, proc.stdout.readline().split())
        assert alive(run_pid) and alive(guard_pid)
        return proc, run_pid, guard_pid

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


@pytest.fixture
def guard():
    fence = {"session": "s1", "until": time.monotonic() + 3600}
    client = GuardClient(
        fence=lambda: (fence["session"], fence["until"]), silent_after=60.0, kill_grace=0.5
    )
    client.fence_state = fence
    client.start()
    yield client
    client.stop()


def test_runs_end_when_their_agent_is_killed(host):
    agent, run_pid, guard_pid = host()
    agent.kill()  # kill -9: no cleanup of its own
    agent.wait()
    wait_for(lambda: not alive(run_pid), timeout=10, message="the run outlived its agent")
    wait_for(lambda: not alive(guard_pid), timeout=10, message="the guard outlived its agent")


def test_runs_end_when_their_agent_freezes_past_its_session(host):
    agent, run_pid, _ = host(silent_after=2.0)
    agent.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        holds(lambda: alive(run_pid), 1.0, message="ended before its agent's session ran out")
        wait_for(lambda: not alive(run_pid), timeout=10, message="the frozen agent's run went on")
        # its last pulse came up to PULSE_EVERY before the freeze (and a loaded machine may
        # deliver a pulse late): the session counts from that pulse
        assert time.monotonic() - frozen >= 2.0 - PULSE_EVERY - 0.1
    finally:
        agent.send_signal(signal.SIGCONT)
    line = agent.stdout.readline().split(maxsplit=2)
    assert line[:2] == ["exit", str(-signal.SIGTERM)]
    assert "stopped answering" in line[2]  # the agent learns why when it wakes up


def test_a_keepalive_deadline_ends_the_run_without_the_agent(host):
    agent, run_pid, _ = host(deadline_in=1.0)
    agent.send_signal(signal.SIGSTOP)  # it could not end its instance itself
    try:
        wait_for(lambda: not alive(run_pid), timeout=10, message="the deadline was not kept")
    finally:
        agent.send_signal(signal.SIGCONT)
    assert "keepalive lease" in agent.stdout.readline()


def test_nothing_starts_under_a_fence_that_ran_out(guard):
    env = dict(os.environ)
    with pytest.raises(SpawnRefused, match="session changed"):
        guard.spawn("r1", "another-session", ["true"], env, None)
    guard.fence_state["until"] = time.monotonic() - 1  # the agent's contact is too old
    time.sleep(0.6)  # a pulse carries it to the guard
    with pytest.raises(SpawnRefused, match="fence ran out"):
        guard.spawn("r2", "s1", ["true"], env, None)
    proc = guard.spawn("r3", None, ["true"], env, None)  # no session: a standalone agent
    assert proc.wait(timeout=10) == 0


def test_exit_codes_output_and_start_failures(guard):
    env = dict(os.environ)
    proc = guard.spawn("r1", "s1", ["sh", "-c", "echo hello; exit 3"], env, None)
    assert proc.stdout.read() == b"hello\n"
    assert proc.wait(timeout=10) == 3
    with pytest.raises(OSError) as e:
        guard.spawn("r2", "s1", ["/no/such/program"], env, None)
    assert e.value.errno == errno.ENOENT


def test_a_program_is_found_in_the_runs_own_path_as_a_shell_would(guard, tmp_path):
    """The guard searches the run's PATH like Popen: a candidate that cannot be run (not a
    program, not executable) is passed over for a later one; when none runs, the first
    error other than "not found" is the one reported; a run without a working directory and
    one with one find the same program."""
    bad, good, empty = tmp_path / "bad", tmp_path / "good", tmp_path / "empty"
    for folder in (bad, good, empty):
        folder.mkdir()
    (bad / "tool").write_text("not a program\n")
    (bad / "tool").chmod(0o755)  # executable, but no shebang and not a binary: ENOEXEC
    (bad / "quiet").write_text("#!/bin/sh\necho never\n")  # not executable: EACCES
    (good / "tool").write_text('#!/bin/sh\necho "good $1"\n')
    (good / "tool").chmod(0o755)
    env = dict(os.environ, PATH=f"{empty}:{bad}:{good}")
    for cwd in (None, str(tmp_path)):
        proc = guard.spawn(f"t-{cwd}", "s1", ["tool", "x"], env, cwd)
        assert proc.stdout.read() == b"good x\n"
        assert proc.wait(timeout=10) == 0
    for cwd in (None, str(tmp_path)):
        with pytest.raises(OSError) as e:
            guard.spawn(f"q-{cwd}", "s1", ["quiet"], env, cwd)
        assert e.value.errno == errno.EACCES
    with pytest.raises(OSError) as e:
        guard.spawn("n", "s1", ["no-such-tool"], env, None)
    assert e.value.errno == errno.ENOENT
    # a program named with a folder is not searched for
    proc = guard.spawn("p", "s1", [str(good / "tool"), "y"], dict(env, PATH=""), None)
    assert proc.stdout.read() == b"good y\n"


def test_a_guard_that_dies_is_replaced_and_its_runs_end(guard):
    env = dict(os.environ, CLOUDTASK_RUN_ID="r1")
    proc = guard.spawn("r1", "s1", ["sleep", "60"], env, None)
    old = guard.pid
    os.kill(old, signal.SIGKILL)
    assert proc.wait(timeout=15) == -signal.SIGKILL
    assert proc.ended_by_guard and "guard died" in proc.ended_by_guard
    wait_for(lambda: not alive(proc.pid), timeout=10, message="the orphaned run went on")
    wait_for(lambda: guard.pid != old and alive(guard.pid), timeout=10)
    again = guard.spawn("r2", "s1", ["true"], dict(os.environ), None)
    assert again.wait(timeout=10) == 0


def test_a_signal_for_a_run_after_its_guard_stopped_is_no_error(guard):
    """An agent stopping ends its runs in threads of their own while its guard closes: a
    late SIGTERM for a run finds no guard, which has ended the run itself."""
    proc = guard.spawn("r1", "s1", ["sleep", "60"], dict(os.environ), None)
    guard.stop()
    wait_for(lambda: not alive(proc.pid), timeout=10, message="the stopped guard left its run")
    proc.terminate()  # the socket is closed: no GuardGone in the caller
    proc.kill()


def test_the_guard_notes_each_exit_in_the_agents_journal(guard, tmp_path):
    journal = tmp_path / "runs-1.log"
    journal.touch()
    guard.set_journal(str(journal))
    proc = guard.spawn("r1", "s1", ["sh", "-c", "exit 3"], dict(os.environ), None)
    assert proc.wait(timeout=10) == 3
    state = wait_for(lambda: journal_ends(journal).get("r1"), timeout=5)
    assert state["status"] == "failed" and state["exit_code"] == 3
    assert state["finished_at"] >= state["started_at"]


def test_the_guard_notes_a_spawn_before_it_starts_the_process(guard, tmp_path):
    journal = tmp_path / "runs-1.log"
    journal.touch()
    marker = tmp_path / "ran"
    proc = guard.spawn(
        "r1", "s1", ["sh", "-c", f"touch {marker}"], dict(os.environ), None, journal=str(journal)
    )
    assert proc.wait(timeout=10) == 0 and marker.exists()
    assert journal.read_text().splitlines()[0] == '{"spawn":"r1"}'
    # a start it cannot note is refused: nothing runs, and the agent is told why
    missing = tmp_path / "gone" / "runs-2.log"
    with pytest.raises(OSError, match="cannot note its start in the run journal"):
        guard.spawn(
            "r2",
            "s1",
            ["sh", "-c", f"touch {marker}2"],
            dict(os.environ),
            None,
            journal=str(missing),
        )
    holds(lambda: not (tmp_path / "ran2").exists(), 0.5)


def test_runs_of_an_agent_killed_with_sigkill_are_journaled_killed(host, tmp_path):
    """The agent dies before it can record anything: its next start reads in the journal that
    the guard ended the run, instead of calling it lost."""
    journal = tmp_path / "runs-1.log"
    journal.touch()
    proc, run_pid, guard_pid = host(journal=str(journal))
    proc.kill()
    proc.wait()
    wait_for(lambda: not alive(run_pid), timeout=10, message="the run outlived its agent")
    state = wait_for(lambda: journal_ends(journal).get("r1"), timeout=5)
    assert state["status"] == "killed" and "its agent ended" in state["error"]


def _start_and_wait(guard, run_id, argv, **kw):
    """start_run, and wait for its answer (given on the run loop's thread)."""
    box, done = [], threading.Event()

    def answer(result):
        box.append((result, guard.loop.in_loop()))
        done.set()

    guard.start_run(run_id, "s1", argv, None, None, answer, **kw)
    assert done.wait(10), "no answer"
    result, on_loop = box[0]
    assert on_loop
    if isinstance(result, BaseException):
        raise result
    return result


def test_the_base_environment_is_sent_once_and_again_to_a_new_guard(guard):
    """A start sends only what it adds to the base environment; a guard started after one
    died has the base again."""
    guard.set_base_env(dict(os.environ, BASE="base"))
    show = ["sh", "-c", 'echo "$BASE $EXTRA"']
    proc = _start_and_wait(guard, "r1", show, env_over={"EXTRA": "one"})
    assert proc.stdout.read() == b"base one\n" and proc.wait(timeout=10) == 0
    old = guard.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: guard.pid != old and alive(guard.pid), timeout=10)
    proc = wait_for(lambda: _retry_start(guard, "r2", show, env_over={"EXTRA": "two"}), timeout=10)
    assert proc.stdout.read() == b"base two\n" and proc.wait(timeout=10) == 0


def _retry_start(guard, run_id, argv, **kw):
    try:
        return _start_and_wait(guard, run_id, argv, **kw)
    except GuardGone:
        return None  # (the new guard was not listening yet)


def test_the_run_loop_never_waits_to_send_a_start(guard):
    """On the run loop's thread a start that cannot go at once (the guard is frozen and its
    queue is full, or another thread is sending) waits in an outbox, and the loop goes on;
    the starts go out in order once the guard reads again, and every one is answered."""
    answers, all_answered = {}, threading.Event()
    n = 40  # (a Unix socket queues max_dgram_qlen messages, often 10)

    def answer(run_id):
        def got(result):
            answers[run_id] = result
            if len(answers) == n:
                all_answered.set()

        return got

    def start_all():
        for i in range(n):
            guard.start_run(f"r{i}", "s1", ["true"], None, None, answer(f"r{i}"), on_loop=True)

    os.kill(guard.pid, signal.SIGSTOP)
    try:
        with guard._send_lock:  # and another thread is in the middle of a send
            started = threading.Event()
            guard.loop.call_soon(lambda: (start_all(), started.set()))
            assert started.wait(5), "the loop waited for the guard"
        alive_loop = threading.Event()
        guard.loop.call_soon(alive_loop.set)
        assert alive_loop.wait(5), "the loop is stuck"
        assert not answers
    finally:
        os.kill(guard.pid, signal.SIGCONT)
    assert all_answered.wait(20), f"{len(answers)} of {n} answered"
    for i in range(n):
        assert answers[f"r{i}"].wait(timeout=10) == 0


def test_the_run_loop_calls_readers_timers_and_soon_calls_in_order():
    loop = RunLoop("test-loop")
    loop.start()
    seen, done = [], threading.Event()
    r, w = os.pipe()
    try:
        loop.call_soon(lambda: 1 / 0)  # a failing callback does not stop the loop
        loop.call_soon(loop.add_reader, r, lambda events: seen.append(os.read(r, 100)))
        now = time.monotonic()
        loop.call_soon(loop.call_at, now + 0.3, seen.append, "late")
        loop.call_soon(loop.call_at, now + 0.1, seen.append, "early")
        cancelled = []
        loop.call_soon(lambda: cancelled.append(loop.call_at(now + 0.2, seen.append, "no")))
        loop.call_soon(lambda: cancelled[0].cancel())
        threads = [
            threading.Thread(target=loop.call_soon, args=(seen.append, i)) for i in range(50)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.write(w, b"data")
        loop.call_soon(loop.call_at, now + 0.4, done.set)
        assert done.wait(5)
        assert sorted(x for x in seen if isinstance(x, int)) == list(range(50))
        assert b"data" in seen and "no" not in seen
        assert seen.index("early") < seen.index("late")
    finally:
        loop.stop()
        os.close(r)
        os.close(w)


def test_a_path_search_is_used_again_for_a_second_at_most(guard, tmp_path):
    """A burst of one program's runs searches the PATH once: a program installed since in an
    earlier folder is found FOUND_FOR seconds later at most, one removed since is looked for
    again at once."""
    from cloudtask.agent.guard import FOUND_FOR

    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
    (second / "tool").write_text("#!/bin/sh\necho second\n")
    (second / "tool").chmod(0o755)
    env = dict(os.environ, PATH=f"{first}:{second}")
    proc = guard.spawn("r1", "s1", ["tool"], env, None)
    assert proc.stdout.read() == b"second\n"
    (first / "tool").write_text("#!/bin/sh\necho first\n")
    (first / "tool").chmod(0o755)
    time.sleep(FOUND_FOR + 0.1)
    proc = guard.spawn("r2", "s1", ["tool"], env, None)
    assert proc.stdout.read() == b"first\n"
    (first / "tool").unlink()  # removed: the search of a moment ago is not trusted
    proc = guard.spawn("r3", "s1", ["tool"], env, None)
    assert proc.stdout.read() == b"second\n"


def test_the_guard_answers_a_burst_in_few_messages(guard, monkeypatch):
    """The answers of a burst (each start, each exit) come several to a message: every
    message the guard sends may wake the agent's loop."""
    from cloudtask.agent import guard as guard_module

    received = []
    decode = guard_module._decode

    def counting(data):
        msg = decode(data)
        received.append(msg.get("op"))
        return msg

    monkeypatch.setattr(guard_module, "_decode", counting)
    n, answered, done = 40, [], threading.Event()

    def got(result):
        answered.append(result)
        if len(answered) == n:
            done.set()

    def start_all():
        for i in range(n):
            guard.start_run(f"b{i}", "s1", ["true"], None, None, got, on_loop=True)

    guard.loop.call_soon(start_all)
    assert done.wait(20)
    for proc in answered:
        assert proc.wait(timeout=10) == 0
    # 40 starts and 40 exits: 80 answers, in far fewer messages
    assert "batch" in received and len(received) < 30, received  # (about 10)


def test_a_start_request_larger_than_the_socket_buffer_starts_its_run(guard, tmp_path):
    """A command and environment of several hundred KiB (within the task model's limits)
    exceed what one datagram of the socket pair may carry: the request goes as a file."""
    from cloudtask.agent.guard import LARGE_MESSAGE

    out = tmp_path / "out"
    big = "x" * 60_000
    env = {**os.environ, **{f"V{i}": big for i in range(5)}}  # 300 KB of environment
    code = f"import os; open({str(out)!r}, 'w').write(str(len(os.environ['V4'])))"
    argv = [sys.executable, "-c", code, "y" * 60_000]
    assert len(big) * 6 > 4 * LARGE_MESSAGE
    proc = guard.spawn("big-run", "s1", argv, env, None)
    assert proc.wait(timeout=30) == 0
    assert out.read_text() == "60000"
