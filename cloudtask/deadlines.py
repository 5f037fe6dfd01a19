"""Deadlines: a local time of day by which a task must have succeeded (``"06:00"``).

A task's ``deadline`` is written ``"HH:MM"``, optionally followed by the days of the week it
applies on (``"06:00 mon-fri"``, ``"07:30 sat,sun"``); or as an object that can also name its
own time zone: ``{"at": "06:00", "days": "mon-fri", "timezone": "Europe/Berlin"}``. Without a
time zone the deadline is read in the task's: the ``timezone`` of its first schedule that has
one, else UTC (:func:`task_timezone`).

**The day of a deadline.** The deadline of local date D closes a window that opened at the
same local time on D-1: the 24 hours ending at the deadline (23 or 25 hours when the clocks
change in between). The task has met the deadline of D when a run of it that *fired* in that
window (``scheduled_for`` at or after the window's opening) ended ``succeeded`` by the
deadline. A deadline on a local time the clocks skip (02:30 on the spring-forward night in
Europe/Berlin) falls on the first instant after the jump (03:00 summer time); one on a local
time that happens twice (the fall-back night) on its first occurrence.

Pure: nothing here reads the clock or does I/O.

>>> d = parse_deadline("06:00 mon-fri")
>>> d.to_value(), sorted(d.days)
('06:00 mon-fri', [0, 1, 2, 3, 4])
>>> from datetime import datetime, timezone
>>> w = last_window(d, "Europe/Berlin", datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc))
>>> str(w.day), w.opens.isoformat(), w.closes.isoformat()
('2026-12-04', '2026-12-03T05:00:00+00:00', '2026-12-04T05:00:00+00:00')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from .schedules import show_value, timezone_problem

UTC = timezone.utc
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EVERY_DAY = frozenset(range(7))
DEADLINE_KEYS = ("at", "days", "timezone")
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")
_DAY_PART = re.compile(r"([a-z]{3})(?:-([a-z]{3}))?")
EXAMPLE = '\'06:00\', \'06:00 mon-fri\' or {"at": "06:00", "timezone": "Europe/Berlin"}'


@dataclass(frozen=True)
class DeadlineSpec:
    """A validated deadline: ``at`` (local wall time), the weekdays it applies on (0 is
    Monday) and its own time zone, if it names one (None: the task's)."""

    at: time
    days: frozenset[int] = EVERY_DAY
    timezone: str | None = None

    def days_text(self) -> str:
        """``""`` for every day, else the days in week order: ``mon-fri``, ``mon,wed,fri``."""
        if self.days == EVERY_DAY:
            return ""
        runs: list[list[int]] = []
        for d in sorted(self.days):
            if runs and runs[-1][-1] == d - 1:
                runs[-1].append(d)
            else:
                runs.append([d])
        parts = []
        for run in runs:
            if len(run) >= 3:
                parts.append(f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}")
            else:
                parts += [DAY_NAMES[d] for d in run]
        return ",".join(parts)

    def to_value(self) -> str | dict[str, str]:
        """The canonical form: ``"06:00"`` or ``"06:00 mon,tue"``; an object when it names its
        own time zone."""
        clock = self.at.strftime("%H:%M")
        days = self.days_text()
        if self.timezone is None:
            return f"{clock} {days}".strip()
        out = {"at": clock, "timezone": self.timezone}
        if days:
            out["days"] = days
        return out

    def describe(self, task_zone: str) -> str:
        """``06:00 Europe/Berlin, mon-fri`` for a page or a mail."""
        days = self.days_text()
        return f"{self.at.strftime('%H:%M')} {self.timezone or task_zone}" + (
            f", {days}" if days else ""
        )


@dataclass(frozen=True)
class DayWindow:
    """One day of a deadline: its local date, the window's opening and the deadline itself
    (aware UTC)."""

    day: date
    opens: datetime
    closes: datetime


def _parse_clock(value: object) -> tuple[time | None, str | None]:
    if not isinstance(value, str) or not _CLOCK.fullmatch(value.strip()):
        return None, f"expected a time of day as HH:MM (00:00 to 23:59), got {show_value(value)}"
    hours, minutes = value.strip().split(":")
    return time(int(hours), int(minutes)), None


def parse_days(value: object) -> tuple[frozenset[int] | None, str | None]:
    """Weekdays from ``"mon-fri"``, ``"mon,wed,fri"``, ``"fri-mon"`` (a range may wrap) or a
    list of such parts; (None, why) when they cannot be read."""
    parts: list[Any]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip().lower()) if p]
    elif isinstance(value, list):
        parts = value
    else:
        return None, f"expected days such as 'mon-fri' or 'sat,sun', got {show_value(value)}"
    days: set[int] = set()
    for part in parts:
        text = part.strip().lower() if isinstance(part, str) else None
        match = _DAY_PART.fullmatch(text) if text else None
        names = [g for g in match.groups() if g] if match else []
        if not match or any(n not in DAY_NAMES for n in names):
            return None, (
                f"{show_value(part)} is not a day: use mon, tue, wed, thu, fri, sat, sun "
                "or a range such as mon-fri"
            )
        first = DAY_NAMES.index(names[0])
        last = DAY_NAMES.index(names[-1])
        span = (last - first) % 7
        days.update((first + i) % 7 for i in range(span + 1))
    if not days:
        return None, "name at least one day, such as 'mon-fri'"
    return frozenset(days), None


