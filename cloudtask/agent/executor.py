"""Runs claimed fires: processes and HTTP calls, bounded by ``max_parallel``.

Fires beyond ``max_parallel`` wait in a FIFO queue and keep their ``scheduled_for``. On POSIX
every running process is followed by one thread, the run loop (:class:`.run.RunLoop`, shared
with the run guard's client, which reads the guard's answers there): it reads each run's
output (stdout and stderr merged, so their order is kept) into the daily log file and a
64 KiB tail that the run writer sends to MongoDB at most once a second, hears each exit, keeps
the timeouts, and records each run's end. A run whose start needs nothing that may wait is
started on the loop too (its request to the guard does not wait for the answer, which comes
back on the loop); one whose start may wait (a claim that waited for its slot is moved to
``running`` by a MongoDB write first, a task file is laid out) is started by one of a few
starter threads. What may take a grace period (ending a process tree) runs in a thread of its
own. Where pipes cannot be selected (Windows) each run has a thread that waits for it and one
that pumps its output. An HTTP run is one call, or for a callback task the call and then the
wait for its service's result (httprun.py), on a thread of its own.

A burst's starts come first: a run that ends gives its slot to the next at once, and while
fires wait to start, the records of the ends (log footer, journal ``end``, final state,
``on_finished``) wait, at most ENDS_MOST seconds; the run writer holds its writes meanwhile
too (runwriter.py).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo

from ..clock import to_bson_time, utcnow
from ..metrics import NO_AGENT_METRICS
from ..task import TaskSpec
from ..taskenv import RunAsError, RunUser, run_user, task_environment
from .container import container_argv, engine_environment, remove_run_containers
from .files import FileCache, TaskFileError
from .guard import GuardClient, GuardedProcess, GuardGone, SpawnRefused, user_kwargs
from .httprun import run_http
from .journal import Journal, end_state
from .logfiles import RunLog
from .proctree import (
    IS_POSIX,
    end_run_processes,
    kill_tree,
    popen_group_kwargs,
    process_identity,
    reap_leftovers,
)
from .run import RunContext, RunLoop, Timer, iso, kill_outcome
from .runwriter import RunWriter

log = logging.getLogger(__name__)

# a read of a callback report gives up after this long (MongoDB down), so that a run waiting
# for its result still sees a kill or its timeout within a couple of seconds
REPORT_READ_BUDGET = 2.0
# threads that start the runs whose start may wait (a MongoDB write, a task file); the others
# start on the run loop
STARTERS = 4
# the run loop writes out a log file's buffer when its run's output pauses this long
OUTPUT_PAUSE = 0.5
# a burst is starting while fires wait to start and one started less than this ago (seconds)
STARTING_GAP = 0.05
# runs that end on the loop within this many seconds are told to on_finished together
FINISHED_GAP = 0.02
# while a burst starts, the ends of its runs (log footer, journal, store, on_finished) wait,
# at most ENDS_MOST seconds; looked at every ENDS_LOOK
ENDS_MOST = 2.0
ENDS_LOOK = 0.05


def _end_tree(ctx: RunContext, proc: Any, grace: float) -> None:
    """End a run's process tree, telling its guard why first (a guarded run's end is noted by
    the guard too: if this agent dies before it records the end, that note says the same)."""
    ending = getattr(proc, "ending", None)
    if ending is not None and ctx.kill_reason is not None:
        ending(*kill_outcome(ctx))
    kill_tree(proc, ctx.run_id, grace)


def _in_thread(fn: Callable[..., Any], *args: Any) -> None:
    """What may wait (a grace period) goes on off the run loop."""
    threading.Thread(target=fn, args=args, daemon=True).start()


def _group_alive(pgid: int) -> bool:
    """Whether anything is left in the run's process group (one cheap system call)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def build_argv(spec: TaskSpec) -> list[str] | str:
    """The process to start: argv as given, split like a shell would, or through the shell.

    On Windows a command string is handed to CreateProcess as it is (Windows programs parse
    their own command line; splitting and re-quoting it would change its meaning).
    """
    command = spec.command
    if spec.shell:
        assert isinstance(command, str)
        if IS_POSIX:
            return ["/bin/sh", "-c", command]
        return [os.environ.get("COMSPEC", "cmd.exe"), "/c", command]
    if isinstance(command, str):
        return shlex.split(command) if IS_POSIX else command
    return list(command or ())


class _Process:
    """A process run the loop follows, from its start to its end."""

    __slots__ = (
        "ctx",
        "runlog",
        "proc",
        "fd",
        "pidfd",
        "eof",
        "exited",
        "exited_at",
        "timers",
        "run_dir",
        "wrote",
        "done",
    )

    def __init__(self, ctx: RunContext, runlog: RunLog) -> None:
        self.ctx = ctx
        self.runlog = runlog
        self.proc: Any = None
        self.fd = -1  # the read end of its output pipe, while it is open
        self.pidfd = -1  # (a process started here, not by the guard: readable at its exit)
        self.eof = False
        self.exited = False
        self.exited_at = 0.0
        self.timers: list[Timer] = []
        self.run_dir: Path | None = None
        self.wrote = 0.0  # when output last came (monotonic), while it is not written out
        self.done = False


def give_tree(root: Path, user: RunUser) -> None:
    """Hand a run's folder to the user it runs as: owned by them, closed to others."""
    os.chown(root, user.uid, user.gid)
    os.chmod(root, 0o700)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(folder, name), user.uid, user.gid, follow_symlinks=False)


