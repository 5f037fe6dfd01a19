"""Daily log files per task: ``<log_dir>/<task>/<YYYY-MM-DD>.log``, deleted after N days.

A run appends a header line, its output and a footer line. The date is the agent's local
date when the bytes are written, so a run that crosses midnight continues in the next file.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_LOG_NAME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})\.log$")


def log_path(log_dir: Path, task_name: str, day: date) -> Path:
    # task names are validated to [A-Za-z0-9._-] and never start with a dot, so this stays inside
    return log_dir / task_name / f"{day.isoformat()}.log"


class RunLog:
    """Appends one run's output to its task's file of the day. Not shared between threads.

    Writes are buffered; the run's reader calls :meth:`flush` when its output pauses and at
    least once a second, so a short run costs one write and a long one is followed live.
    """

    def __init__(self, log_dir: Path, task_name: str) -> None:
        self.log_dir = log_dir
        self.task_name = task_name
        self._day: date | None = None
        self._fh: BinaryIO | None = None
        self._closed = False
        self._flushed = time.monotonic()

    def _open(self, path: Path) -> BinaryIO:
        if path.parent not in _known_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            _known_dirs.add(path.parent)
        try:
            return open(path, "ab", buffering=65536)  # noqa: SIM115 (kept open for the run)
        except FileNotFoundError:  # the janitor removed the empty folder meanwhile
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "ab", buffering=65536)  # noqa: SIM115

    def _file(self) -> BinaryIO:
        today = datetime.now().date()
        if self._fh is None or today != self._day:
            if self._fh is not None:
                self._fh.close()
            self._fh = self._open(log_path(self.log_dir, self.task_name, today))
            self._day = today
        return self._fh

    def write(self, data: bytes) -> None:
        if self._closed:  # a straggling reader after the run's end: the run's log is complete
            return
        try:
            self._file().write(data)
        except OSError as e:
            log.warning("cannot write the log of task %s: %s", self.task_name, e)

    def line(self, text: str) -> None:
        self.write(text.encode("utf-8", "replace") + b"\n")

    def flush(self, older_than: float = 0.0) -> None:
        """Write out what is buffered, if the last flush is at least ``older_than`` s ago."""
        now = time.monotonic()
        if self._fh is None or now - self._flushed < older_than:
            return
        self._flushed = now
        try:
            self._fh.flush()
        except OSError as e:
            log.warning("cannot write the log of task %s: %s", self.task_name, e)

    def close(self) -> None:
        self._closed = True
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None


# task log folders known to exist, so a run does not ask the file system each time
_known_dirs: set[Path] = set()


def cleanup_logs(log_dir: Path, retention_days: int, today: date | None = None) -> list[Path]:
    """Delete daily log files older than ``retention_days`` (by the date in their name).

    Only files named ``YYYY-MM-DD.log`` one level below a task folder are touched; empty task
    folders are removed. Returns the deleted files.
    """
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
            _known_dirs.discard(task_dir)
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
