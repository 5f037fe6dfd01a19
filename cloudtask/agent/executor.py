"""Runs claimed fires: processes and HTTP calls, bounded by ``max_parallel``.

Fires beyond ``max_parallel`` wait in a FIFO queue and keep their ``scheduled_for``. Each
running process has two threads: one waits for it (with the task's timeout) and one pumps its
output (stdout and stderr merged, so their order is kept) to the daily log file and to a
64 KiB tail that the run writer sends to MongoDB at most once a second. An HTTP run is one
call, or for a callback task the call and then the wait for its service's result (httprun.py).
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
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
from ..task import TaskSpec
from .files import FileCache, TaskFileError
from .guard import GuardClient, GuardGone, SpawnRefused
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
from .run import RunContext, iso, kill_outcome
from .runwriter import RunWriter

log = logging.getLogger(__name__)

# a read of a callback report gives up after this long (MongoDB down), so that a run waiting
# for its result still sees a kill or its timeout within a couple of seconds
REPORT_READ_BUDGET = 2.0


def _end_tree(ctx: RunContext, proc: Any, grace: float) -> None:
    """End a run's process tree, telling its guard why first (a guarded run's end is noted by
    the guard too: if this agent dies before it records the end, that note says the same)."""
    ending = getattr(proc, "ending", None)
    if ending is not None and ctx.kill_reason is not None:
        ending(*kill_outcome(ctx))
    kill_tree(proc, ctx.run_id, grace)


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
        self._queue: queue.Queue[RunContext | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._active: dict[str, RunContext] = {}
        self._by_task: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._local = threading.local()
        self._base_env = dict(os.environ)  # copied once: os.environ decodes every key on read
        self._base_env["CLOUDTASK_AGENT_PROCESS"] = process_identity()

    # --- bookkeeping ------------------------------------------------------------------------

    def submit(self, ctx: RunContext, claim: dict[str, Any]) -> None:
        """Queue a run; ``claim`` is the run document its claim stored."""
        self.writer.track(claim)
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is shut down")
            self._active[ctx.run_id] = ctx
            self._by_task.setdefault(ctx.task_id, set()).add(ctx.run_id)
            # workers are started as they are needed, never more than max_parallel
            worker = None
            if len(self._workers) < min(self.max_parallel, len(self._active)):
                worker = threading.Thread(
                    target=self._work, name=f"run-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
        self._queue.put(ctx)
        if worker is not None:
            worker.start()

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
            killer = threading.Thread(
                target=_end_tree, args=(ctx, proc, self.kill_grace), daemon=True
            )
            killer.start()

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop taking work; wait ``grace`` seconds for running runs, then kill what is left."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for ctx in self.active():
            self._kill(ctx, "the agent stopped")  # each in its own thread, all at once
        for _ in workers:
            self._queue.put(None)
        for t in workers:
            t.join(timeout=self.kill_grace + 10)

    # --- running ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            ctx = self._queue.get()
            if ctx is None:
                return
            done = True
            try:
                done = self._execute(ctx)
            except Exception as e:  # a bug must not leave a run 'running' forever
                log.exception("run %s of task %s crashed the executor", ctx.run_id, ctx.spec.name)
                ctx.status, ctx.error = "failed", f"internal error: {e}"
                ctx.finished_at = ctx.finished_at or utcnow()
                self._journal_end(ctx)
                self._report(ctx)
            if done:  # else it is tried again later and stays active
                self._forget(ctx)

    def _forget(self, ctx: RunContext) -> None:
        with self._lock:
            self._active.pop(ctx.run_id, None)
            same_task = self._by_task.get(ctx.task_id)
            if same_task is not None:
                same_task.discard(ctx.run_id)
                if not same_task:
                    del self._by_task[ctx.task_id]

    def _execute(self, ctx: RunContext) -> bool:
        """Run one claimed fire to its end. False if it could not start yet (it is queued again
        a second later)."""
        if self._closed:  # the agent stops: not started, so the task's next owner runs it
            self._not_started(ctx, "released", "its agent stopped before starting it")
            return True
        if ctx.kill_reason is not None:  # killed while it waited for a slot
            ctx.status, ctx.error = "killed", f"{ctx.kill_reason} before it started"
            ctx.finished_at = utcnow()
            self._journal_end(ctx)
            self._report(ctx)
            return True
        action, why = self.begin(ctx) if self.begin is not None else ("start", "")
        if action == "later":
            log.warning("run %s of %s cannot start yet: %s", ctx.run_id, ctx.spec.name, why)
            timer = threading.Timer(1.0, self._queue.put, args=(ctx,))
            timer.daemon = True
            timer.start()
            return False
        if action != "start":
            self._not_started(ctx, "released" if action == "release" else "dropped", why)
            return True
        runlog = RunLog(self.log_dir, ctx.spec.name)
        ctx.started_at = utcnow()
        ctx.status = "running"
        if self.journal is not None:
            # before anything can start; a process the guard starts is noted by it too
            guarded = self.guard is not None and ctx.spec.http is None and IS_POSIX
            self.journal.started(ctx.run_id, noted=guarded)
        runlog.line(
            f"===== {iso(ctx.started_at)} run {ctx.run_id} task {ctx.spec.name} "
            f"scheduled {iso(ctx.scheduled_for)} attempt {ctx.attempt} trigger {ctx.trigger} "
            f"agent {self.agent_id} ====="
        )
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
            ctx.finished_at = ctx.finished_at or utcnow()
            runlog.line(
                f"===== {iso(ctx.finished_at)} run {ctx.run_id} {ctx.status}"
                + (f" exit {ctx.exit_code}" if ctx.exit_code is not None else "")
                + (f" http {ctx.http_status}" if ctx.http_status is not None else "")
                + (f" ({ctx.error})" if ctx.error else "")
                + f" in {(ctx.finished_at - ctx.started_at).total_seconds():.3f}s ====="
            )
            runlog.close()
        if ctx.status == "released":  # the guard refused to start it under a lost fence
            self._not_started(ctx, "released", ctx.error or "its fence ran out")
            return True
        self._journal_end(ctx)
        self._report(ctx)
        return True

    def _journal_end(self, ctx: RunContext) -> None:
        if self.journal is None:
            return
        state = end_state(
            ctx.status,
            ctx.error,
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
        if self.on_finished is not None:
            try:
                self.on_finished(ctx)
            except Exception:
                log.exception("after-run handling of run %s failed", ctx.run_id)

    def _read_report(self, run_id: str) -> dict[str, Any] | None:
        """What the service of a callback run reported (StoreError when MongoDB cannot tell)."""
        with pymongo.timeout(REPORT_READ_BUDGET):
            return self.writer.store.get_report(run_id)

    def _show_progress(self, ctx: RunContext, progress: dict[str, Any]) -> None:
        """A callback run's progress into its document, written like a running run's output."""
        self.writer.update(ctx.run_id, {"progress": progress}, lazy=True)

    def _run_process(self, ctx: RunContext, runlog: RunLog) -> None:
        spec = ctx.spec
        env = dict(self._base_env)
        env.update(spec.env)
        env.update(ctx.environment())
        cwd = spec.cwd or None
        run_dir: Path | None = None
        try:
            if spec.file:
                run_dir = self.work_dir / ctx.run_id
                try:
                    meta = self._lay_out_file(spec.file, run_dir, spec.file_version)
                except TaskFileError as e:
                    self._fail_to_start(ctx, runlog, str(e))
                    return
                runlog.line(f"file {spec.file} sha256 {meta['sha256']} laid out in {run_dir}")
                env["CLOUDTASK_WORKDIR"] = str(run_dir)
                cwd = cwd or str(run_dir)
            self._start_and_collect(ctx, runlog, env, cwd)
        finally:
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _lay_out_file(self, name: str, run_dir: Path, version: str | None = None) -> dict[str, Any]:
        if self.files is None:
            raise TaskFileError(f"task file {name!r}: this agent has no file store")
        return self.files.lay_out(name, run_dir, version=version)

    @staticmethod
    def _fail_to_start(ctx: RunContext, runlog: RunLog, error: str) -> None:
        ctx.status, ctx.error = "failed", error
        ctx.finished_at = utcnow()
        ctx.append_output(f"{error}\n".encode())
        runlog.line(error)

    def _start_and_collect(
        self, ctx: RunContext, runlog: RunLog, env: dict[str, str], cwd: str | None
    ) -> None:
        spec = ctx.spec
        argv = build_argv(spec)
        try:
            proc = self._spawn(ctx, argv, env, cwd)
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
        if IS_POSIX:
            self._collect_select(ctx, proc, runlog)
        else:
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
        self, ctx: RunContext, argv: list[str] | str, env: dict[str, str], cwd: str | None
    ) -> Any:
        """Start the run's process: through the run guard when there is one (it starts it only
        under the fence the run was claimed in), else here."""
        if self.guard is not None and isinstance(argv, list):
            journal = self.journal.current_path() if self.journal is not None else None
            return self.guard.spawn(ctx.run_id, ctx.session, argv, env, cwd, journal=journal)
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            **popen_group_kwargs(),
        )

    def _selector(self) -> selectors.BaseSelector:
        """Each worker thread keeps one selector for all the runs it reads."""
        sel = getattr(self._local, "selector", None)
        if sel is None:
            sel = self._local.selector = selectors.DefaultSelector()
        return sel

    def _timed_out(self, ctx: RunContext, proc: subprocess.Popen) -> None:
        with ctx.lock:
            ctx.kill_reason = ctx.kill_reason or "timeout"
        _end_tree(ctx, proc, self.kill_grace)

    def _collect_select(self, ctx: RunContext, proc: subprocess.Popen, runlog: RunLog) -> None:
        """POSIX: one thread reads the output and watches the timeout and the main process.

        Output ends when every process holding the pipe has closed it. If the main process has
        ended but others still hold the pipe, its group is ended at once, and after a second
        every process tagged with the run's id (one that left the group with setsid()).
        After end-of-output the timeout still holds for a main process that closed its output.
        """
        stream = proc.stdout
        assert stream is not None
        fd = stream.fileno()
        deadline = time.monotonic() + ctx.spec.timeout if ctx.spec.timeout else None
        main_exited: float | None = None
        tagged_ended = False
        sel = self._selector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline and ctx.kill_reason is None:
                    self._timed_out(ctx, proc)
                    continue
                wait = 0.5
                if deadline is not None and ctx.kill_reason is None:
                    wait = max(0.01, min(wait, deadline - now))
                if sel.select(wait):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    ctx.record_output(chunk, runlog)
                    continue
                runlog.flush()  # the output paused: let the log file show it
                if proc.poll() is not None:
                    if main_exited is None:
                        main_exited = now
                        reap_leftovers(proc, grace=min(self.kill_grace, 2.0))
                    elif not tagged_ended and now - main_exited >= 1.0:
                        tagged_ended = True
                        end_run_processes(ctx.run_id, min(self.kill_grace, 2.0))
                    elif now - main_exited > 5.0:
                        log.warning("run %s: output still open after the process ended", ctx.run_id)
                        break
        finally:
            sel.unregister(fd)
        stream.close()
        while True:
            remaining = None
            if deadline is not None and ctx.kill_reason is None:
                remaining = max(0.0, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
                break
            except subprocess.TimeoutExpired:
                self._timed_out(ctx, proc)
        ctx.finished_at = utcnow()
        reap_leftovers(proc, grace=min(self.kill_grace, 2.0))

    def _collect_threaded(self, ctx: RunContext, proc: subprocess.Popen, runlog: RunLog) -> None:
        """Windows (pipes cannot be selected): a pump thread reads while this one waits."""
        pump = threading.Thread(target=self._pump, args=(ctx, proc, runlog), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=ctx.spec.timeout)
        except subprocess.TimeoutExpired:
            self._timed_out(ctx, proc)
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
            "error": ctx.error,
        }
        if ctx.started_at is not None:
            fields["started_at"] = to_bson_time(ctx.started_at)
        if ctx.http_status is not None:
            fields["http_status"] = ctx.http_status
        self.writer.update(ctx.run_id, fields, urgent=True)
        if self.on_finished is not None:
            try:
                self.on_finished(ctx)
            except Exception:
                log.exception("after-run handling of run %s failed", ctx.run_id)
