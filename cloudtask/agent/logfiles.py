"""Daily log files per task: ``<log_dir>/<task>/<YYYY-MM-DD>.log``, deleted after N days.

A run appends a header line, its output and a footer line. The date is the agent's local
date when the bytes are written, so a run that crosses midnight continues in the next file.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

_LOG_NAME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})\.log$")


def log_path(log_dir: Path, task_name: str, day: date) -> Path:
    # task names are validated to [A-Za-z0-9._-] and never start with a dot, so this stays inside
    return log_dir / task_name / f"{day.isoformat()}.log"


class RunLog:
    """Appends one run's output to its task's file of the day. Not shared between threads.

    Writes are buffered in memory; the run's reader calls :meth:`flush` when its output
    pauses and at least once a second, so a short run costs one write and a long one is
    followed live. The files stay open between runs (:class:`_OpenFiles`): a run opens none.
    """

    def __init__(self, log_dir: Path, task_name: str) -> None:
        self.log_dir = log_dir
        self.task_name = task_name
        self._day: str | None = None
        self._buf = bytearray()
        self._closed = False
        self._checked = False  # whether the file was looked at once in this run (see write)
        self._flushed = time.monotonic()

    def write(self, data: bytes) -> None:
        if self._closed:  # a straggling reader after the run's end: the run's log is complete
            return
        day = _today()
        if day != self._day:
            if self._buf:  # what came before midnight goes to the day before
                self._write_out()
            self._day = day
        self._buf += data
        if len(self._buf) >= BUFFER_BYTES:
            self._write_out()

    def line(self, text: str) -> None:
        self.write(text.encode("utf-8", "replace") + b"\n")

    def flush(self, older_than: float = 0.0) -> None:
        """Write out what is buffered, if the last flush is at least ``older_than`` s ago."""
        now = time.monotonic()
        if now - self._flushed < older_than:
            return
        self._flushed = now
        if self._buf:
            self._write_out()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._buf:
            self._write_out()

    def _write_out(self) -> None:
        assert self._day is not None
        try:
            _FILES.append(self.log_dir, self.task_name, self._day, self._buf, fresh=self._checked)
            self._checked = True
        except OSError as e:
            log.warning("cannot write the log of task %s: %s", self.task_name, e)
        self._buf.clear()


def _open_files_most() -> int:
    """How many log files stay open: a quarter of the descriptors this process may have
    (the rest are for the runs' pipes, sockets, the journal), from 64 to 4,096."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 512
    if soft < 0:  # RLIM_INFINITY
        soft = 1 << 20
    return max(64, min(4096, soft // 4))


BUFFER_BYTES = 65536  # a run's log buffer is written out when it holds this much
# log files kept open at most (the least recently written is closed first)
OPEN_FILES = _open_files_most()


class _OpenFiles:
    """The daily log files kept open, one ``O_APPEND`` descriptor each, shared by the runs of
    a task (each run writes whole buffers: a write lands in one piece). A file deleted or
    renamed meanwhile (someone cleaning up) is opened anew by the next run."""

    def __init__(self, most: int = OPEN_FILES) -> None:
        self.most = most
        self._lock = threading.Lock()
        self._fds: collections.OrderedDict[tuple[str, str, str], int] = collections.OrderedDict()

    def append(
        self, log_dir: Path, task_name: str, day: str, data: bytes | bytearray, fresh: bool
    ) -> None:
        """Append ``data`` to the file; ``fresh``: the descriptor was good for this run's
        earlier writes already (else it is checked: one fstat)."""
        key = (str(log_dir), task_name, day)
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                if not fresh and os.fstat(fd).st_nlink == 0:  # deleted since
                    del self._fds[key]
                    os.close(fd)
                    fd = None
            if fd is None:
                fd = self._open(key)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

    def _open(self, key: tuple[str, str, str]) -> int:
        folder = os.path.join(key[0], key[1])
        path = os.path.join(folder, f"{key[2]}.log")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # a new task's folder, or one the janitor removed meanwhile
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        self._fds[key] = fd
        while len(self._fds) > self.most:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close_all(self) -> None:
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


_FILES = _OpenFiles()
_day = ("", 0.0)  # today (ISO), and when it ends (epoch seconds)


def _today() -> str:
    """The agent's local date (ISO), as of now; looked up again only after midnight."""
    global _day
    now = time.time()
    if now >= _day[1]:
        today = datetime.fromtimestamp(now).date()
        ends = datetime.combine(today + timedelta(days=1), datetime.min.time()).timestamp()
        _day = (today.isoformat(), ends)
    return _day[0]


def cleanup_logs(log_dir: Path, retention_days: int, today: date | None = None) -> list[Path]:
    """Delete daily log files older than ``retention_days`` (by the date in their name).

    Only files named ``YYYY-MM-DD.log`` one level below a task folder are touched; empty task
    folders are removed. Returns the deleted files.
    """
    _FILES.close_all()  # (yesterday's files among them; the runs open what they write anew)
    today = today or datetime.now().date()
    cutoff = today - timedelta(days=retention_days)
    deleted: list[Path] = []
    if not log_dir.is_dir():
        return deleted
    for task_dir in log_dir.iterdir():
        if not task_dir.is_dir() or task_dir.is_symlink():
            continue
        for f in task_dir.iterdir():
            m = _LOG_NAME.match(f.name)
            if not m or not f.is_file():
                continue
            try:
                day = date(int(m[1]), int(m[2]), int(m[3]))
            except ValueError:
                continue
            if day < cutoff:
                try:
                    f.unlink()
                    deleted.append(f)
                except OSError as e:
                    log.warning("cannot delete old log %s: %s", f, e)
        try:
            next(task_dir.iterdir())
        except StopIteration:
            shutil.rmtree(task_dir, ignore_errors=True)
    if deleted:
        log.info("deleted %d log files older than %d days", len(deleted), retention_days)
    return deleted


class LogJanitor:
    """Runs :func:`cleanup_logs` at start and then once a day, in a daemon thread."""

    def __init__(self, log_dir: Path, retention_days: int, interval: float = 86400.0) -> None:
        self.log_dir = log_dir
        self.retention_days = retention_days
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="log-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                cleanup_logs(self.log_dir, self.retention_days)
            except Exception:  # the janitor must never take the agent down
                log.exception("log cleanup failed")
            if self._stop.wait(self.interval):
                return