def deadline_problems(value: object) -> tuple[DeadlineSpec | None, list[tuple[str, str]]]:
    """A deadline from its JSON form, or the problems as (sub-path, message) pairs; the
    sub-path is "" for the deadline itself, else ``at``, ``days`` or ``timezone``."""
    problems: list[tuple[str, str]] = []
    if isinstance(value, str):
        head, _, rest = value.strip().partition(" ")
        at, why = _parse_clock(head)
        if why:
            return None, [("", f"{why}; write {EXAMPLE}")]
        days: frozenset[int] | None = EVERY_DAY
        if rest.strip():
            days, why = parse_days(rest)
            if why:
                problems.append(("", why))
        if problems or at is None or days is None:
            return None, problems
        return DeadlineSpec(at, days), []
    if not isinstance(value, dict):
        return None, [("", f"expected {EXAMPLE}, got {show_value(value)}")]
    for key in value:
        if key not in DEADLINE_KEYS:
            problems.append((str(key), f"unknown key; expected one of {', '.join(DEADLINE_KEYS)}"))
    at = None
    if "at" not in value:
        problems.append(("at", "required: the time of day, HH:MM"))
    else:
        at, why = _parse_clock(value["at"])
        if why:
            problems.append(("at", why))
    days = EVERY_DAY
    if value.get("days") is not None:
        days, why = parse_days(value["days"])
        if why:
            problems.append(("days", why))
    zone = value.get("timezone")
    if zone is not None and (why := timezone_problem(zone)):
        problems.append(("timezone", why))
    if problems or at is None or days is None:
        return None, problems
    return DeadlineSpec(at, days, zone), []


def parse_deadline(value: object) -> DeadlineSpec:
    """:func:`deadline_problems` for a value known to be valid (a stored, canonical spec);
    ValueError otherwise."""
    spec, problems = deadline_problems(value)
    if spec is None:
        raise ValueError("; ".join(f"{p}: {m}" if p else m for p, m in problems))
    return spec


def task_timezone(schedule: Any) -> str:
    """The time zone of a task: its first schedule's that names one (a spec's ``schedule``,
    one object or a list), else UTC."""
    items = schedule if isinstance(schedule, list) else [schedule]
    for item in items:
        zone = item.get("timezone") if isinstance(item, dict) else None
        if isinstance(zone, str) and timezone_problem(zone) is None:
            return zone
    return "UTC"


def local_instant(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The instant (UTC) that local date ``day`` shows ``at`` in ``zone``: for a time the
    clocks skip, the first instant after the jump; for one shown twice, the first."""
    wall = datetime.combine(day, at)
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # it exists (fold=0 is its first occurrence when it repeats)
    # skipped: the instants around the gap; the jump is where the offset changes
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)  # read with the later offset
    lo, hi = min(first, before), max(first, before)
    target = hi.astimezone(zone).utcoffset()
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).utcoffset() == target:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0) if hi.microsecond else hi


def day_window(spec: DeadlineSpec, zone_name: str, day: date) -> DayWindow:
    """The window the deadline of local date ``day`` closes: from the same local time on the
    day before (whatever the weekdays) to the deadline."""
    zone = ZoneInfo(spec.timezone or zone_name)
    closes = local_instant(day, spec.at, zone)
    opens = local_instant(day - timedelta(days=1), spec.at, zone)
    return DayWindow(day, opens, closes)


def last_window(spec: DeadlineSpec, zone_name: str, now: datetime) -> DayWindow | None:
    """The window of the latest deadline at or before ``now`` on one of its days (None only
    when none fell in the past 8 days, which cannot happen with at least one day)."""
    zone = ZoneInfo(spec.timezone or zone_name)
    today = now.astimezone(zone).date()
    for back in range(9):
        day = today - timedelta(days=back)
        if day.weekday() not in spec.days:
            continue
        window = day_window(spec, zone_name, day)
        if window.closes <= now:
            return window
    return None


def next_deadline(spec: DeadlineSpec, zone_name: str, now: datetime) -> datetime | None:
    """The first deadline after ``now`` (aware UTC), for the task's page."""
    zone = ZoneInfo(spec.timezone or zone_name)
    today = now.astimezone(zone).date()
    for ahead in range(9):
        day = today + timedelta(days=ahead)
        if day.weekday() in spec.days:
            closes = local_instant(day, spec.at, zone)
            if closes > now:
                return closes
    return None
