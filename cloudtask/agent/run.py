"""A run on its way through an agent: the claimed fire, its process or request, its output.

:class:`RunContext` is what the executor runs (a process, see :mod:`.executor`) or sends (an
http task, see :mod:`.httprun`), what the run writer writes to the store, and what a kill or
a timeout ends. Both kinds of run import it from here.
"""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..runmodel import OUTPUT_TAIL_BYTES
from ..task import TaskSpec
from .logfiles import RunLog

__all__ = ["RunContext", "iso", "kill_outcome"]


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

    def append_output(self, data: bytes) -> None:
        with self.lock:
            self.tail += data
            if len(self.tail) > OUTPUT_TAIL_BYTES:
                del self.tail[: len(self.tail) - OUTPUT_TAIL_BYTES]
            self.tail_dirty = True

    def record_output(self, chunk: bytes, runlog: RunLog) -> None:
        """A chunk of output: into the tail, and into the log file (flushed at least once a second)."""
        self.append_output(chunk)
        runlog.write(chunk)
        runlog.flush(older_than=1.0)

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
        }


def kill_outcome(ctx: RunContext) -> tuple[str, str]:
    """The status and error of a run its agent ended (``ctx.kill_reason`` is set)."""
    if ctx.kill_reason == "timeout":
        return "timed_out", f"ran longer than its timeout of {ctx.spec.timeout:g}s"
    return "killed", str(ctx.kill_reason)