class Executor:
    """A bounded pool that runs :class:`RunContext` objects and reports each one finished."""

    def __init__(
        self,
        *,
        agent_id: str,
        log_dir: Path,
        writer: RunWriter,
        max_parallel: int = 16,
        kill_grace: float = 5.0,
        on_finished: Callable[[RunContext], None] | None = None,
        begin: Callable[[RunContext], tuple[str, str]] | None = None,
        guard: GuardClient | None = None,
        journal: Journal | None = None,
        files: FileCache | None = None,
        work_dir: Path | None = None,
        env_allow: tuple[str, ...] = (),
        run_as: str = "",
        run_as_allowed: tuple[str, ...] = (),
        docker_host: str = "",
    ) -> None:
        self.agent_id = agent_id
        self.files = files
        self.work_dir = work_dir or log_dir.parent / "work"
        self.log_dir = log_dir
        self.writer = writer
        self.max_parallel = max_parallel
        self.kill_grace = kill_grace
        self.on_finished = on_finished
        # asked just before a process starts: ("start", ""), or ("release" | "drop" | "later", why)
        self.begin = begin
        self.guard = guard  # starts the processes (POSIX), see guard.py
        self.journal = journal  # what really ran, for a restart after a crash (journal.py)
        self.metrics = NO_AGENT_METRICS  # the agent's counters (cloudtask/metrics), its to set
        self._active: dict[str, RunContext] = {}
        self._by_task: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._slots = 0  # runs holding a slot: starting or running
        self._waiting: collections.deque[RunContext] = collections.deque()  # for a slot
        self._ready: queue.Queue[Callable[[], None] | None] = queue.Queue()  # for a starter
        self._starters: list[threading.Thread] = []
        self._idle_starters = 0
        self._threads: set[threading.Thread] = set()  # runs with a thread of their own
        # what a task gets of the agent's environment: the allow-list only (taskenv.py); taken
        # once (os.environ decodes every key on read)
        self._base_env = task_environment(os.environ, env_allow)
        self._base_env["CLOUDTASK_AGENT_PROCESS"] = process_identity()
        self.run_as, self.run_as_allowed = run_as, run_as_allowed
        self.docker_host = docker_host  # the engine of container tasks ('': DOCKER_HOST)
        self._engine_env = engine_environment()  # the agent's DOCKER_* (container.py)
        if guard is not None:
            guard.set_base_env(self._base_env)  # sent once; a start sends what it adds
        self._loop: RunLoop | None = None
        self._own_loop = False
        if IS_POSIX:
            if guard is not None:
                self._loop = guard.loop
            else:
                self._loop, self._own_loop = RunLoop("run-loop"), True
        # runs holding a slot whose process has not started (or failed to) yet
        self._unstarted: set[str] = set()
        self._last_start = 0.0  # when a process last started (monotonic)
        if hasattr(writer, "hold_while"):  # its writes wait while a burst starts
            writer.hold_while = self.holding
        self._procs: dict[str, _Process] = {}  # followed by the loop (its thread only)
        self._unwritten: dict[str, _Process] = {}  # runs with log output not written out
        self._finished: list[RunContext] = []  # ended on the loop, on_finished not told yet
        self._ends: collections.deque[_Process] = collections.deque()  # ends to record
        self._ends_timer: Timer | None = None
        self._pause_timer: Timer | None = None

    # --- bookkeeping ------------------------------------------------------------------------

    def submit(self, ctx: RunContext, claim: dict[str, Any]) -> None:
        """Queue a run; ``claim`` is the run document its claim stored."""
        self.writer.track(claim)
        if ctx.shard is not None:  # a mode-all run's place among its task's agents
            index, total = ctx.shard
            self.writer.update(ctx.run_id, {"shard": {"index": index, "total": total}}, lazy=True)
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is shut down")
            self._active[ctx.run_id] = ctx
            self._by_task.setdefault(ctx.task_id, set()).add(ctx.run_id)
            go = self._slots < self.max_parallel
            if go:
                self._slots += 1
                self._unstarted.add(ctx.run_id)
            else:
                self._waiting.append(ctx)
        if go:
            self._dispatch(ctx)

    def starting(self) -> bool:
        """Whether a burst is starting: runs wait for a slot or for their process, and a
        process started in the last STARTING_GAP (a queue that does not move, behind long
        runs, is no burst)."""
        return bool(self._waiting or self._unstarted) and (
            time.monotonic() - self._last_start < STARTING_GAP
        )

    def holding(self) -> bool:
        """Whether the run writer should wait: a burst is starting, or the ends of its runs
        wait to be recorded (then each run is written once, with its final state, not once
        as running and again as ended)."""
        return bool(self._ends) or self.starting()

    def active(self, task_id: str | None = None) -> list[RunContext]:
        with self._lock:
            if task_id is None:
                return list(self._active.values())
            return [self._active[r] for r in self._by_task.get(task_id, ())]

    def is_active(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._active

    def free_slots(self) -> int:
        """How many more runs would start at once (``max_parallel`` minus the runs it has)."""
        with self._lock:
            return self.max_parallel - len(self._active)

    def has_active(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._by_task

    def running_count(self) -> int:
        with self._lock:
            return sum(1 for r in self._active.values() if r.status == "running")

    def kill(self, run_id: str, reason: str = "killed by request") -> bool:
        """Kill a queued or running run (its whole process tree). Returns False if unknown.

        Returns at once: the kill (terminate, grace, kill) goes on in a thread of its own.
        """
        with self._lock:
            ctx = self._active.get(run_id)
        if ctx is None:
            return False
        self._kill(ctx, reason)
        return True

    def kill_task(self, task_id: str, reason: str) -> int:
        runs = self.active(task_id)
        for ctx in runs:
            self._kill(ctx, reason)
        return len(runs)

    def _kill(self, ctx: RunContext, reason: str) -> None:
        with ctx.lock:
            if ctx.kill_reason is None:
                ctx.kill_reason = reason
            proc = ctx.proc
        ctx.kill_requested.set()
        if proc is not None and proc.poll() is None:
            _in_thread(_end_tree, ctx, proc, self.kill_grace)

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop taking work; wait ``grace`` seconds for running runs, then kill what is left."""
        with self._lock:
            self._closed = True
            starters = list(self._starters)
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for ctx in self.active():
            self._kill(ctx, "the agent stopped")  # each in its own thread, all at once
        # the runs end (killed, or released before they start) and are recorded
        deadline = time.monotonic() + self.kill_grace + 10
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in starters:
            self._ready.put(None)
        for t in starters:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
        if self._loop is not None:  # the ends not told yet, before this returns
            if self._loop.running():
                told = threading.Event()
                self._loop.call_soon(
                    lambda: (self._record_ends(now=True), self._tell_finished(), told.set())
                )
                told.wait(5.0)
            if self._own_loop:
                self._loop.stop()

    # --- starting ---------------------------------------------------------------------------

    def _dispatch(self, ctx: RunContext) -> None:
        """Start a run that has its slot: on the loop when nothing in its start may wait, else
        on a starter thread."""
        loop = self._loop
        if (
            loop is not None
            and IS_POSIX
            and self.guard is not None
            and ctx.spec.http is None
            and not ctx.spec.file
            and ctx.claimed_status != "queued"  # (its start is a MongoDB write)
            and not ctx.spec.secrets_used()  # (they are read from MongoDB just before)
            and not ctx.spec.pool  # (a place in its pool may have to be waited for)
        ):
            loop.start()
            loop.call_soon(self._start, ctx, True)
        elif ctx.spec.pool:  # it may wait long for its pool: a thread of its own, not a starter
            thread = threading.Thread(
                target=self._start, args=(ctx, False), name=f"pool-{ctx.run_id}", daemon=True
            )
            thread.start()
        else:
            self._to_starter(lambda: self._start(ctx, False))

    def _to_starter(self, work: Callable[[], None]) -> None:
        self._ready.put(work)
        with self._lock:
            if self._idle_starters > 0 or len(self._starters) >= STARTERS:
                return
            starter = threading.Thread(
                target=self._starter, name=f"starter-{len(self._starters)}", daemon=True
            )
            self._starters.append(starter)
        starter.start()

    def _starter(self) -> None:
        while True:
            with self._lock:
                self._idle_starters += 1
            work = self._ready.get()
            with self._lock:
                self._idle_starters -= 1
            if work is None:
                return
            try:
                work()
            except Exception:
                log.exception("starting a run failed")

    def _free_slot(self) -> None:
        """A run gave its slot back: the next waiting run takes it."""
        with self._lock:
            if self._waiting:
                nxt: RunContext | None = self._waiting.popleft()
                self._unstarted.add(nxt.run_id)
            else:
                nxt = None
                self._slots -= 1
        if nxt is not None:
            self._dispatch(nxt)

    def _again_later(self, ctx: RunContext) -> None:
        """A run whose start must wait a second: back in the queue (it stays active)."""
        with self._lock:
            go = self._slots < self.max_parallel
            if go:
                self._slots += 1
                self._unstarted.add(ctx.run_id)
            else:
                self._waiting.append(ctx)
        if go:
            self._dispatch(ctx)

    def _start(self, ctx: RunContext, on_loop: bool) -> None:
        """Take a run with a slot as far as its process's start (or its end, if it does not
        start); any thread, the loop included (``on_loop``: then nothing may wait)."""
        try:
            if self._begin(ctx, on_loop):
                return
        except Exception as e:  # a bug must not leave a run 'running' forever
            log.exception("run %s of task %s crashed the executor", ctx.run_id, ctx.spec.name)
            ctx.status, ctx.error = "failed", f"internal error: {e}"
            ctx.finished_at = ctx.finished_at or utcnow()
            self._journal_end(ctx)
            self._report(ctx)
        self._done(ctx)

    def _begin(self, ctx: RunContext, on_loop: bool) -> bool:
        """True when the run goes on elsewhere (the loop follows it, a thread runs it, or it
        is queued again); False when it is over (recorded, released or dropped)."""
        if self._closed:  # the agent stops: not started, so the task's next owner runs it
            self._not_started(ctx, "released", "its agent stopped before starting it")
            return False
        if ctx.kill_reason is not None:  # killed while it waited for a slot
            ctx.status, ctx.error = "killed", f"{ctx.kill_reason} before it started"
            ctx.finished_at = utcnow()
            self._journal_end(ctx)
            self._report(ctx)
            return False
        action, why = self.begin(ctx) if self.begin is not None else ("start", "")
        if action == "later":
            log.warning("run %s of %s cannot start yet: %s", ctx.run_id, ctx.spec.name, why)
            timer = threading.Timer(1.0, self._again_later, args=(ctx,))
            timer.daemon = True
            timer.start()
            with self._lock:
                self._unstarted.discard(ctx.run_id)
            self._free_slot()
            return True
        if action in ("fail", "skip"):  # it cannot run as asked, or waited too long
            log.warning("run %s of %s not started: %s", ctx.run_id, ctx.spec.name, why)
            status = "failed" if action == "fail" else "skipped"
            ctx.status, ctx.error = ("killed" if ctx.kill_reason else status), why
            ctx.finished_at = utcnow()
            ctx.append_output(f"not started: {why}\n".encode())
            self._journal_end(ctx)
            self._report(ctx)
            return False
        if action != "start":
            self._not_started(ctx, "released" if action == "release" else "dropped", why)
            return False
        if ctx.spec.http is not None or not IS_POSIX or self._loop is None:
            thread = threading.Thread(
                target=self._run_in_thread, args=(ctx,), name=f"run-{ctx.run_id}", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
                self._unstarted.discard(ctx.run_id)
            thread.start()
            return True
        p = _Process(ctx, self._open_log(ctx))
        try:
            return self._spawn_followed(p, on_loop)
        except BaseException:
            p.runlog.close()
            raise

    def _open_log(self, ctx: RunContext) -> RunLog:
        """The run's log, with its header; the run is ``running`` from here (journaled)."""
        runlog = RunLog(self.log_dir, ctx.spec.name)
        ctx.started_at = utcnow()
        ctx.status = "running"
        self.metrics.run_started(ctx.trigger, ctx.scheduled_for, ctx.started_at)
        if self.journal is not None:
            # before anything can start; a process the guard starts is noted by it too
            guarded = self.guard is not None and ctx.spec.http is None and IS_POSIX
            self.journal.started(ctx.run_id, noted=guarded)
        runlog.line(
            f"===== {iso(ctx.started_at)} run {ctx.run_id} task {ctx.spec.name} "
            f"scheduled {iso(ctx.scheduled_for)} attempt {ctx.attempt} trigger {ctx.trigger} "
            f"agent {self.agent_id} ====="
        )
        return runlog

    def _spawn_followed(self, p: _Process, on_loop: bool) -> bool:
        """Start the process of a run the loop is to follow (POSIX)."""
        ctx, spec = p.ctx, p.ctx.spec
        try:
            user = run_user(spec.run_as, self.run_as, self.run_as_allowed)
        except RunAsError as e:
            self._fail_to_start(ctx, p.runlog, f"cannot start: {e}")
            self._finish(p)
            return True
        over = self._run_env(ctx, user)
        cwd = spec.cwd or None
        if spec.file:
            p.run_dir = self.work_dir / ctx.run_id
            try:
                meta = self._lay_out_file(spec.file, p.run_dir, spec.file_version, user)
            except TaskFileError as e:
                self._fail_to_start(ctx, p.runlog, str(e))
                self._finish(p)
                return True
            p.runlog.line(f"file {spec.file} sha256 {meta['sha256']} laid out in {p.run_dir}")
            over["CLOUDTASK_WORKDIR"] = str(p.run_dir)
            cwd = cwd or str(p.run_dir)
        argv = self._argv(ctx)
        if self.guard is not None and isinstance(argv, list):
            journal = self.journal.current_path() if self.journal is not None else None
            try:
                self.guard.start_run(
                    ctx.run_id,
                    ctx.session,
                    argv,
                    None,
                    cwd,
                    lambda result: self._started(p, result, argv, cwd),
                    journal=journal,
                    env_over=over,
                    on_loop=on_loop,
                    user=user.wire() if user is not None else None,
                )
            except GuardGone as e:
                if on_loop:
                    self._started(p, e, argv, cwd)
                else:
                    assert self._loop is not None
                    self._loop.call_soon(self._started, p, e, argv, cwd)
            return True
        env = dict(self._base_env)
        env.update(over)
        try:
            proc: Any = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                **popen_group_kwargs(),
                **user_kwargs(user.wire() if user is not None else None),
            )
        except OSError as e:
            self._started(p, e, argv, cwd)
            return True
        assert self._loop is not None
        self._loop.start()
        self._loop.call_soon(self._started, p, proc, argv, cwd)
        return True

    def _lay_out_file(
        self, name: str, run_dir: Path, version: str | None = None, user: RunUser | None = None
    ) -> dict[str, Any]:
        if self.files is None:
            raise TaskFileError(f"task file {name!r}: this agent has no file store")
        meta = self.files.lay_out(name, run_dir, version=version)
        if user is not None:  # the run's own folder: its user's, and no one else's
            try:
                give_tree(run_dir, user)
            except OSError as e:
                raise TaskFileError(
                    f"task file {name!r}: cannot give {run_dir} to {user.name}: {e.strerror or e}"
                ) from e
        return meta

    def _argv(self, ctx: RunContext) -> list[str] | str:
        """The run's process: its command, or for a container the child program that runs
        it (container.py), told which of its variables the container gets."""
        spec = ctx.spec
        if spec.container is None:
            return build_argv(spec)
        names = {*spec.env, *spec.secret_env, *(ctx.params or {}), *ctx.environment()}
        # (and the agent process's identity: a container's processes, seen from this host,
        # are then a live agent's, not orphans for another agent of the same id to end)
        names.add("CLOUDTASK_AGENT_PROCESS")
        return container_argv(
            spec.container,
            run_id=ctx.run_id,
            agent_id=self.agent_id,
            task_name=spec.name,
            pass_env=names,
            docker_host=self.docker_host,
            kill_grace=self.kill_grace,
            engine_env=self._engine_env,
        )

    def _run_env(self, ctx: RunContext, user: RunUser | None) -> dict[str, str]:
        """What a run's process gets on top of the base environment: its user's HOME, USER,
        LOGNAME and SHELL, the task's env, its secrets, and the run's CLOUDTASK_* facts."""
        over = user.environment() if user is not None else {}
        over.update(ctx.spec.env)
        over.update(ctx.secret_env())
        over.update(ctx.params or {})  # (a manual run's parameters win over the task's env)
        over.update(ctx.environment())
        return over

    def _fail_to_start(self, ctx: RunContext, runlog: RunLog, error: str) -> None:
        self.metrics.spawn_failed()
        ctx.status, ctx.error = "failed", error
        ctx.finished_at = utcnow()
        ctx.append_output(f"{error}\n".encode())
        runlog.line(error)

    # --- following a process (the loop's thread) -------------------------------------------

    def _started(self, p: _Process, result: Any, argv: list[str] | str, cwd: str | None) -> None:
        """The answer to a start: the process (followed from now on), or why there is none."""
        ctx = p.ctx
        with self._lock:
            self._unstarted.discard(ctx.run_id)
        if isinstance(result, BaseException):
            if isinstance(result, SpawnRefused):
                ctx.status, ctx.error = "released", str(result)
            elif isinstance(result, GuardGone):
                self._fail_to_start(ctx, p.runlog, f"cannot start: {result}")
            elif isinstance(result, OSError):
                where = f" in {cwd}" if cwd else ""
                program = argv[0] if isinstance(argv, list) else argv
                error = result.strerror or result
                self._fail_to_start(ctx, p.runlog, f"cannot start {program!r}{where}: {error}")
            else:
                self._fail_to_start(ctx, p.runlog, f"cannot start: {result}")
            self._finish(p)
            return
        proc = p.proc = result
        self._last_start = time.monotonic()
        loop = self._loop
        assert loop is not None
        with ctx.lock:
            ctx.proc = proc
            killed_early = ctx.kill_reason is not None
        self._procs[ctx.run_id] = p
        self.writer.update(
            ctx.run_id,
            {"status": "running", "started_at": to_bson_time(ctx.started_at), "pid": proc.pid},
            lazy=True,
        )
        self.writer.watch_tail(ctx.run_id, ctx.changed_tail)
        if killed_early:
            _in_thread(_end_tree, ctx, proc, self.kill_grace)
        if isinstance(proc, GuardedProcess):
            p.fd = proc.stdout_fd
        else:
            p.fd = proc.stdout.fileno()
        os.set_blocking(p.fd, False)
        loop.add_reader(p.fd, lambda events: self._readable(p, events))
        if ctx.spec.timeout:
            p.timers.append(loop.call_at(time.monotonic() + ctx.spec.timeout, self._timed_out, p))
        if isinstance(proc, GuardedProcess):
            proc.on_exit = lambda: self._exit_heard(p)
            if proc.returncode is not None:
                self._exited(p)
        else:
            self._watch_exit(p)

    def _watch_exit(self, p: _Process) -> None:
        """A process started here (no guard): its exit is a readable pidfd, else polled."""
        loop = self._loop
        assert loop is not None
        try:
            p.pidfd = os.pidfd_open(p.proc.pid)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            p.pidfd = -1
        if p.pidfd >= 0:
            loop.add_reader(p.pidfd, lambda _: self._poll_exit(p))
        else:
            p.timers.append(loop.call_at(time.monotonic() + 0.05, self._poll_exit, p))

    def _poll_exit(self, p: _Process) -> None:
        loop = self._loop
        assert loop is not None
        if p.proc.poll() is not None:
            if p.pidfd >= 0:
                loop.remove_reader(p.pidfd)
                os.close(p.pidfd)
                p.pidfd = -1
            self._exited(p)
            return
        if p.pidfd >= 0:  # exited, but another thread is reaping it (a kill): look again soon
            loop.remove_reader(p.pidfd)
            os.close(p.pidfd)
            p.pidfd = -1
        if not p.done:
            p.timers.append(loop.call_at(time.monotonic() + 0.05, self._poll_exit, p))

    def _exit_heard(self, p: _Process) -> None:
        """A guarded process's exit (on the loop; or on the thread of a guard that died)."""
        loop = self._loop
        assert loop is not None
        if loop.in_loop():
            self._exited(p)
        else:
            loop.call_soon(self._exited, p)

    def _readable(self, p: _Process, events: int) -> None:
        """Output, or its end (every process holding the pipe closed it). At most 1 MiB a
        call: the loop has other runs to read."""
        for _ in range(16):
            try:
                chunk = os.read(p.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._output_ended(p)
                return
            p.ctx.record_output(chunk, p.runlog)
            if not p.wrote:
                self._unwritten[p.ctx.run_id] = p
                self._pause_watch()
            p.wrote = time.monotonic()
            if len(chunk) < 65536 and not events & select.EPOLLHUP:
                return  # (the pipe is still open: more comes with the next event)

    def _pause_watch(self) -> None:
        if self._pause_timer is None and self._loop is not None:
            self._pause_timer = self._loop.call_at(
                time.monotonic() + OUTPUT_PAUSE, self._write_paused
            )

    def _write_paused(self) -> None:
        """The output paused: let the log file show it."""
        self._pause_timer = None
        now = time.monotonic()
        for run_id, p in list(self._unwritten.items()):
            if now - p.wrote >= OUTPUT_PAUSE:
                del self._unwritten[run_id]
                p.wrote = 0.0
                p.runlog.flush()
        if self._unwritten:
            self._pause_watch()

    def _output_ended(self, p: _Process) -> None:
        assert self._loop is not None
        self._loop.remove_reader(p.fd)
        if isinstance(p.proc, GuardedProcess):
            p.proc.close_stdout()
        else:
            p.proc.stdout.close()
        p.fd = -1
        p.eof = True
        if p.exited:
            self._complete(p)

    def _exited(self, p: _Process) -> None:
        """The main process ended. Output ends when every process holding the pipe has closed
        it: if others still hold it half a second later, its group is ended, after a second
        every process tagged with the run's id (one that left the group with setsid()), and
        after five the output is no longer waited for."""
        if p.exited or p.done:
            return
        p.exited, p.exited_at = True, time.monotonic()
        if p.eof:
            self._complete(p)
            return
        loop = self._loop
        assert loop is not None
        grace = min(self.kill_grace, 2.0)
        p.timers += [
            loop.call_at(p.exited_at + 0.5, self._leftovers, p, reap_leftovers, p.proc, grace),
            loop.call_at(
                p.exited_at + 1.0, self._leftovers, p, end_run_processes, p.ctx.run_id, grace
            ),
            loop.call_at(p.exited_at + 5.0, self._output_held, p),
        ]

    def _leftovers(self, p: _Process, end: Callable[..., Any], *args: Any) -> None:
        if not p.eof:
            _in_thread(end, *args)

    def _output_held(self, p: _Process) -> None:
        if p.eof:
            return
        log.warning("run %s: output still open after the process ended", p.ctx.run_id)
        self._output_ended(p)

    def _timed_out(self, p: _Process) -> None:
        """The timeout holds until the main process ended (also after it closed its output)."""
        ctx = p.ctx
        if p.exited or p.done:
            return
        with ctx.lock:
            if ctx.kill_reason is not None:
                return  # (being ended already)
            ctx.kill_reason = "timeout"
        _in_thread(_end_tree, ctx, p.proc, self.kill_grace)

    def _complete(self, p: _Process) -> None:
        """Output ended and the main process too: end what it left in its group (in a thread,
        when there is anything), then record the run."""
        ctx = p.ctx
        for timer in p.timers:
            timer.cancel()
        p.timers = []
        if isinstance(p.proc, GuardedProcess):
            p.proc.on_exit = None  # (no cycle: the run is freed as soon as it is recorded)
        ctx.finished_at = utcnow()
        ctx.end_output(p.runlog)
        if p.run_dir is not None or ctx.spec.container is not None or _group_alive(p.proc.pid):
            _in_thread(self._tidy_then_finish, p)
            return
        self._finish_process(p)

    def _tidy_then_finish(self, p: _Process) -> None:
        try:
            reap_leftovers(p.proc, grace=min(self.kill_grace, 2.0))
            if p.ctx.spec.container is not None:  # what its child could not remove
                remove_run_containers(p.ctx.run_id, self.docker_host)
            if p.run_dir is not None:
                shutil.rmtree(p.run_dir, ignore_errors=True)
                p.run_dir = None
        finally:
            assert self._loop is not None
            self._loop.call_soon(self._finish_process, p)

    def _finish_process(self, p: _Process) -> None:
        ctx, proc = p.ctx, p.proc
        ended_by_guard = getattr(proc, "ended_by_guard", None)
        if ended_by_guard and ctx.kill_reason is None:
            ctx.kill_reason = ended_by_guard
        ctx.exit_code = proc.returncode
        if ctx.kill_reason is not None:
            ctx.status, ctx.error = kill_outcome(ctx)
        elif proc.returncode == 0:
            ctx.status = "succeeded"
        else:
            ctx.status = "failed"
            if proc.returncode < 0:
                ctx.error = f"ended by signal {-proc.returncode}"
        # its slot goes to the next run now; its end is recorded once a burst has started
        p.done = True
        self._procs.pop(ctx.run_id, None)
        self._unwritten.pop(ctx.run_id, None)
        self._done(ctx)
        if not self._ends and not self.starting():
            self._record(p)  # (no burst: at once)
            return
        p.exited_at = time.monotonic()
        self._ends.append(p)
        if self._ends_timer is None:
            assert self._loop is not None
            self._ends_timer = self._loop.call_at(p.exited_at + ENDS_LOOK, self._record_ends)

    def _record_ends(self, now: bool = False) -> None:
        """Record the ends waiting (the loop): when no burst is starting, or the oldest has
        waited ENDS_MOST (or ``now``)."""
        self._ends_timer = None
        if not self._ends:
            return
        if not now and self.starting() and time.monotonic() - self._ends[0].exited_at < ENDS_MOST:
            assert self._loop is not None
            self._ends_timer = self._loop.call_at(time.monotonic() + ENDS_LOOK, self._record_ends)
            return
        ends, self._ends = self._ends, collections.deque()
        for p in ends:
            self._record(p)

    def _finish(self, p: _Process) -> None:
        """Record the end of a run whose process did not start, and give its slot to the next
        run (any thread)."""
        if p.done:
            return
        p.done = True
        self._procs.pop(p.ctx.run_id, None)
        self._unwritten.pop(p.ctx.run_id, None)
        self._record(p)
        self._done(p.ctx)

    def _record(self, p: _Process) -> None:
        """A followed run's end: its log's footer, the journal, the store, on_finished."""
        ctx = p.ctx
        try:
            self.writer.unwatch_tail(ctx.run_id)
            self._footer(ctx, p.runlog)
            if p.run_dir is not None:
                shutil.rmtree(p.run_dir, ignore_errors=True)
            if ctx.status == "released":  # the guard refused to start it under a lost fence
                self._not_started(ctx, "released", ctx.error or "its fence ran out")
            else:
                self._journal_end(ctx)
                self._report(ctx)
        except Exception as e:
            log.exception("recording run %s of task %s failed", ctx.run_id, ctx.spec.name)
            ctx.status, ctx.error = "failed", f"internal error: {e}"
            self._journal_end(ctx)
            self._report(ctx)

    def _footer(self, ctx: RunContext, runlog: RunLog) -> None:
        ctx.finished_at = ctx.finished_at or utcnow()
        assert ctx.started_at is not None
        runlog.line(
            f"===== {iso(ctx.finished_at)} run {ctx.run_id} {ctx.status}"
            + (f" exit {ctx.exit_code}" if ctx.exit_code is not None else "")
            + (f" http {ctx.http_status}" if ctx.http_status is not None else "")
            + (f" ({ctx.redact(ctx.error)})" if ctx.error else "")
            + f" in {(ctx.finished_at - ctx.started_at).total_seconds():.3f}s ====="
        )
        runlog.close()

    def _done(self, ctx: RunContext) -> None:
        """The run is over here: it leaves the active runs and its slot goes to the next."""
        self._forget(ctx)
        self._free_slot()

    def _forget(self, ctx: RunContext) -> None:
        with self._lock:
            self._unstarted.discard(ctx.run_id)
            self._active.pop(ctx.run_id, None)
            same_task = self._by_task.get(ctx.task_id)
            if same_task is not None:
                same_task.discard(ctx.run_id)
                if not same_task:
                    del self._by_task[ctx.task_id]

    # --- a run on a thread of its own (HTTP; processes where pipes cannot be selected) -------

    def _run_in_thread(self, ctx: RunContext) -> None:
        try:
            try:
                self._execute_here(ctx)
            except Exception as e:  # a bug must not leave a run 'running' forever
                log.exception("run %s of task %s crashed the executor", ctx.run_id, ctx.spec.name)
                ctx.status, ctx.error = "failed", f"internal error: {e}"
                ctx.finished_at = ctx.finished_at or utcnow()
                self._journal_end(ctx)
                self._report(ctx)
            self._done(ctx)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _execute_here(self, ctx: RunContext) -> None:
        runlog = self._open_log(ctx)
        try:
            if ctx.spec.http is not None:
                self.writer.update(
                    ctx.run_id, {"status": "running", "started_at": to_bson_time(ctx.started_at)}
                )
                self.writer.watch_tail(ctx.run_id, ctx.changed_tail)
                run_http(
                    ctx, runlog, read_report=self._read_report, show_progress=self._show_progress
                )
            else:
                self._run_process(ctx, runlog)
        finally:
            self.writer.unwatch_tail(ctx.run_id)
            self._footer(ctx, runlog)
        if ctx.status == "released":  # the guard refused to start it under a lost fence
            self._not_started(ctx, "released", ctx.error or "its fence ran out")
            return
        self._journal_end(ctx)
        self._report(ctx)

    def _journal_end(self, ctx: RunContext) -> None:
        if self.journal is None:
            return
        state = end_state(
            ctx.status,
            ctx.redact(ctx.error),
            started=ctx.started_at.timestamp() if ctx.started_at else None,
            finished=ctx.finished_at.timestamp() if ctx.finished_at else None,
            exit_code=ctx.exit_code,
            http_status=ctx.http_status,
        )
        self.journal.ended(ctx.run_id, state)

    def _not_started(self, ctx: RunContext, outcome: str, why: str) -> None:
        """A claimed run that will not start here: ``released`` (handed back, still
        ``queued``, for the task's owner to take over) or ``dropped`` (another agent has it)."""
        log.info("run %s of %s not started: %s", ctx.run_id, ctx.spec.name, why)
        if outcome == "released":
            self.writer.release(ctx.run_id, why)
        else:
            self.writer.forget(ctx.run_id)
        ctx.status, ctx.error = outcome, why
        ctx.finished_at = utcnow()
        self._after(ctx)

    def _read_report(self, run_id: str) -> dict[str, Any] | None:
        """What the service of a callback run reported (StoreError when MongoDB cannot tell)."""
        with pymongo.timeout(REPORT_READ_BUDGET):
            return self.writer.store.get_report(run_id)

    def _show_progress(self, ctx: RunContext, progress: dict[str, Any]) -> None:
        """A callback run's progress into its document, written like a running run's output."""
        self.writer.update(ctx.run_id, {"progress": progress}, lazy=True)

    def _run_process(self, ctx: RunContext, runlog: RunLog) -> None:
        """A process on this thread (where pipes cannot be selected)."""
        spec = ctx.spec
        try:
            user = run_user(spec.run_as, self.run_as, self.run_as_allowed)
        except RunAsError as e:
            self._fail_to_start(ctx, runlog, f"cannot start: {e}")
            return
        env = dict(self._base_env)
        env.update(self._run_env(ctx, user))
        cwd = spec.cwd or None
        run_dir: Path | None = None
        try:
            if spec.file:
                run_dir = self.work_dir / ctx.run_id
                try:
                    meta = self._lay_out_file(spec.file, run_dir, spec.file_version, user)
                except TaskFileError as e:
                    self._fail_to_start(ctx, runlog, str(e))
                    return
                runlog.line(f"file {spec.file} sha256 {meta['sha256']} laid out in {run_dir}")
                env["CLOUDTASK_WORKDIR"] = str(run_dir)
                cwd = cwd or str(run_dir)
            self._start_and_collect(ctx, runlog, env, cwd, user)
        finally:
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            if spec.container is not None:  # what its child could not remove
                remove_run_containers(ctx.run_id, self.docker_host)

    def _start_and_collect(
        self,
        ctx: RunContext,
        runlog: RunLog,
        env: dict[str, str],
        cwd: str | None,
        user: RunUser | None = None,
    ) -> None:
        argv = self._argv(ctx)
        try:
            proc = self._spawn(ctx, argv, env, cwd, user)
        except SpawnRefused as e:
            ctx.status, ctx.error = "released", str(e)
            return
        except GuardGone as e:
            self._fail_to_start(ctx, runlog, f"cannot start: {e}")
            return
        except OSError as e:
            where = f" in {cwd}" if cwd else ""
            program = argv[0] if isinstance(argv, list) else argv
            self._fail_to_start(ctx, runlog, f"cannot start {program!r}{where}: {e.strerror or e}")
            return
        with ctx.lock:
            ctx.proc = proc
            killed_early = ctx.kill_reason is not None
        self.writer.update(
            ctx.run_id,
            {"status": "running", "started_at": to_bson_time(ctx.started_at), "pid": proc.pid},
            lazy=True,
        )
        self.writer.watch_tail(ctx.run_id, ctx.changed_tail)
        if killed_early:
            _end_tree(ctx, proc, self.kill_grace)
        self._collect_threaded(ctx, proc, runlog)
        ended_by_guard = getattr(proc, "ended_by_guard", None)
        if ended_by_guard and ctx.kill_reason is None:
            ctx.kill_reason = ended_by_guard
        ctx.exit_code = proc.returncode
        if ctx.kill_reason is not None:
            ctx.status, ctx.error = kill_outcome(ctx)
        elif proc.returncode == 0:
            ctx.status = "succeeded"
        else:
            ctx.status = "failed"
            if proc.returncode < 0:
                ctx.error = f"ended by signal {-proc.returncode}"

    def _spawn(
        self,
        ctx: RunContext,
        argv: list[str] | str,
        env: dict[str, str],
        cwd: str | None,
        user: RunUser | None = None,
    ) -> Any:
        """Start the run's process: through the run guard when there is one (it starts it only
        under the fence the run was claimed in), else here."""
        wire = user.wire() if user is not None else None
        if self.guard is not None and isinstance(argv, list):
            journal = self.journal.current_path() if self.journal is not None else None
            return self.guard.spawn(
                ctx.run_id, ctx.session, argv, env, cwd, journal=journal, user=wire
            )
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            **popen_group_kwargs(),
        )

    def _collect_threaded(self, ctx: RunContext, proc: Any, runlog: RunLog) -> None:
        """Windows (pipes cannot be selected): a pump thread reads while this one waits."""
        pump = threading.Thread(target=self._pump, args=(ctx, proc, runlog), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=ctx.spec.timeout)
        except subprocess.TimeoutExpired:
            with ctx.lock:
                ctx.kill_reason = ctx.kill_reason or "timeout"
            _end_tree(ctx, proc, self.kill_grace)
        ctx.finished_at = utcnow()
        reap_leftovers(proc, grace=min(self.kill_grace, 2.0))
        pump.join(timeout=1.0)
        if pump.is_alive():  # something the run started still holds the pipe
            end_run_processes(ctx.run_id, min(self.kill_grace, 2.0))
            pump.join(timeout=5.0)
        if pump.is_alive():
            log.warning("run %s: output still open after the process ended", ctx.run_id)

    @staticmethod
    def _pump(ctx: RunContext, proc: subprocess.Popen, runlog: RunLog) -> None:
        stream = proc.stdout
        assert stream is not None
        try:
            while True:
                chunk = stream.read1(65536)
                if not chunk:
                    break
                ctx.record_output(chunk, runlog)
        except (OSError, ValueError):
            pass
        finally:
            ctx.end_output(runlog)
            try:
                stream.close()
            except OSError:
                pass

    def _report(self, ctx: RunContext) -> None:
        finished = ctx.finished_at or utcnow()
        fields: dict[str, Any] = {
            "status": ctx.status,
            "finished_at": to_bson_time(finished),
            "duration": round((finished - ctx.started_at).total_seconds(), 3)
            if ctx.started_at
            else 0.0,
            "exit_code": ctx.exit_code,
            "output_tail": ctx.output_tail(),
            "error": ctx.redact(ctx.error),
        }
        if ctx.started_at is not None:
            fields["started_at"] = to_bson_time(ctx.started_at)
        if ctx.http_status is not None:
            fields["http_status"] = ctx.http_status
        self.writer.update(ctx.run_id, fields, urgent=True)
        self._after(ctx)

    def _after(self, ctx: RunContext) -> None:
        """Tell ``on_finished``. From the run loop, the runs that end within FINISHED_GAP are
        told together: the agent's loop, which each call wakes, wakes once for them."""
        if self.on_finished is None:
            return
        loop = self._loop
        if loop is None or not loop.in_loop():
            self._tell(ctx)
            return
        self._finished.append(ctx)
        if len(self._finished) == 1:
            loop.call_at(time.monotonic() + FINISHED_GAP, self._tell_finished)

    def _tell_finished(self) -> None:
        finished, self._finished = self._finished, []
        for ctx in finished:
            self._tell(ctx)

    def _tell(self, ctx: RunContext) -> None:
        assert self.on_finished is not None
        try:
            self.on_finished(ctx)
        except Exception:
            log.exception("after-run handling of run %s failed", ctx.run_id)
