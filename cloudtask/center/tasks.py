"""The tasks the leading center places: the enabled, not-done tasks of MongoDB, cached.

The cache is a dict ``task id -> TaskRecord``, rebuilt from nothing by every new leader (and
after a stale view) and brought in line with MongoDB on every pass by :func:`refresh_tasks`:
one cheap read of every task's revision, and full specs only for the tasks that are new or
changed. A disabled or done task leaves the cache; so does one whose spec no longer parses
(it is not placed, and the error is logged). A record holds what an assignment carries to
the agents (see :func:`cloudtask.center.writer.assignment_data`) and what the leader's
housekeeping needs (the task's name and ``misfire_grace``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..exceptions import ValidationError
from ..store import Store, all_revisions, scan_tasks, task_pages
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
    brought in line before one stays, and the next pass reads only the specs still missing."""
    if not tasks:
        for page in scan_tasks(store, each=each, first=first):
            for doc in page:
                _take(tasks, doc)
        return
    revisions = all_revisions(store, each=each, first=first)
    wanted = {tid for tid, (_, done) in revisions.items() if not done}
    for task_id in set(tasks) - wanted:
        del tasks[task_id]
    changed = sorted(t for t in wanted if t not in tasks or tasks[t].revision != revisions[t][0])
    if len(changed) > max(SPEC_PAGE, len(wanted) // 4):
        pages = scan_tasks(store, each=each, first=first)
    else:
        pages = task_pages(store, changed, each=each)
    for page in pages:
        for doc in page:
            if doc["_id"] in wanted:  # one that came after the revisions were read: next pass
                _take(tasks, doc)


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
    )
