"""A run on its way through an agent: the claimed fire, its process or request, its output.

:class:`RunContext` is what the executor runs (a process, see :mod:`.executor`) or sends (an
http task, see :mod:`.httprun`), what the run writer writes to the store, and what a kill or
a timeout ends. Both kinds of run import it from here.

:class:`RunLoop` is the one thread (POSIX) that follows every running process of an agent:
it reads the run guard's answers (guard.py) and every run's output pipe, and keeps the
timeouts (executor.py), with one ``epoll``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..runmodel import OUTPUT_TAIL_BYTES
from ..task import TaskSpec
from .logfiles import RunLog
from .redact import Redactor

__all__ = ["RunContext", "RunLoop", "iso", "kill_outcome"]

log = logging.getLogger(__name__)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class RunContext:
    """A claimed fire on its way through the executor."""

    run_id: str
    task_id: str
    revision: int
    spec: TaskSpec
    scheduled_for: datetime
    attempt: int
    trigger: str
    token: str
    agent: str
    session: str | None = None  # the ZooKeeper session it was claimed under
    plan_id: str | None = None  # a plan item's plan (its task_id is the item's id)
    params: dict[str, str] | None = None  # a manual run's parameters (environment values)
    claimed_status: str = "running"  # "queued": its claim waited for a slot (started by a write)
    start_token: str | None = None  # the token of that write (Store.start_queued_run)
    status: str = "queued"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    http_status: int | None = None
    error: str | None = None
    kill_reason: str | None = None  # "timeout", or why it was killed
    kill_requested: threading.Event = field(default_factory=threading.Event)  # wakes waits
    proc: subprocess.Popen | None = None
    tail: bytearray = field(default_factory=bytearray)
    tail_dirty: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the values of the stored secrets the task uses (name -> value), opened just before the
    # run starts; every byte of output and the error pass the redactor (``***`` for a value)
    secrets: dict[str, str] | None = field(default=None, repr=False)
    redactor: Redactor | None = field(default=None, repr=False)
    secret_tries: int = 0  # reads of the secrets MongoDB did not answer
    pool_token: Any = None  # its place in its task's concurrency pool, once it has one
    shard: tuple[int, int] | None = None  # a mode-all run's (index, total) among its agents

    def open_secrets(self, values: dict[str, str]) -> None:
        self.secrets = dict(values)
        redactor = Redactor(values.values())
        self.redactor = redactor if redactor.active else None

    def secret_env(self) -> dict[str, str]:
        """The task's variables whose values are stored secrets, with their values."""
        opened = self.secrets or {}
        return {var: opened[name] for var, name in self.spec.secret_env.items() if name in opened}

    def redact(self, text: str | None) -> str | None:
        """``text`` with every secret value of the run replaced by ``***``."""
        if text is None or self.redactor is None:
            return text
        return self.redactor.string(text)

    def append_output(self, data: bytes) -> None:
        with self.lock:
            self.tail += data
            if len(self.tail) > OUTPUT_TAIL_BYTES:
                del self.tail[: len(self.tail) - OUTPUT_TAIL_BYTES]
            self.tail_dirty = True

    def record_output(self, chunk: bytes, runlog: RunLog) -> None:
        """A chunk of output: into the tail, and into the log file (flushed at least once a second)."""
        if self.redactor is not None:  # (one thread reads a run's output)
            chunk = self.redactor.feed(chunk)
            if not chunk:
                return
        self.append_output(chunk)
        runlog.write(chunk)
        runlog.flush(older_than=1.0)

    def end_output(self, runlog: RunLog) -> None:
        """The output ended: what the redactor held back (the start of a value, perhaps) goes
        out now."""
        if self.redactor is not None:
            rest = self.redactor.flush()
            if rest:
                self.append_output(rest)
                runlog.write(rest)

    def output_tail(self) -> str:
        with self.lock:
            self.tail_dirty = False
            return bytes(self.tail).decode("utf-8", "replace")

    def changed_tail(self) -> str | None:
        with self.lock:
            if not self.tail_dirty:
                return None
        return self.output_tail()

    def environment(self) -> dict[str, str]:
        """What every process of the run gets, so a task can make itself idempotent."""
        return {
            "CLOUDTASK_TASK": self.spec.name,
            "CLOUDTASK_RUN_ID": self.run_id,
            "CLOUDTASK_SCHEDULED_FOR": iso(self.scheduled_for),
            "CLOUDTASK_ATTEMPT": str(self.attempt),
            "CLOUDTASK_TRIGGER": self.trigger,
            "CLOUDTASK_AGENT": self.agent,
            **(
                {"CLOUDTASK_PLAN_ID": self.plan_id, "CLOUDTASK_ITEM_ID": self.task_id}
                if self.plan_id
                else {}
            ),
            **(
                {
                    "CLOUDTASK_SHARD_INDEX": str(self.shard[0]),
                    "CLOUDTASK_SHARD_TOTAL": str(self.shard[1]),
                }
                if self.shard is not None
                else {}
            ),
        }


