"""Calendars and blackout windows (the rules are :mod:`cloudtask.calendars`').

``calendars`` holds ``{_id: name, dates, weekdays, description, source, updated_at,
updated_by}``, ``blackouts`` ``{_id: name, group, timezone, days, dates, from, to, start, end,
description, updated_at, updated_by}``, and ``calendar_state`` one document ``{_id:
"version", n}`` whose ``n`` goes up after every change of either: an agent reads it every
poll interval and both collections only when it moved (the agent's
:class:`~cloudtask.agent.calendarfeed.CalendarFeed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReturnDocument

from ..calendars import CalendarBook, preview
from ..clock import stored_time, to_bson_time, utcnow
from ..exceptions import CloudTaskError, Conflict, NotFound
from .base import StoreBase, guard, read_all

log = logging.getLogger("cloudtask.store")

MAX_CALENDARS = 500
MAX_BLACKOUTS = 500
_FIELDS = ("updated_at", "updated_by")


def _out(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k not in ("_id", "version", *_FIELDS)}
    out["name"] = doc["_id"]
    out["updated_by"] = doc.get("updated_by")
    out["updated_at"] = stored_time(doc["updated_at"]) if doc.get("updated_at") else None
    return out


def schedule_calendar_names(schedule: Any) -> set[str]:
    """The calendars a stored schedule names (none when it cannot be read)."""
    items = schedule if isinstance(schedule, list) else [schedule]
    names: set[str] = set()
    for item in items:
        rule = item.get("calendar") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        for side in ("only", "skip"):
            value = rule.get(side)
            listed = [value] if isinstance(value, str) else value
            if isinstance(listed, list):
                names.update(n for n in listed if isinstance(n, str))
    return names


class CalendarRecords(StoreBase):
    """Calendars and blackouts."""

    @property
    def calendars(self) -> Any:
        return self.db["calendars"]

    @property
    def blackouts(self) -> Any:
        return self.db["blackouts"]

    def _bump_calendar_version(self) -> None:
        guard(
            self.db["calendar_state"].find_one_and_update,
            "note the calendar change",
            {"_id": "version"},
            {"$inc": {"n": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )

    def calendar_version(self) -> int:
        doc = guard(
            self.db["calendar_state"].find_one, "read the calendar version", {"_id": "version"}
        )
        return int(doc["n"]) if doc else 0

    # --- calendars -----------------------------------------------------------------------

    def put_calendar(self, doc: dict[str, Any], by: str, now: datetime | None = None) -> bool:
        """Store a canonical calendar (:func:`cloudtask.calendars.parse_calendar`); True when
        it is new."""
        name = doc["name"]
        exists = guard(self.calendars.find_one, "read the calendar", {"_id": name}, {"_id": 1})
        if (
            exists is None
            and guard(self.calendars.count_documents, "count calendars", {}) >= MAX_CALENDARS
        ):
            raise Conflict(f"at most {MAX_CALENDARS} calendars: delete one first")
        fields = {k: v for k, v in doc.items() if k != "name"}
        fields.update(updated_at=to_bson_time(now or utcnow()), updated_by=by)
        guard(
            self.calendars.replace_one,
            "store the calendar",
            {"_id": name},
            {"_id": name, **fields},
            upsert=True,
        )
        self._bump_calendar_version()
        return exists is None

    def get_calendar(self, name: str) -> dict[str, Any]:
        doc = guard(self.calendars.find_one, "read the calendar", {"_id": name})
        if doc is None:
            raise NotFound(f"no calendar named {name!r}")
        return _out(doc)

    def list_calendars(self, with_dates: bool = False) -> list[dict[str, Any]]:
        """Every calendar, by name, with its number of dates (``date_count``), and the dates
        themselves only ``with_dates``."""
        docs = read_all(self.calendars.find({}).sort("_id", ASCENDING), "list calendars")
        out = []
        for doc in docs:
            item = _out(doc)
            dates = item.pop("dates", None) or []
            item["date_count"] = len(dates)
            if with_dates:
                item["dates"] = dates
            out.append(item)
        return out

    def calendar_names(self, names: Iterable[str]) -> set[str]:
        """Which of ``names`` are stored calendars."""
        wanted = sorted(set(names))
        if not wanted:
            return set()
        docs = read_all(self.calendars.find({"_id": {"$in": wanted}}, {"_id": 1}), "read calendars")
        return {d["_id"] for d in docs}

    def delete_calendar(self, name: str) -> None:
        result = guard(self.calendars.delete_one, "delete the calendar", {"_id": name})
        if result.deleted_count == 0:
            raise NotFound(f"no calendar named {name!r}")
        self._bump_calendar_version()

    def tasks_using_calendar(self, name: str) -> list[dict[str, str]]:
        """The tasks whose schedule names calendar ``name``."""
        return self.calendar_users().get(name, [])

    def calendar_users(self) -> dict[str, list[dict[str, str]]]:
        """The tasks naming each calendar, by calendar name: the tasks whose schedule names
        one, or is a list (judged here: a query into the list's items is not answered the
        same by every server), each read once."""
        query = {
            "$or": [
                {"spec.schedule.calendar": {"$exists": True}},
                {"spec.schedule": {"$type": "array"}},
            ]
        }
        docs = read_all(
            self.tasks.find(query, {"name": 1, "spec.schedule": 1}), "find the calendars' tasks"
        )
        out: dict[str, list[dict[str, str]]] = {}
        for doc in docs:
            spec = doc.get("spec") or {}
            schedule = spec.get("schedule") if isinstance(spec, dict) else None
            if schedule is None:
                schedule = doc.get("spec.schedule")  # (a dotted projection, flat)
            for name in sorted(schedule_calendar_names(schedule)):
                out.setdefault(name, []).append({"id": doc["_id"], "name": doc.get("name", "")})
        return out

    # --- blackouts -----------------------------------------------------------------------

    def put_blackout(self, doc: dict[str, Any], by: str, now: datetime | None = None) -> bool:
        """Store a canonical blackout (:func:`cloudtask.calendars.parse_blackout`); True when
        it is new."""
        name = doc["name"]
        exists = guard(self.blackouts.find_one, "read the blackout", {"_id": name}, {"_id": 1})
        if (
            exists is None
            and guard(self.blackouts.count_documents, "count blackouts", {}) >= MAX_BLACKOUTS
        ):
            raise Conflict(f"at most {MAX_BLACKOUTS} blackouts: delete one first")
        fields = {k: v for k, v in doc.items() if k != "name" and v is not None}
        fields.update(updated_at=to_bson_time(now or utcnow()), updated_by=by)
        guard(
            self.blackouts.replace_one,
            "store the blackout",
            {"_id": name},
            {"_id": name, **fields},
            upsert=True,
        )
        self._bump_calendar_version()
        return exists is None

    def get_blackout(self, name: str) -> dict[str, Any]:
        doc = guard(self.blackouts.find_one, "read the blackout", {"_id": name})
        if doc is None:
            raise NotFound(f"no blackout named {name!r}")
        return _out(doc)

    def list_blackouts(self, group: str | None = None) -> list[dict[str, Any]]:
        """Every blackout by name (``group``: those of the group and of every group)."""
        query = {"group": {"$in": [group, "*"]}} if group is not None else {}
        docs = read_all(self.blackouts.find(query).sort("_id", ASCENDING), "list blackouts")
        return [_out(d) for d in docs]

    def delete_blackout(self, name: str) -> None:
        result = guard(self.blackouts.delete_one, "delete the blackout", {"_id": name})
        if result.deleted_count == 0:
            raise NotFound(f"no blackout named {name!r}")
        self._bump_calendar_version()

    # --- reads for the scheduler and the preview -----------------------------------------

    def calendar_feed_docs(self, group: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """What an agent of ``group`` keeps (JSON-ready): every calendar's dates and weekdays,
        and the blackouts of its group and of every group."""
        docs = read_all(
            self.calendars.find({}, {"dates": 1, "weekdays": 1}).sort("_id", ASCENDING),
            "read calendars",
        )
        calendars = [
            {"name": d["_id"], "dates": d.get("dates") or [], "weekdays": d.get("weekdays") or []}
            for d in docs
        ]
        blackouts = [
            {k: v for k, v in d.items() if k not in ("updated_at", "updated_by", "description")}
            for d in self.list_blackouts(group)
        ]
        return calendars, blackouts

    def calendar_book(
        self, names: Iterable[str] | None = None, group: str | None = None
    ) -> CalendarBook:
        """The calendars named (all with None) and the blackouts of ``group`` (all with None)."""
        wanted = None if names is None else sorted(set(names))
        if wanted == []:
            calendars: list[dict[str, Any]] = []
        else:
            query = {} if wanted is None else {"_id": {"$in": wanted}}
            calendars = read_all(self.calendars.find(query), "read calendars")
        blackouts = self.list_blackouts(group)
        return CalendarBook.from_docs([_out(d) for d in calendars], blackouts)


def preview_fires(
    store: Any, spec: Any, start: datetime, n: int
) -> list[tuple[datetime, str | None]]:
    """The next ``n`` fires of a task after ``start`` as its agent will see them: its
    calendar rule judged, and each with the blackout of its group that will record it
    ``skipped`` (None: it runs). Without MongoDB the calendars and blackouts are left out."""
    names = {
        n
        for i in spec.schedule.items
        if i.window.calendar is not None
        for n in i.window.calendar.names()
    }
    try:
        book = store.calendar_book(names, spec.group)
    except CloudTaskError as e:
        log.warning("fire preview without calendars and blackouts: %s", e)
        book = None
    return preview(spec.schedule, spec.group, start, n, book)
