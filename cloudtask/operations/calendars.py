"""Calendars and blackout windows: set (create or replace), import a calendar from an
iCalendar file, delete (a calendar only while no task names it); each audited.

Agents see a change within their poll interval (they read the calendars' change counter,
cloudtask/store/calendars.py); nothing is signalled.
"""

from __future__ import annotations

from typing import Any

from ..calendars import IcsError, ics_dates, parse_blackout, parse_calendar
from ..clock import utcnow
from ..exceptions import Conflict, NotFound, Problem, ValidationError
from ..schedules import timezone_problem
from ..store.calendars import schedule_calendar_names
from ..task import TaskSpec
from .base import OperationsBase


def _calendar_summary(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the audit log keeps of a calendar: its weekdays, how many dates, the first and
    the last (a holiday file's hundreds of dates would fill the page)."""
    if doc is None:
        return None
    dates = doc.get("dates") or []
    out: dict[str, Any] = {"weekdays": doc.get("weekdays") or [], "dates": len(dates)}
    if dates:
        out.update(first=dates[0], last=dates[-1])
    for key in ("source", "description"):
        if doc.get(key):
            out[key] = doc[key]
    return out


def calendar_problems(store: Any, spec: TaskSpec, old: dict[str, Any]) -> list[Problem]:
    """A problem for each calendar a task's new or changed schedule names that is not
    stored."""
    names = {
        n
        for i in spec.schedule.items
        if i.window.calendar is not None
        for n in i.window.calendar.names()
    }
    names -= schedule_calendar_names(old.get("schedule"))
    if not names:
        return []
    missing = sorted(names - store.calendar_names(names))
    return [
        Problem(
            "schedule.calendar",
            f"no calendar named {name!r} (cloudtask calendar set NAME, or PUT /api/v1/calendars/NAME)",
        )
        for name in missing
    ]


class CalendarOperations(OperationsBase):
    # --- calendars -----------------------------------------------------------------------

    def set_calendar(self, actor: str, name: str, body: Any) -> tuple[dict[str, Any], bool]:
        """Create or replace calendar ``name`` from ``{"dates", "weekdays", "description"}``
        (ValidationError with every problem). Returns the calendar and whether it is new."""
        doc, problems = parse_calendar(name, body)
        if doc is None:
            raise ValidationError(problems, source="the calendar")
        try:
            before = self.store.get_calendar(name)
        except NotFound:
            before = None
        created = self.store.put_calendar(doc, by=actor)
        self.audit(
            actor,
            "calendar.set",
            f"calendar:{name}",
            _calendar_summary(before),
            _calendar_summary(doc),
        )
        return self.store.get_calendar(name), created

    def import_calendar(
        self,
        actor: str,
        name: str,
        data: bytes,
        *,
        filename: str = "",
        timezone: str = "UTC",
        weekdays: list[str] | None = None,
        description: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Create or replace calendar ``name`` with the dates of an iCalendar file (from a
        year ago to three years ahead: see cloudtask.calendars.ics_dates), plus ``weekdays``.
        A file that cannot be read is refused with where and what (ValidationError)."""
        if (message := timezone_problem(timezone)) is not None:
            raise ValidationError([Problem("timezone", message)], source="the import")
        try:
            dates = ics_dates(data, utcnow().date(), timezone)
        except IcsError as e:
            where = f"the iCalendar file {filename}".rstrip()
            raise ValidationError(e.problems, source=where) from None
        body: dict[str, Any] = {"dates": [d.isoformat() for d in dates], "weekdays": weekdays or []}
        body["source"] = f"ics:{filename[-200:]}" if filename else "ics"
        if description is not None:
            body["description"] = description
        return self.set_calendar(actor, name, body)

    def delete_calendar(self, actor: str, name: str) -> None:
        """Delete a calendar; refused (Conflict) while a task names it."""
        users = self.store.tasks_using_calendar(name)
        if users:
            shown = ", ".join(u["name"] for u in users[:5]) + (" ..." if len(users) > 5 else "")
            raise Conflict(f"calendar {name!r} is named by {len(users)} task(s): {shown}")
        before = self.store.get_calendar(name)
        self.store.delete_calendar(name)
        self.audit(actor, "calendar.delete", f"calendar:{name}", _calendar_summary(before), None)

    # --- blackouts -----------------------------------------------------------------------

    def set_blackout(self, actor: str, name: str, body: Any) -> tuple[dict[str, Any], bool]:
        """Create or replace blackout ``name`` (ValidationError with every problem)."""
        doc, problems = parse_blackout(name, body)
        if doc is None:
            raise ValidationError(problems, source="the blackout")
        try:
            before: dict[str, Any] | None = self.store.get_blackout(name)
        except NotFound:
            before = None
        created = self.store.put_blackout(doc, by=actor)
        after = self.store.get_blackout(name)
        self.audit(
            actor,
            "blackout.set",
            f"blackout:{name}",
            _blackout_audit(before),
            _blackout_audit(after),
        )
        return after, created

    def delete_blackout(self, actor: str, name: str) -> None:
        before = self.store.get_blackout(name)
        self.store.delete_blackout(name)
        self.audit(actor, "blackout.delete", f"blackout:{name}", _blackout_audit(before), None)


def _blackout_audit(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    return {k: v for k, v in doc.items() if k not in ("name", "updated_at", "updated_by")}
