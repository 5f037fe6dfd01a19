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
from ..store import Store, all_revisions, task_pages
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
) -> None:
    """Bring ``tasks`` in line with MongoDB, in place, reading full specs only for changes.
    Read in pages, each call inside ``each()`` (its deadline): 100,000 tasks on a slow store
    are read in calls that each end in time. Store errors are the caller's (what was brought
    in line before one stays: the next pass reads only the specs still missing)."""
    revisions = all_revisions(store, each=each)
    wanted = {tid for tid, (_, done) in revisions.items() if not done}
    for task_id in set(tasks) - wanted:
        del tasks[task_id]
    changed = sorted(t for t in wanted if t not in tasks or tasks[t].revision != revisions[t][0])
    for doc in (doc for page in task_pages(store, changed, each=each) for doc in page):
        if not doc.get("enabled") or doc.get("done_at"):
            tasks.pop(doc["_id"], None)
            continue
        try:
            spec = parse_task(doc["spec"])
        except ValidationError as e:
            log.error("task %s is not valid and is not placed: %s", doc["_id"], e)
            tasks.pop(doc["_id"], None)
            continue
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
