"""Tasks: their specs and revisions (``tasks`` collection).

A task document carries its parsed spec (``spec``), a ``revision`` bumped by every change
(optimistic writes compare it), ``done_at`` (a one-shot task that ran), ``last_run`` (what
:mod:`cloudtask.store.history` copies of its latest finished run), and ``source``:
``"apply"`` when ``cloudtask apply`` made or changed it (kept through later edits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any

import pymongo
from pymongo import ReplaceOne
from pymongo.errors import DuplicateKeyError

from ..clock import to_bson_time, utcnow
from ..exceptions import Conflict, NotFound, Problem
from ..runmodel import (
    SCHEMA_VERSION,
    new_id,
)
from ..task import TaskSpec, parse_task
from .base import StoreBase, guard, read_all

log = logging.getLogger("cloudtask.store")


def _name_taken(name: str) -> Conflict:
    return Conflict(
        f"a task named {name!r} already exists",
        [Problem("name", f"a task named {name!r} already exists: choose another name")],
    )


class TaskRecords(StoreBase):
    """Tasks and their revisions."""

    @staticmethod
    def _task_document(
        spec: TaskSpec, task_id: str, revision: int, now: datetime
    ) -> dict[str, Any]:
        return {
            "_id": task_id,
            "version": SCHEMA_VERSION,
            "name": spec.name,
            "name_lc": spec.name.lower(),  # case-insensitive name search (a prefix range)
            "group": spec.group,
            "enabled": bool(spec.enabled),
            "spec": spec.to_dict(),
            "revision": revision,
            "updated_at": to_bson_time(now),
            "secrets_used": sorted(spec.secrets_used()),  # which tasks use a secret
        }

    def create_task(
        self, data: dict[str, Any] | TaskSpec, now: datetime | None = None
    ) -> dict[str, Any]:
        """Insert a task (a dict is parsed here: for tools and tests; the operations hand a
        parsed spec); ValidationError, or Conflict (name taken, the problem at ``name``)."""
        now = now or utcnow()
        spec = data if isinstance(data, TaskSpec) else parse_task(data, now=now)
        doc = self._task_document(spec, new_id(), 1, now)
        doc["created_at"] = doc["updated_at"]
        doc["done_at"] = None
        try:
            guard(self.tasks.insert_one, "store the task", doc)
        except DuplicateKeyError:
            raise _name_taken(spec.name) from None
        return doc

    def replace_task(
        self,
        task_id: str,
        data: dict[str, Any] | TaskSpec,
        now: datetime | None = None,
        expected_revision: int | None = None,
        current: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Replace a task's spec and bump its revision (optimistic when expected_revision is
        given). ``current``: the task as the caller just read it (no second read); the write
        applies only if it is still at that revision."""
        now = now or utcnow()
        spec = data if isinstance(data, TaskSpec) else parse_task(data, now=now)
        current = current if current is not None else self.get_task(task_id)
        if expected_revision is not None and current["revision"] != expected_revision:
            raise Conflict(
                f"task {current['name']!r} changed meanwhile (revision {current['revision']}, "
                f"you edited {expected_revision}); reload it and apply your change again"
            )
        for _ in range(5):
            doc = self._task_document(spec, task_id, current["revision"] + 1, now)
            doc["created_at"] = current.get("created_at")
            doc["done_at"] = None
            if current.get("source"):  # what made it (set_task_source) outlives an edit
                doc["source"] = current["source"]
            if "last_run" in current:
                doc["last_run"] = current["last_run"]
            last_id = (current.get("last_run") or {}).get("id")
            match = {
                "_id": task_id,
                "revision": current["revision"],
                # a run that finished since the read moved last_run (without a new revision):
                # its note is not overwritten by the copy read before it
                "last_run.id": last_id if last_id is not None else {"$in": [None]},
            }
            try:
                result = guard(self.tasks.replace_one, "update the task", match, doc)
            except DuplicateKeyError:
                raise _name_taken(spec.name) from None
            if result.matched_count:
                return doc
            fresh = self.find_task(task_id)
            if fresh is None:
                raise NotFound(f"no task with id {task_id!r}")
            if fresh["revision"] != current["revision"]:
                break
            current = fresh  # only its last run moved: write again over what is there now
        raise Conflict(f"task {current['name']!r} changed meanwhile; reload it and try again")

    def set_task_source(self, task_id: str, revision: int, source: str) -> bool:
        """Record what wrote a task (``apply``: cloudtask.taskdiff) on this revision of it;
        False when the task is at another revision by now (left unmarked)."""
        match = {"_id": task_id, "revision": revision}
        result = guard(self.tasks.update_one, "mark the task", match, {"$set": {"source": source}})
        return bool(result.matched_count)

    def get_task(self, task_id: str) -> dict[str, Any]:
        doc = guard(self.tasks.find_one, "read the task", {"_id": task_id})
        if doc is None:
            raise NotFound(f"no task with id {task_id!r}")
        return doc

    def find_task(self, task_id: str) -> dict[str, Any] | None:
        """The task with this id, or None."""
        return guard(self.tasks.find_one, "read the task", {"_id": task_id})

    def tasks_by_names(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """name -> ``{_id, name, enabled, group}`` of the tasks among ``names``."""
        if not names:
            return {}
        docs = read_all(
            self.tasks.find(
                {"name": {"$in": sorted(set(names))}}, {"name": 1, "enabled": 1, "group": 1}
            ),
            "read tasks by name",
        )
        return {d["name"]: d for d in docs}

    def after_graph(self) -> dict[str, tuple[str, ...]]:
        """name -> parent names, of every task whose schedule is ``after`` (fan-in)."""
        docs = read_all(
            self.tasks.find({"spec.schedule.after": {"$exists": True}}, {"name": 1, "spec": 1}),
            "read the tasks that run after others",
        )
        out = {}
        for doc in docs:
            schedule = (doc.get("spec") or {}).get("schedule")
            if isinstance(schedule, dict) and isinstance(schedule.get("after"), list):
                out[doc["name"]] = tuple(str(p) for p in schedule["after"])
        return out

    def children_of(self, name: str) -> list[dict[str, Any]]:
        """The tasks that run after ``name`` (id and name)."""
        return [
            {"id": doc_id, "name": child}
            for child, parents in self.after_graph().items()
            if name in parents
            for doc_id in [self.get_task_by_name(child)["_id"]]
        ]

    def get_task_by_name(self, name: str) -> dict[str, Any]:
        doc = guard(self.tasks.find_one, "read the task", {"name": name})
        if doc is None:
            raise NotFound(f"no task named {name!r}")
        return doc

    def list_tasks(
        self, groups: Iterable[str] | None = None, enabled: bool | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if groups is not None:
            query["group"] = {"$in": list(groups)}
        if enabled is not None:
            query["enabled"] = enabled
        return read_all(self.tasks.find(query), "list tasks")

    def get_tasks(self, task_ids: Iterable[str]) -> list[dict[str, Any]]:
        return read_all(self.tasks.find({"_id": {"$in": list(task_ids)}}), "read tasks")

    def task_revisions(self, groups: Iterable[str] | None = None) -> dict[str, tuple[int, bool]]:
        """task id -> (revision, done), in one call (see :func:`all_revisions` for a read in
        batches, each with its own deadline)."""
        return all_revisions(self, groups)

    def delete_task(self, task_id: str) -> None:
        result = guard(self.tasks.delete_one, "delete the task", {"_id": task_id})
        if result.deleted_count == 0:
            raise NotFound(f"no task with id {task_id!r}")

    def mark_tasks_done(self, done: Sequence[tuple[str, int]], now: datetime | None = None) -> int:
        """One-shot (`at`) tasks have run: record it so no agent schedules them again.

        ``done`` holds ``(task id, revision that ran)``; only that revision is marked, so an
        edit made meanwhile is not lost. One read and one write for all. Returns how many.
        """
        if not done:
            return 0
        when = to_bson_time(now or utcnow())
        ran = dict(done)
        docs = read_all(self.tasks.find({"_id": {"$in": list(ran)}}), "read tasks")
        ops = []
        for doc in docs:
            if doc["revision"] == ran[doc["_id"]] and not doc.get("done_at"):
                doc["done_at"] = when
                ops.append(ReplaceOne({"_id": doc["_id"], "revision": doc["revision"]}, doc))
        if not ops:
            return 0
        result = guard(self.tasks.bulk_write, "mark tasks done", ops, ordered=False)
        return result.modified_count


REVISION_PAGE = 10_000  # tasks per batch when every revision (or every task) is read
SPEC_PAGE = 2_000  # whole task documents per call when some are read by id
# what a reader of every task takes of each (its latest run, its names for search, are left)
SCAN_FIELDS = {"spec": 1, "revision": 1, "enabled": 1, "done_at": 1, "updated_at": 1}
FIRST_CALL_PER_TASK = 0.0002  # extra seconds the first call of a whole read may take per task


def first_call_budget(store: Any, budget: float) -> float:
    """The deadline for the first call of a read of every task: ``budget`` plus 0.2 ms a task.

    A store that materializes a query's whole result on its first call (nx-27017 does: any
    query there scans the collection, and sorting or ``$gt`` pages only multiply the scans)
    needs time in proportion to the collection for that call; MongoDB answers it with its
    first batch in milliseconds. The count is the collection's metadata, not a scan."""
    try:
        with pymongo.timeout(budget):
            count = store.tasks.estimated_document_count()
    except Exception:  # the read that follows says what is wrong with the store
        count = 0
    return budget + FIRST_CALL_PER_TASK * count


def _batches(
    cursor: Any,
    what: str,
    page: int,
    each: Callable[[], AbstractContextManager[Any]],
    first: Callable[[], AbstractContextManager[Any]] | None,
) -> Iterator[list[dict[str, Any]]]:
    """The documents of ``cursor``, ``page`` at a time, each batch fetched inside ``each()``
    (the first inside ``first()``): one query read in calls that each have a deadline."""
    scope = first or each
    while True:
        with scope():
            found = guard(cursor.to_list, what, page)
        scope = each
        if found:
            yield found
        if len(found) < page:
            return


def all_revisions(
    store: Any,
    groups: Iterable[str] | None = None,
    *,
    each: Callable[[], AbstractContextManager[Any]] = nullcontext,
    first: Callable[[], AbstractContextManager[Any]] | None = None,
    page: int = REVISION_PAGE,
) -> dict[str, tuple[int, bool]]:
    """Every task's (revision, done): one query, read ``page`` tasks a batch, each batch
    inside ``each()`` (a deadline per call, ``lambda: pymongo.timeout(5)``) and the first
    inside ``first()`` (see :func:`first_call_budget`), so a slow store reads 100,000 tasks
    in calls that each end in time. One query rather than pages by ``_id``: a store without a
    usable index (nx-27017) scans the whole collection for every query, so pages cost the
    square of the collection (20 s at 100,000 tasks, against 1.3–6 s for one query)."""
    query: dict[str, Any] = {} if groups is None else {"group": {"$in": list(groups)}}
    cursor = store.tasks.find(query, {"revision": 1, "done_at": 1}, batch_size=page)
    out: dict[str, tuple[int, bool]] = {}
    for found in _batches(cursor, "list tasks", page, each, first):
        out.update((d["_id"], (d["revision"], bool(d.get("done_at")))) for d in found)
    return out


def scan_tasks(
    store: Any,
    groups: Iterable[str] | None = None,
    *,
    each: Callable[[], AbstractContextManager[Any]] = nullcontext,
    first: Callable[[], AbstractContextManager[Any]] | None = None,
    page: int = REVISION_PAGE,
) -> Iterator[list[dict[str, Any]]]:
    """Every task document (of ``groups``; the fields of ``SCAN_FIELDS``), ``page`` a batch, as :func:`all_revisions` reads
    revisions: for a reader that holds none of them yet, one pass instead of every revision
    and then every document by id. The caller keeps what it took from a batch even when a
    later one fails."""
    query: dict[str, Any] = {} if groups is None else {"group": {"$in": list(groups)}}
    cursor = store.tasks.find(query, SCAN_FIELDS, batch_size=page)
    yield from _batches(cursor, "read tasks", page, each, first)


def task_pages(
    store: Any,
    task_ids: Sequence[str],
    *,
    each: Callable[[], AbstractContextManager[Any]] = nullcontext,
    page: int = SPEC_PAGE,
) -> Iterator[list[dict[str, Any]]]:
    """The documents of these tasks, ``page`` a call, each call inside ``each()``; the caller
    keeps what it took from a page even when a later one fails."""
    for i in range(0, len(task_ids), page):
        with each():
            found = store.get_tasks(task_ids[i : i + page])
        yield found
