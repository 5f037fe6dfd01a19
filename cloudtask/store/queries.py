"""The reads of the pages and the API: lists with filters and pages, counts, and the small
look-ups that go with them (a task's name, a run's status).

Filters arrive checked (``web.queries`` turns request arguments into them). Every query here is
shaped for the embedded wire server (nx-27017) as much as for MongoDB: counts are one
aggregation (``$match`` then ``$count``, one SQL query there, where ``count_documents`` reads
every document); equalities on strings are written so an index serves them (see
:func:`~cloudtask.store.base.indexed` and :func:`same`); runs and events are ranged and sorted
by their numeric ``ts``; one equality query per value rather than an ``$in``, which that
server answers with no index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING

from .. import events
from ..clock import utcnow
from ..runmodel import GOING_STATUSES
from .base import StoreBase, guard, read_all

COUNT_CAP = 100_000  # counts above this show as "100000+"
DAY_SECONDS = 86_400

# what a task list shows per task (never the whole output or env of many tasks)
TASK_LIST_FIELDS = {
    "name": 1,
    "group": 1,
    "enabled": 1,
    "done_at": 1,
    "revision": 1,
    "updated_at": 1,
    "last_run": 1,
    "spec.schedule": 1,
    "spec.owner": 1,
    "spec.description": 1,
}
RUN_LIST_FIELDS = {"output_tail": 0, "token_hash": 0, "item": 0}  # (a plan item's spec)


@dataclass
class Page:
    items: list[dict[str, Any]]
    page: int
    per_page: int
    total: int  # capped at COUNT_CAP
    capped: bool
    filters: dict[str, Any] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def has_next(self) -> bool:
        return self.page * self.per_page < self.total


def same(value: str) -> dict[str, str]:
    """Equality on a string field, written as a range with both ends on the value: the
    MongoDB wire server used on one machine turns ``{field: value}`` into a test that also
    looks inside arrays, which no index serves; this range is the same test on a string and
    uses the (actor, at) and (target, at) indexes in both servers."""
    return {"$gte": value, "$lte": value}


def ts_span(filters: dict[str, Any]) -> dict[str, float]:
    """The ``since``/``until`` filters as a range of a numeric ``ts`` (epoch seconds), or {}.
    A range from ``since`` gets an upper bound too (nothing is recorded a day ahead): with both
    bounds the wire server used on one machine ranges over the ts index instead of scanning
    another."""
    span: dict[str, float] = {}
    if filters.get("since"):
        span["$gte"] = filters["since"].timestamp()
    if filters.get("until"):
        span["$lt"] = filters["until"].timestamp()
    elif span:
        span["$lt"] = utcnow().timestamp() + DAY_SECONDS
    return span


def audit_id_at(moment: datetime) -> str:
    """The smallest audit entry id made in ``moment``'s second or later. Entry ids are
    ObjectIds as 24 hex digits (``Store.add_audit``) whose first 8 are the second they were
    made in, so they compare as strings in time order."""
    seconds = min(max(int(moment.timestamp()), 0), 0xFFFFFFFF)
    return f"{seconds:08x}" + "0" * 16


class PageQueries(StoreBase):
    """What the pages and the API list and count."""

    def count(self, collection: str, query: dict[str, Any]) -> int:
        """How many documents of ``collection`` match, counted by the server in one
        aggregation. Queries given here compare numbers and strings only."""
        pipeline = [{"$match": query}, {"$count": "n"}]
        result = guard(lambda: list(self.db[collection].aggregate(pipeline)), "count")
        return int(result[0]["n"]) if result else 0

    def _capped_count(self, collection: str, query: dict[str, Any]) -> tuple[int, bool]:
        n = self.count(collection, query)
        return min(n, COUNT_CAP), n > COUNT_CAP

    def _grouped(self, collection: str, pipeline: list[dict[str, Any]]) -> dict[Any, int]:
        """``{_id: n}`` of a ``$group`` pipeline whose accumulator is ``n``."""
        rows = guard(lambda: list(self.db[collection].aggregate(pipeline)), "count")
        return {row["_id"]: int(row["n"]) for row in rows}

    # --- the lists --------------------------------------------------------------------------

    def task_page(self, filters: dict[str, Any], owners: dict[str, str] | None = None) -> Page:
        """Tasks sorted by name. ``q`` matches the start of the name (case-insensitive; an
        indexed range, fast at any number of tasks), ``owner`` the task's owner (a person or
        team, ``spec.owner``), ``state`` enabled, paused or done, ``last`` the last result (or
        ``never``). ``owners`` (task id -> agent) adds ``owner_agent`` to each listed task."""
        query: dict[str, Any] = {}
        if filters.get("q"):
            prefix = filters["q"].lower()
            query["name_lc"] = {"$gte": prefix, "$lt": prefix + "\U0010ffff"}
        if filters.get("group"):
            query["group"] = filters["group"]
        state = filters.get("state")
        if state == "enabled":
            query["enabled"] = True
            query["done_at"] = {"$in": [None]}
        elif state == "paused":
            query["enabled"] = False
        elif state == "done":
            query["done_at"] = {"$nin": [None]}
        if filters.get("owner"):
            query["spec.owner"] = filters["owner"]
        last = filters.get("last")
        if last == "never":
            query["last_run"] = {"$in": [None]}
        elif last:
            query["last_run.status"] = last
        page, per_page = filters.get("page", 1), filters.get("per_page", 50)
        cursor = (
            self.tasks.find(query, TASK_LIST_FIELDS)
            .sort("name", ASCENDING)
            .skip((page - 1) * per_page)
            .limit(per_page)
        )
        items = read_all(cursor, "list tasks")
        total, capped = self._capped_count("tasks", query)
        for item in items:
            item["owner_agent"] = (owners or {}).get(item["_id"])
        return Page(items, page, per_page, total, capped, filters)

    def run_page(self, filters: dict[str, Any]) -> Page:
        """Runs, newest scheduled first, without their output: by ``task`` (id), ``status``,
        ``agent``, ``since`` and ``until``."""
        query: dict[str, Any] = {}
        if filters.get("task"):
            query["task_id"] = filters["task"]
        if filters.get("status"):
            query["status"] = filters["status"]
        if filters.get("agent"):
            query["agent"] = filters["agent"]
        span = ts_span(filters)
        if span:
            query["ts"] = span  # scheduled_for in epoch seconds
        page, per_page = filters.get("page", 1), filters.get("per_page", 50)
        # ts is scheduled_for in epoch seconds, so the order is the same; sorting on the ranged
        # field lets the wire server used on one machine answer from one index (117 ms -> 7 ms)
        cursor = (
            self.runs.find(query, RUN_LIST_FIELDS)
            .sort("ts" if span else "scheduled_for", DESCENDING)
            .skip((page - 1) * per_page)
            .limit(per_page)
        )
        items = read_all(cursor, "list runs")
        total, capped = self._capped_count("runs", query)
        return Page(items, page, per_page, total, capped, filters)

    def event_page(self, filters: dict[str, Any]) -> Page:
        """Events, newest first, ranged and sorted by their numeric ``ts``: by ``kind`` (or a
        prefix such as ``run.``), ``severity``, ``task`` (id), ``agent``, ``group``."""
        query: dict[str, Any] = {}
        kind = filters.get("kind")
        if kind and kind.endswith("."):
            query["kind"] = {"$in": [k for k in events.KINDS if k.startswith(kind)]}
        elif kind:
            query["kind"] = kind
        for name, field_name in (
            ("severity", "severity"),
            ("task", "task_id"),
            ("agent", "agent"),
            ("group", "group"),
        ):
            if filters.get(name):
                query[field_name] = filters[name]
        span = ts_span(filters)
        if span:
            query["ts"] = span
        page, per_page = filters.get("page", 1), filters.get("per_page", 50)
        cursor = (
            self.events.find(query)
            .sort("ts", DESCENDING)
            .skip((page - 1) * per_page)
            .limit(per_page)
        )
        items = read_all(cursor, "list events")
        total, capped = self._capped_count("events", query)
        return Page(items, page, per_page, total, capped, filters)

    def audit_page(self, filters: dict[str, Any], per_page_default: int) -> Page:
        """One page of audit entries, newest first: by ``actor``, ``action`` (a prefix),
        ``target``, ``since`` and ``until``.

        The time range is applied through the entries' ids, not their ``at``: the wire server
        used on one machine neither compares dates inside an aggregation (its counts come out
        wrong) nor serves a date range from an index (it reads and sorts every match), while
        ids compare as strings everywhere. So the entries in range are counted by id, and the
        page is read from the entries that match the other filters, newest first by ``at``
        (indexed), after skipping those newer than ``until`` (counted by id too)."""
        query: dict[str, Any] = {}
        if filters.get("actor"):
            query["actor"] = same(filters["actor"])
        if filters.get("action"):
            prefix = filters["action"]
            query["action"] = {"$gte": prefix, "$lt": prefix + "\U0010ffff"}
        if filters.get("target"):
            query["target"] = same(filters["target"])
        ids: dict[str, str] = {}
        if filters.get("since"):
            ids["$gte"] = audit_id_at(filters["since"])
        if filters.get("until"):
            ids["$lt"] = audit_id_at(filters["until"])
        total = self.count("audit", {**query, "_id": ids} if ids else query)
        newer = self.count("audit", {**query, "_id": {"$gte": ids["$lt"]}}) if "$lt" in ids else 0
        page, per_page = filters.get("page", 1), filters.get("per_page", per_page_default)
        offset = (page - 1) * per_page
        wanted = min(per_page, total - offset)
        items: list[dict[str, Any]] = []
        if wanted > 0:
            cursor = (
                self.audit.find(query).sort("at", DESCENDING).skip(newer + offset).limit(wanted)
            )
            items = read_all(cursor, "list the audit log")
        return Page(items, page, per_page, total, capped=False, filters=filters)

    # --- the overview -----------------------------------------------------------------------

    def task_flag_counts(self) -> tuple[int, int, dict[Any, int]]:
        """How many tasks are stored enabled, how many paused, and the done tasks by their
        stored ``enabled`` (a done task keeps enabled true; true, or 1 after a ``$set``)."""
        by_flag = {}
        for flag in (True, False):
            # group_enabled is (group, enabled): grouping by group lets the server read only it
            counts = self._grouped(
                "tasks",
                [{"$match": {"enabled": flag}}, {"$group": {"_id": "$group", "n": {"$sum": 1}}}],
            )
            by_flag[flag] = sum(counts.values())
        done = self._grouped(  # no index: one scan
            "tasks",
            [
                {"$match": {"done_at": {"$nin": [None]}}},
                {"$group": {"_id": "$enabled", "n": {"$sum": 1}}},
            ],
        )
        return by_flag[True], by_flag[False], done

    def run_status_counts(self, since: float, until: float) -> dict[Any, int]:
        """Runs scheduled from ``since`` to ``until`` (epoch seconds), by status."""
        window = {"ts": {"$gte": since, "$lt": until}}
        return self._grouped(
            "runs", [{"$match": window}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        )

    def tasks_last_ended(
        self, statuses: Sequence[str], limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Tasks whose last run ended in one of ``statuses``, latest first (at most ``limit``),
        and how many there are."""
        fields = {"name": 1, "group": 1, "enabled": 1, "done_at": 1, "last_run": 1}
        found: list[dict[str, Any]] = []
        total = 0
        for status in statuses:  # equality reads use the index; an $in does not
            query = {"last_run.status": status}
            cursor = self.tasks.find(query, fields).sort("last_run.finished", DESCENDING)
            rows = read_all(cursor.limit(limit), "list failing tasks")
            found += rows
            total += len(rows) if len(rows) < limit else self.count("tasks", query)
        found.sort(key=lambda t: -float((t.get("last_run") or {}).get("finished") or 0))
        return found[:limit], total

    def recent_runs(self, limit: int) -> list[dict[str, Any]]:
        cursor = self.runs.find({}, RUN_LIST_FIELDS).sort("scheduled_for", DESCENDING)
        return read_all(cursor.limit(limit), "list recent runs")

    def recent_events(self, severities: Iterable[str], limit: int) -> list[dict[str, Any]]:
        """The newest events of these severities, by their numeric ts (one equality query per
        severity: the wire server serves it from the (severity, ts) index, an $in from none)."""
        found = [
            e
            for severity in severities
            for e in read_all(
                self.events.find({"severity": severity}).sort("ts", DESCENDING).limit(limit),
                "list recent events",
            )
        ]
        found.sort(key=lambda e: e.get("ts") or 0, reverse=True)
        return found[:limit]

    def enabled_tasks_by_group(self) -> dict[str, int]:
        """Enabled tasks per group that still fire (done one-shot tasks left out, as the task
        list's ``state=enabled`` filter does), in one aggregation."""
        match = {"enabled": True, "done_at": {"$in": [None]}}
        rows = self._grouped(
            "tasks", [{"$match": match}, {"$group": {"_id": "$group", "n": {"$sum": 1}}}]
        )
        return {str(group): n for group, n in rows.items() if group is not None}

    # --- look-ups ---------------------------------------------------------------------------

    def task_fields(self, task_id: Any, fields: dict[str, int]) -> dict[str, Any] | None:
        """These fields of the task with this id, or None."""
        return guard(self.tasks.find_one, "read the task", {"_id": task_id}, fields)

    def task_fields_by_name(self, name: str, fields: dict[str, int]) -> dict[str, Any] | None:
        return guard(self.tasks.find_one, "read the task", {"name": name}, fields)

    def task_names(self, task_ids: Iterable[str]) -> dict[str, str]:
        """task id -> name, for those of ``task_ids`` that exist."""
        cursor = self.tasks.find({"_id": {"$in": sorted(set(task_ids))}}, {"name": 1})
        return {d["_id"]: d.get("name") for d in read_all(cursor, "read task names")}

    def task_ids_by_name(self, names: Iterable[str]) -> dict[str, str]:
        """name -> task id, for those of ``names`` that exist."""
        cursor = self.tasks.find({"name": {"$in": sorted(set(names))}}, {"name": 1})
        return {d["name"]: d["_id"] for d in read_all(cursor, "read task ids")}

    def run_fields(self, run_id: str, fields: dict[str, int]) -> dict[str, Any] | None:
        """These fields of the run with this id, or None."""
        return guard(self.runs.find_one, "read the run", {"_id": run_id}, fields)

    def task_has_runs(self, task_id: str) -> bool:
        found = guard(self.runs.find_one, "read runs", {"task_id": task_id}, {"_id": 1})
        return found is not None

    def task_runs(
        self,
        task_id: str,
        fields: dict[str, int],
        limit: int,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """A task's runs, newest scheduled first (scheduled from ``since`` to ``until``)."""
        query: dict[str, Any] = {"task_id": task_id}
        span = {}
        if since:
            span["$gte"] = since
        if until:
            span["$lt"] = until
        if span:
            query["scheduled_for"] = span
        cursor = self.runs.find(query, fields).sort("scheduled_for", DESCENDING).limit(limit)
        return read_all(cursor, "list the task's runs")

    def unfinished_run_count(self, task_id: str, cap: int = 1000) -> int:
        """How many of the task's runs are queued or running (counted up to ``cap``)."""
        query = {"task_id": task_id, "status": {"$in": list(GOING_STATUSES)}}
        return guard(self.runs.count_documents, "count runs", query, limit=cap)

    def task_values(self, key: str) -> list[str]:
        """The distinct string values of a task field (an indexed read), sorted."""
        values = guard(self.tasks.distinct, "read the tasks' values", key)
        return sorted(v for v in values if isinstance(v, str))

    def agent_ids(self, limit: int) -> list[str]:
        """The ids of the recorded agents, sorted (at most ``limit``)."""
        cursor = self.agents.find({}, {"_id": 1}).limit(limit)
        return sorted(a["_id"] for a in read_all(cursor, "list agents"))
