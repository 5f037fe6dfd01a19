"""What an agent keeps of the calendars and of its group's blackout windows (stored by
:mod:`cloudtask.store.calendars`, judged by :mod:`cloudtask.calendars`).

Read from the store when ``calendar_state``'s counter moved (looked at every poll interval, and
all of it every ``FEED_FULL_READ`` seconds whatever the counter says), and written to a file in
the agent's data folder after every read that changed something, so an agent that starts
while MongoDB does not answer (or answers slowly) still honours the blackouts and calendars
it knew. A failed read keeps what is known; nothing is ever forgotten for want of an answer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..calendars import CalendarBook

log = logging.getLogger(__name__)

FEED_FULL_READ = 60.0  # seconds: a full read now and then, whatever the version says


class CalendarFeed:
    """An agent's copy of the calendars and of its group's blackouts (see the module
    docstring). ``book`` is always usable; :meth:`look` reads the store when the version
    moved (or every ``FEED_FULL_READ`` seconds) and returns True when the book changed."""

    def __init__(
        self, store: Any, group: str, cache_file: Path | None, poll_interval: float = 2.0
    ) -> None:
        self.store = store
        self.group = group
        self.cache_file = cache_file
        self.poll_interval = poll_interval
        self.book = CalendarBook()
        self._docs: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        self._version: int | None = None
        self._looked = -1e9
        self._full_read = -1e9
        self._load_cache()

    def _load_cache(self) -> None:
        if self.cache_file is None or not self.cache_file.exists():
            return
        try:
            data = json.loads(self.cache_file.read_text())
            calendars, blackouts = data["calendars"], data["blackouts"]
            self.book = CalendarBook.from_docs(calendars, blackouts)
            self._docs = (calendars, blackouts)
            log.info(
                "calendars from %s: %d calendars, %d blackouts",
                self.cache_file,
                len(calendars),
                len(blackouts),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "cannot read the calendar cache %s (read from MongoDB): %s", self.cache_file, e
            )

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        calendars, blackouts = self._docs
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
            tmp.write_text(
                json.dumps({"calendars": calendars, "blackouts": blackouts}, default=str)
            )
            os.replace(tmp, self.cache_file)  # whole or not at all
        except OSError as e:
            log.warning("cannot write the calendar cache %s: %s", self.cache_file, e)

    def look(self, force: bool = False) -> bool:
        """Read the store if a look is due (the caller's MongoDB errors are left to it: the
        book stays as it was). True when the book changed."""
        now = time.monotonic()
        if not force and now - self._looked < self.poll_interval:
            return False
        self._looked = now
        version = self.store.calendar_version()
        if not force and version == self._version and now - self._full_read < FEED_FULL_READ:
            return False
        calendars, blackouts = self.store.calendar_feed_docs(self.group)
        self._version, self._full_read = version, now
        if (calendars, blackouts) == self._docs:
            return False
        self.book = CalendarBook.from_docs(calendars, blackouts)
        self._docs = (calendars, blackouts)
        self._save_cache()
        log.info(
            "calendars read: %d calendars, %d blackouts of group %s",
            len(calendars),
            len(blackouts),
            self.group,
        )
        return True
