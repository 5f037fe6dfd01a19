"""The tasks the leading center places: the enabled, not-done tasks of MongoDB, cached.

The cache is a dict ``task id -> TaskRecord`` kept by a :class:`TaskFeed`, a thread of the
center's own for its whole life (standing by or leading). It is brought in line with MongoDB
by :func:`refresh_tasks`: with nothing cached, every task document in one query; then every
task's revision, and full documents only for the tasks that are new or changed. A disabled or
done task leaves the cache; so does one whose spec no longer parses (it is not placed, and
the error is logged). A record holds what an assignment carries to the agents (see
:func:`cloudtask.center.writer.assignment_data`) and what the leader's housekeeping needs
(the task's name and ``misfire_grace``).

The placement never waits for MongoDB: a pass takes the feed's latest snapshot. A stalled
store holds up only the feed, and a dead agent's tasks move all the same. A standby center
keeps its cache warm, so a new leader needs only the cheap read of the changes; but it
places nothing until a read that *began after its leadership began* has ended. A snapshot
from before could be older than what the previous leader wrote (a task's revision would go
back); one begun after cannot, since the previous leader could no longer write by then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pymongo

from ..exceptions import CloudTaskError, ValidationError
from ..store import Store, all_revisions, first_call_budget, scan_tasks, task_pages
from ..store.tasks import SPEC_PAGE
from ..task import parse_task

log = logging.getLogger(__name__)


@dataclass
class TaskRecord:
    task_id: str
    group: str
    mode: str
    revision: int
    spec: dict[str, Any]
    updated_at: str | None = None
    misfire_grace: float = 0.0
    requires: dict[str, str] = field(default_factory=dict)  # agent labels it needs


def refresh_tasks(
    store: Store,
    tasks: dict[str, TaskRecord],
    each: Callable[[], AbstractContextManager[Any]] = nullcontext,
    first: Callable[[], AbstractContextManager[Any]] | None = None,
) -> None:
    """Bring ``tasks`` in line with MongoDB, in place, reading full specs only for changes.

    Read in batches, each call inside ``each()`` (its deadline) and the first inside
    ``first()``: 100,000 tasks on a slow store are read in calls that each end in time. With
    nothing cached (a new leader) every document is read in one pass; otherwise every
    revision, then the documents of the tasks new or changed, by id (or in one pass again
    when they are more than a quarter of all). Store errors are the caller's: what was
    brought in line before one stays, and the next read takes only the specs still missing.
    Returns whether anything changed."""
    if not tasks:
        for page in scan_tasks(store, each=each, first=first):
            for doc in page:
                _take(tasks, doc)
        return True
    revisions = all_revisions(store, each=each, first=first)
    wanted = {tid for tid, (_, done) in revisions.items() if not done}
    gone = set(tasks) - wanted
    for task_id in gone:
        del tasks[task_id]
    changed = sorted(t for t in wanted if t not in tasks or tasks[t].revision != revisions[t][0])
    if not changed:
        return bool(gone)
    if len(changed) > max(SPEC_PAGE, len(wanted) // 4):
        pages = scan_tasks(store, each=each, first=first)
    else:
        pages = task_pages(store, changed, each=each)
    for page in pages:
        for doc in page:
            if doc["_id"] in wanted:  # one that came after the revisions were read: next pass
                _take(tasks, doc)
    return True


def _take(tasks: dict[str, TaskRecord], doc: dict[str, Any]) -> None:
    """Cache the task of ``doc``, or forget it: disabled, done, or not valid (logged)."""
    if not doc.get("enabled") or doc.get("done_at"):
        tasks.pop(doc["_id"], None)
        return
    known = tasks.get(doc["_id"])
    if known is not None and known.revision == doc["revision"]:
        return
    try:
        spec = parse_task(doc["spec"])
    except ValidationError as e:
        log.error("task %s is not valid and is not placed: %s", doc["_id"], e)
        tasks.pop(doc["_id"], None)
        return
    updated = doc.get("updated_at")
    tasks[doc["_id"]] = TaskRecord(
        doc["_id"],
        spec.group,
        spec.mode,
        doc["revision"],
        doc["spec"],
        updated.isoformat() if isinstance(updated, datetime) else None,
        spec.misfire_grace,
        dict(spec.requires),
    )


RETRY_AFTER = (1.0, 2.0, 4.0)  # seconds before a failed read is tried again, then every 4 s
FIRST_READ_AFTER = 2.0  # seconds a standby waits before its first read, unless asked sooner


class TaskFeed:
    """The center's task cache, read by a thread of its own (see the module's docstring).

    ``ask()`` asks for a read soon (a task changed, a leadership began); otherwise the feed
    reads every ``interval`` seconds, and sooner after a failed read. After each read that
    changed something it calls ``on_change`` (the leader's wake-up). :meth:`snapshot` is the
    latest read's tasks, a dict that is never changed afterwards."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float,
        on_change: Callable[[], None],
        budget: float,
    ) -> None:
        self.store = store
        self.interval = interval
        self.on_change = on_change
        self.budget = budget  # seconds for each call of a read (the first one more: its size)
        self.reads = 0  # reads that ended (for tests and benches)
        self.error: Exception | None = None  # of the last read, if it failed
        self._tasks: dict[str, TaskRecord] = {}  # the thread's own, brought in line in place
        self._snapshot: dict[str, TaskRecord] | None = None
        self._began = -1.0  # monotonic time the snapshot's read began
        self._failed_began = -1.0  # monotonic time the last failed read began
        self._done = threading.Condition()
        self._asked = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="task-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._asked.set()
        with self._done:
            self._done.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a daemon that only reads: not waited for long

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ask(self) -> None:
        """A read soon (now, unless one is under way: then right after it)."""
        self._asked.set()

    def snapshot(self, since: float = -1.0) -> dict[str, TaskRecord] | None:
        """The tasks of the latest read, if it began at or after ``since`` (monotonic)."""
        with self._done:
            return self._snapshot if self._snapshot is not None and self._began >= since else None

    def wait(self, since: float, timeout: float) -> dict[str, TaskRecord] | None:
        """:meth:`snapshot` of a read begun at or after ``since``, waiting up to ``timeout``;
        None at once when such a read failed (``error`` says why)."""
        deadline = time.monotonic() + timeout
        with self._done:
            while not self._stop.is_set():
                if self._snapshot is not None and self._began >= since:
                    return self._snapshot
                if self._failed_began >= since:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._done.wait(left)
        return None

    def read_once(self) -> bool:
        """One read now, on the caller's thread; whether it changed anything (raises what
        the store raised)."""
        began = time.monotonic()
        try:
            changed = refresh_tasks(
                self.store,
                self._tasks,
                each=lambda: pymongo.timeout(self.budget),
                first=lambda: pymongo.timeout(first_call_budget(self.store, self.budget)),
            )
        except Exception as e:
            with self._done:
                self.error = e
                self._failed_began = began
                self._done.notify_all()
            raise
        with self._done:
            if changed or self._snapshot is None:
                self._snapshot = dict(self._tasks)
            self._began = began
            self.reads += 1
            self.error = None
            self._done.notify_all()
        return changed

    def _loop(self) -> None:
        # the first read waits a moment unless asked: a center elected at once (the only one)
        # asks as it is elected, and a read begun before that would not do for its first pass
        self._asked.wait(FIRST_READ_AFTER)
        failures = 0
        while not self._stop.is_set():
            self._asked.clear()
            try:
                changed = self.read_once()
                failures = 0
            except (CloudTaskError, pymongo.errors.PyMongoError) as e:
                failures += 1
                log.warning("cannot read the tasks (the leader places the ones read last): %s", e)
                changed = False
            except Exception:  # a bug must not end the feed: the leader would never place
                failures += 1
                log.exception("reading the tasks failed")
                changed = False
            if changed:
                self.on_change()
            wait = RETRY_AFTER[min(failures, len(RETRY_AFTER)) - 1] if failures else self.interval
            self._asked.wait(wait)
