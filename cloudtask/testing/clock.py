"""A clock with an offset that a test changes while the process runs (clock skew as a fault).

``cloudtask agent`` uses it when ``CLOUDTASK_TEST_CLOCK_OFFSET_FILE`` names a file: the file
holds an offset in seconds (``5``, ``-5.5``; empty or missing: 0), re-read when it changes
(looked at no more than every ``recheck`` seconds), and the agent's clock is the real UTC time
plus that offset. Only the agent's own sense of time moves (when fires are due, claim times);
its processes and every other process keep the real clock, as with a badly synchronised host.

Example::

    clock = OffsetClock(Path("/tmp/a1.offset"))
    Path("/tmp/a1.offset").write_text("5")  # a1 now runs 5 s ahead
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ENV = "CLOUDTASK_TEST_CLOCK_OFFSET_FILE"


class OffsetClock:
    def __init__(self, path: Path, recheck: float = 0.2) -> None:
        self.path = path
        self.recheck = recheck
        self._offset = timedelta(0)
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def offset(self) -> timedelta:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.recheck:
                self._checked = now
                self._reload()
            return self._offset

    def _reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            self._offset, self._mtime = timedelta(0), None
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            text = self.path.read_text(encoding="utf-8").strip()
            self._offset = timedelta(seconds=float(text or 0))
        except (OSError, ValueError):
            self._offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset()


def clock_from_environment() -> OffsetClock | None:
    """The offset clock a test asked for through ``CLOUDTASK_TEST_CLOCK_OFFSET_FILE``."""
    path = os.environ.get(ENV)
    return OffsetClock(Path(path)) if path else None