def kill_outcome(ctx: RunContext) -> tuple[str, str]:
    """The status and error of a run its agent ended (``ctx.kill_reason`` is set)."""
    if ctx.kill_reason == "timeout":
        return "timed_out", f"ran longer than its timeout of {ctx.spec.timeout:g}s"
    return "killed", str(ctx.kill_reason)


_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLERR


class Timer:
    """A call :meth:`RunLoop.call_at` will make, unless cancelled first."""

    __slots__ = ("when", "fn", "args", "cancelled", "loop")

    def __init__(
        self, when: float, fn: Callable[..., Any], args: tuple[Any, ...], loop: RunLoop
    ) -> None:
        self.when, self.fn, self.args, self.cancelled, self.loop = when, fn, args, False, loop

    def cancel(self) -> None:
        """(On the loop's thread.) What it would have called is let go at once: a run's long
        timeout, cancelled when it ends, does not keep the run in the heap until then."""
        if not self.cancelled:
            self.cancelled = True
            self.fn, self.args = _nothing, ()
            self.loop._cancelled += 1


def _nothing() -> None:
    pass


class RunLoop:
    """One thread waiting on many descriptors (``epoll``, level-triggered) and on timers.

    Readers and timers are added and removed on the loop's own thread (from a callback, or
    through :meth:`call_soon`, which any thread may use and which wakes the loop). A reader
    is called with the ``epoll`` event mask of its descriptor. A callback must not block: what
    may wait (ending a process tree, a grace period) goes to a thread of its own. An exception
    in a callback is logged, and the loop goes on.

    Example::

        loop = RunLoop("runs")
        loop.start()
        loop.call_soon(loop.add_reader, fd, lambda events: print(os.read(fd, 4096)))
        loop.call_soon(loop.call_at, time.monotonic() + 1.0, print, "a second later")
    """

    def __init__(self, name: str = "run-loop") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[int], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._masks: dict[int, int] = {}  # what epoll watches for each descriptor
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = itertools.count()
        self._soon: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._woken = False  # a wake byte is on its way: later call_soon need not write one
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._start_lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Start the loop's thread (once; later calls do nothing)."""
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop's thread after the calls already asked for."""
        with self._start_lock:
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is not None and thread.ident != threading.get_ident():
            thread.join(timeout)

    def running(self) -> bool:
        """Whether the loop's thread is there (started and not stopped)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def in_loop(self) -> bool:
        return self._ident == threading.get_ident()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop's thread, after what it is doing now (any thread)."""
        self._soon.append((fn, args))
        if not self._woken and not self.in_loop():
            self._wake()

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Call ``fn(*args)`` at the monotonic time ``when`` (on the loop's thread only)."""
        timer = Timer(when, fn, args, self)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        if self._cancelled > 256 and self._cancelled > len(self._timers) // 2:
            self._timers = [t for t in self._timers if not t[2].cancelled]  # (mostly dead)
            heapq.heapify(self._timers)
            self._cancelled = 0
        return timer

    def add_reader(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` whenever ``fd`` is readable, or closed at the other end."""
        self._readers[fd] = callback
        self._watch(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._watch(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` can be written to (until removed)."""
        self._writers[fd] = callback
        self._watch(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._watch(fd)

    def _watch(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0
        )
        old = self._masks.get(fd)
        try:
            if not mask:
                if old is not None:
                    del self._masks[fd]
                    self._epoll.unregister(fd)
            elif old is None:
                self._epoll.register(fd, mask)
                self._masks[fd] = mask
            elif old != mask:
                self._epoll.modify(fd, mask)
                self._masks[fd] = mask
        except OSError:  # (a descriptor closed meanwhile: epoll has dropped it)
            if not mask:
                return
            raise

    def _wake(self) -> None:
        self._woken = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def _run(self) -> None:
        self._ident = threading.get_ident()
        poll, readers, soon = self._epoll.poll, self._readers, self._soon
        while True:
            timers = self._timers  # (a new list after a compaction)
            if soon or self._stopping:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = -1.0
            try:
                events = poll(timeout)
            except InterruptedError:
                events = []
            for fd, mask in events:
                callback = readers.get(fd)
                if callback is not None and mask & _READABLE:
                    self._call(callback, (mask,))
                if mask & _WRITABLE:
                    write = self._writers.get(fd)
                    if write is not None:
                        self._call(write, ())
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    # after the pipe is empty and before the calls are made: a call_soon from
                    # now on writes a byte again (one before it is made below)
                    self._woken = False
            timers = self._timers
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if timer.cancelled:
                        self._cancelled -= 1
                    else:
                        timer.cancelled = True  # (made: a later cancel() counts nothing)
                        self._call(timer.fn, timer.args)
            for _ in range(len(soon)):
                fn, args = soon.popleft()
                self._call(fn, args)
            if self._stopping and not soon:
                return

    @staticmethod
    def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:  # one run's trouble must not stop the loop that follows them all
            log.exception("a run loop callback failed")
