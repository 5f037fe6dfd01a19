"""Schedules: when a task fires (``cron``, ``every``, ``at``, ``keepalive``) and their parsing.

Pure logic: nothing here does I/O or reads the clock; the current time is always an argument.
Every datetime in and out is timezone-aware UTC.

Cron expressions are evaluated on naive local wall-clock times in the schedule's timezone and
converted to UTC one candidate at a time, so daylight saving time is handled here rather than
left to croniter, the way Vixie cron does it (crontab(5)). A cron whose hour field names every
hour (``*``, ``*/1``, ``0-23``) fires at every real instant that shows a matching local time:
local times the clock skips (spring forward) do not happen, and a repeated local time (fall
back) fires in both passes. Any other cron names fixed hours: a fire time the clock skips runs
once at the first instant after the jump (however many of its fire times fell in the gap, and
not again for a matching time right at the jump), and a repeated one fires once, at its first
occurrence.

``every`` fires at ``anchor + k * every`` where the anchor is the window start or the Unix
epoch, so every machine computes the same fire times, across restarts too: the claim that makes
a fire run once relies on that.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, timezone
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from .durations import format_duration, parse_duration
from .exceptions import Problem

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SCHEDULE_KINDS = ("cron", "every", "at", "keepalive", "after")
SCHEDULE_KEYS = (*SCHEDULE_KINDS, "timezone", "start", "end", "between", "within", "calendar")
MAX_PARENTS = 20  # tasks an after schedule waits for
# a task's name (the task model's rule, cloudtask/task.py, which builds on this module)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
EVERY_MIN = 1.0
EVERY_MAX = 30 * 86400.0
KEEPALIVE_MAX_BACKOFF = 60.0
KEEPALIVE_RESET_AFTER = 60.0

# A schedule whose `between` window lets nothing through this long is treated as finished.
SEARCH_HORIZON = timedelta(days=3660)
_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
_CRON_REFERENCE = datetime(2000, 1, 1)
_RANDOM_CRON = re.compile(r"(?<![a-z])[hr](?![a-z])", re.IGNORECASE)
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")


def show_value(value: object) -> str:
    """A user's value as it appears in a message: strings quoted, JSON values as JSON."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_instant(value: object) -> datetime:
    """An ISO-8601 instant with an offset, as aware UTC; ValueError with a user message."""
    example = "'2026-12-01T03:00:00Z'"
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 time such as {example}, got {show_value(value)}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 time such as {example}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset: add 'Z' for UTC or an offset like '+01:00'")
    try:
        moment = parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is out of range") from None
    if moment >= datetime(9000, 1, 1, tzinfo=UTC):
        # fire times near the calendar's end could not be computed or stored
        raise ValueError(f"{value!r} is out of range: give a time before the year 9000")
    return moment


def format_instant(moment: datetime) -> str:
    """An aware datetime as ISO-8601 UTC with a 'Z'."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def timezone_problem(name: object) -> str | None:
    """Why ``name`` is not a usable IANA timezone, or None."""
    if not isinstance(name, str):
        return f"expected an IANA timezone name such as 'Europe/Berlin', got {show_value(name)}"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "America" is a folder of zones
        return f"unknown timezone {name!r}: use an IANA name such as 'Europe/Berlin' or 'UTC'"
    return None


def cron_problem(expr: object) -> str | None:
    """Why ``expr`` is not a usable cron expression (5 fields, or 6 with seconds first), or None."""
    if not isinstance(expr, str):
        return f"expected a cron expression such as '0 3 * * *', got {show_value(expr)}"
    count = len(expr.split())
    if count not in (5, 6):
        hint = " ('@daily' is written '0 0 * * *')" if expr.strip().startswith("@") else ""
        return (
            "expected 5 fields (minute hour day-of-month month day-of-week) "
            f"or 6 with seconds first, got {count}{hint}"
        )
    if _RANDOM_CRON.search(expr):
        return "random (R) and hashed (H) cron fields are not supported: every machine must agree"
    try:
        it = croniter(expr, _CRON_REFERENCE, ret_type=datetime, second_at_beginning=True)
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # CroniterError is a ValueError
        return f"{expr!r} is not a valid cron expression: {exc}"
    try:
        it.get_next()
    except CroniterBadDateError:
        return f"{expr!r} never fires: no date matches it"
    return None


def _check_every(seconds: float) -> float:
    if not EVERY_MIN <= seconds <= EVERY_MAX:
        limit = "at least 1s" if seconds < EVERY_MIN else "at most 30d"
        raise ValueError(f"must be {limit}, got {format_duration(seconds)}")
    return seconds


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} is naive: schedules need timezone-aware datetimes")
    return moment.astimezone(UTC)


def _wall_to_utc(wall: datetime, zone: ZoneInfo) -> datetime | None:
    """The first instant showing local time ``wall``, or None when the clock skips it."""
    moment = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if moment.astimezone(zone).replace(tzinfo=None) != wall:
        return None
    return moment


def _transition(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The first whole second in (before, after] whose UTC offset is ``after``'s."""
    target = after.astimezone(zone).utcoffset()
    lo, hi = math.floor(before.timestamp()), math.ceil(after.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == target:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _opening_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant at or after local time ``wall`` (the end of the gap if it is skipped)."""
    moment = _wall_to_utc(wall, zone)
    if moment is not None:
        return moment
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)  # the offset after the jump
    after = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)  # the offset before the jump
    return _transition(before, after, zone)


def _naive_wall(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone).replace(tzinfo=None)


def _fold_walls(wall: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The local times [first, end) that happen twice around ``wall``, a repeated local time."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    switch = _transition(first, second, zone)  # the clock goes back from `end` to `first`
    return _naive_wall(switch, zone), _naive_wall(switch - _SECOND, zone) + _SECOND


MAX_RULE_CALENDARS = 10  # calendars named by one side of a schedule's calendar rule


@dataclass(frozen=True)
class CalendarRule:
    """A schedule's ``calendar``: it fires only on the local dates of the ``only`` calendars
    (any of them) and never on those of the ``skip`` ones. The dates are not known here: a
    :class:`cloudtask.calendars.CalendarBook` judges them (cloudtask.calendars.next_fire)."""

    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (*self.only, *self.skip)

    def to_dict(self) -> dict[str, object]:
        sides = (("only", self.only), ("skip", self.skip))
        return {k: (v[0] if len(v) == 1 else list(v)) for k, v in sides if v}


@dataclass(frozen=True)
class Window:
    """Limits on when a schedule fires: instants [start, end], a daily local `between`, and
    the local dates a calendar rule lets through (judged outside: see CalendarRule)."""

    start: datetime | None = None
    end: datetime | None = None
    between: tuple[time, time] | None = None  # start inclusive, end exclusive; may wrap midnight
    calendar: CalendarRule | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, _utc(value))
        if self.between is not None and self.between[0] == self.between[1]:
            raise ValueError("a between window needs two different times")

    def allows_clock(self, clock: time) -> bool:
        """Whether local time of day ``clock`` lies inside `between` (True without one)."""
        if self.between is None:
            return True
        opens, closes = self.between
        if opens < closes:
            return opens <= clock < closes
        return clock >= opens or clock < closes

    def next_opening(self, wall: datetime) -> datetime:
        """The naive local time the `between` window next opens, for a ``wall`` outside it."""
        assert self.between is not None
        opens = self.between[0]
        day = wall.date() if wall.time() < opens else wall.date() + timedelta(days=1)
        return datetime.combine(day, opens)

    def to_dict(self) -> dict[str, object]:
        bounds = (("start", self.start), ("end", self.end))
        out: dict[str, object] = {k: format_instant(v) for k, v in bounds if v is not None}
        if self.between is not None:
            out["between"] = [clock.strftime("%H:%M") for clock in self.between]
        if self.calendar is not None:
            out["calendar"] = self.calendar.to_dict()
        return out


class Schedule(ABC):
    """One way a task fires. ``next_after(t)`` is the earliest fire strictly after ``t``."""

    window: Window
    kind: str = ""

    @abstractmethod
    def next_after(self, t: datetime) -> datetime | None:
        """The earliest fire strictly after ``t`` inside the window, or None when none is left."""

    @abstractmethod
    def to_dict(self) -> dict[str, object]:
        """The canonical JSON form, which :func:`parse_schedule` reads back to an equal schedule."""


@dataclass(frozen=True)
class CronSchedule(Schedule):
    """A cron expression (5 fields, or 6 with seconds first) evaluated in ``timezone``."""

    expr: str
    timezone: str = "UTC"
    window: Window = field(default_factory=Window)
    kind = "cron"

    def __post_init__(self) -> None:
        if problem := cron_problem(self.expr) or timezone_problem(self.timezone):
            raise ValueError(problem)

    @cached_property
    def wildcard_hour(self) -> bool:
        """Whether the hour field names every hour (``*``, ``*/1``, ``0-23``): see the module doc."""
        expanded = croniter(self.expr, _CRON_REFERENCE, second_at_beginning=True).expanded
        return bool(expanded[1] == ["*"])  # croniter writes a field covering all its values "*"

    def next_after(self, t: datetime) -> datetime | None:
        t = _utc(t)
        win, zone, wild = self.window, ZoneInfo(self.timezone), self.wildcard_hour
        lo = win.start - _MICROSECOND if win.start is not None and win.start > t else t
        local = lo.astimezone(zone)
        wall = local.replace(tzinfo=None, microsecond=0)
        # A wildcard-hour cron at a time in the first pass of a repeated hour fires at the rest
        # of that pass, then goes back to fire the whole repetition again: `revisit` is where
        # the repeated local times start, `fold_end` where they end.
        revisit = fold_end = None
        if wild and local.fold == 0 and zone.utcoffset(wall.replace(fold=1)) != local.utcoffset():
            revisit, fold_end = _fold_walls(wall, zone)
        it = croniter(self.expr, wall, ret_type=datetime, second_at_beginning=True)
        while True:
            try:
                candidate: datetime | None = it.get_next()
            except CroniterBadDateError:
                candidate = None
            if revisit is not None and (candidate is None or candidate >= fold_end):
                it.set_current(revisit - _SECOND, force=True)  # the repetition's second pass
                revisit = None
                continue
            if candidate is None:
                return None
            before, after = zone.utcoffset(candidate), zone.utcoffset(candidate.replace(fold=1))
            earliest = (candidate - max(before, after)).replace(tzinfo=UTC)  # no fire before it
            if (win.end is not None and earliest > win.end) or earliest - lo > SEARCH_HORIZON:
                return None
            if not win.allows_clock(candidate.time()):  # `between` judges the cron's own time
                it.set_current(win.next_opening(candidate) - _SECOND, force=True)
                continue
            moment = (candidate - before).replace(tzinfo=UTC)
            if before < after:  # skipped by the clock (spring forward)
                gap_end = _opening_instant(candidate, zone)
                if wild or gap_end <= lo:  # it does not happen / its catch-up already fired
                    it.set_current(_naive_wall(gap_end, zone) - _SECOND, force=True)
                    continue
                moment = gap_end  # several skipped times and the time at the jump: one fire
            elif before > after and moment <= lo:  # repeated (fall back), its first pass is over
                if not wild:  # fired in the first pass: resume where the repetition ends
                    it.set_current(_fold_walls(candidate, zone)[1] - _SECOND, force=True)
                    continue
                moment = (candidate - after).replace(tzinfo=UTC)
            if win.end is not None and moment > win.end:
                return None
            if moment > lo:
                return moment

    def to_dict(self) -> dict[str, object]:
        return {"cron": self.expr, "timezone": self.timezone, **self.window.to_dict()}


@dataclass(frozen=True)
class EverySchedule(Schedule):
    """Fires every ``every`` seconds on a grid anchored at the window start or the Unix epoch."""

    every: float
    timezone: str = "UTC"
    window: Window = field(default_factory=Window)
    kind = "every"

    def __post_init__(self) -> None:
        _check_every(self.every)
        if problem := timezone_problem(self.timezone):
            raise ValueError(problem)

    def next_after(self, t: datetime) -> datetime | None:
        t = _utc(t)
        win = self.window
        step = round(self.every * 1_000_000)  # microseconds, so the grid has no float drift
        anchor = win.start if win.start is not None else EPOCH
        k = (t - anchor) // _MICROSECOND // step + 1
        if win.start is not None:
            k = max(k, 0)
        zone = ZoneInfo(self.timezone)
        while True:
            moment = anchor + timedelta(microseconds=k * step)
            if win.end is not None and moment > win.end:
                return None
            local = moment.astimezone(zone).replace(tzinfo=None)
            if win.allows_clock(local.time()):
                return moment
            if moment - t > SEARCH_HORIZON:
                return None
            # Jump straight to the first grid point at or after the next opening.
            opening = _opening_instant(win.next_opening(local), zone)
            k = max(k + 1, -((anchor - opening) // _MICROSECOND // step))

    def to_dict(self) -> dict[str, object]:
        every = format_duration(self.every)
        return {"every": every, "timezone": self.timezone, **self.window.to_dict()}


@dataclass(frozen=True)
class AtSchedule(Schedule):
    """Fires once, at ``at``."""

    at: datetime
    window: Window = field(default_factory=Window)
    kind = "at"

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", _utc(self.at))
        if self.window.between is not None:
            raise ValueError("an at schedule takes no between window")

    def next_after(self, t: datetime) -> datetime | None:
        win = self.window
        if self.at <= _utc(t) or (win.start is not None and self.at < win.start):
            return None
        return None if win.end is not None and self.at > win.end else self.at

    def to_dict(self) -> dict[str, object]:
        return {"at": format_instant(self.at), **self.window.to_dict()}


@dataclass(frozen=True)
class KeepaliveSchedule(Schedule):
    """Always running: the agent starts it and restarts it with backoff; no fire times."""

    window: Window = field(default_factory=Window, init=False)
    kind = "keepalive"

    def next_after(self, t: datetime) -> datetime | None:
        return None

    def to_dict(self) -> dict[str, object]:
        return {"keepalive": True}


@dataclass(frozen=True)
class AfterSchedule(Schedule):
    """Fires for a logical date once every parent task succeeded for it (fan-in): the date of
    a parent's run is the date of its fire time (``scheduled_for``) in ``timezone``, and the
    child's fire for it is at that date's midnight there, so each date fires once (the claim
    key). With ``within``, the parents must all succeed within that long of the first one,
    or the date is recorded ``missed``. No fire times of its own: the leading center queues
    its fires (cloudtask/center/fanin.py)."""

    parents: tuple[str, ...]
    timezone: str = "UTC"
    within: float | None = None
    window: Window = field(default_factory=Window, init=False)
    kind = "after"

    def next_after(self, t: datetime) -> datetime | None:
        return None

    def logical_date(self, fire: datetime) -> Any:
        """The date a parent's fire at ``fire`` is for."""
        return _utc(fire).astimezone(ZoneInfo(self.timezone)).date()

    def date_start(self, day: Any) -> datetime:
        """The instant the child's fire for ``day`` is recorded at (its midnight there)."""
        wall = datetime(day.year, day.month, day.day)
        return _opening_instant(wall, ZoneInfo(self.timezone))

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"after": list(self.parents)}
        if self.within is not None:
            out["within"] = format_duration(self.within)
        if self.timezone != "UTC":
            out["timezone"] = self.timezone
        return out


def keepalive_backoff(restarts: int) -> float:
    """Seconds to wait before restart number ``restarts``: 0, then 1, 2, 4, ... up to 60."""
    if restarts <= 0:
        return 0.0
    return min(KEEPALIVE_MAX_BACKOFF, float(2 ** min(restarts - 1, 16)))


@dataclass(frozen=True)
class ScheduleSet:
    """A task's schedules: it fires whenever any of them does."""

    items: tuple[Schedule, ...]

    def next_after(self, t: datetime) -> datetime | None:
        fires = [f for f in (item.next_after(t) for item in self.items) if f is not None]
        return min(fires, default=None)

    @property
    def keepalive(self) -> bool:
        return any(isinstance(item, KeepaliveSchedule) for item in self.items)

    @property
    def after(self) -> AfterSchedule | None:
        """The fan-in schedule, when the task runs after its parents."""
        return next((i for i in self.items if isinstance(i, AfterSchedule)), None)

    @property
    def is_once(self) -> bool:
        return bool(self.items) and all(isinstance(item, AtSchedule) for item in self.items)

    def to_dict(self) -> dict[str, object] | list[dict[str, object]]:
        if len(self.items) == 1:
            return self.items[0].to_dict()
        return [item.to_dict() for item in self.items]


def next_fires(schedule: ScheduleSet | Schedule, start: datetime, n: int) -> list[datetime]:
    """The next ``n`` fire times strictly after ``start`` (fewer if the schedule ends)."""
    fires: list[datetime] = []
    t = start
    while len(fires) < n:
        fire = schedule.next_after(t)
        if fire is None:
            break
        fires.append(fire)
        t = fire
    return fires


def parse_schedule(
    value: object, path: str = "schedule", *, now: datetime | None = None
) -> tuple[ScheduleSet | None, list[Problem]]:
    """Read one schedule object or a non-empty list of them, collecting every problem.

    With ``now``, an `at` instant or a window `end` at or before it is refused.
    """
    problems: list[Problem] = []
    if isinstance(value, list):
        if not value:
            return None, [Problem(path, "expected at least one schedule")]
        entries = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    else:
        entries = [(path, value)]
    items = [_parse_one(item, where, problems, now) for where, item in entries]
    if len(entries) > 1:
        for where, item in entries:
            for kind in ("keepalive", "after"):
                if isinstance(item, dict) and kind in item:
                    message = f"{kind} cannot be combined with other schedules"
                    problems.append(Problem(f"{where}.{kind}", message))
    if problems:
        return None, problems
    return ScheduleSet(tuple(item for item in items if item is not None)), []


def _parse_one(
    item: object, path: str, problems: list[Problem], now: datetime | None
) -> Schedule | None:
    if not isinstance(item, dict):
        got = f'expected an object such as {{"cron": "0 3 * * *"}}, got {show_value(item)}'
        problems.append(Problem(path, got))
        return None
    before = len(problems)

    def refuse(key: str, message: str) -> None:
        problems.append(Problem(f"{path}.{key}" if key else path, message))

    def read(key: str, parse: Callable[[Any], Any]) -> Any:
        try:
            return parse(item[key]) if key in item else None
        except ValueError as exc:
            refuse(key, str(exc))
            return None

    for key in item:
        if key not in SCHEDULE_KEYS:
            refuse(str(key), f"unknown key; expected one of {', '.join(SCHEDULE_KEYS)}")
    kinds = [key for key in SCHEDULE_KINDS if key in item]
    kind = kinds[0] if len(kinds) == 1 else None
    if len(kinds) != 1:
        got = f", got {' and '.join(kinds)}" if kinds else ""
        refuse("", f"expected exactly one of the keys cron, every, at, keepalive or after{got}")
    if "within" in item and kind != "after":
        refuse("within", "only an after schedule takes within")
    for key in ("start", "end", "between"):
        if key in item and kind == "after":
            refuse(key, f"an after schedule fires when its parents succeeded; it takes no {key}")
    for key in ("timezone", "start", "end", "between"):
        if key in item and kind == "keepalive":
            refuse(key, f"a keepalive task runs all the time; it takes no {key}")
        elif key in item and kind == "at" and key in ("timezone", "between"):
            refuse(key, f"only cron and every take a {key}, not at")
    timezone_name = item.get("timezone", "UTC")
    if kind in ("cron", "every", "after", None) and (message := timezone_problem(timezone_name)):
        refuse("timezone", message)
    start, end = (
        read(k, parse_instant) if kind not in ("keepalive", "after") else None
        for k in ("start", "end")
    )
    if start is not None and end is not None and start >= end:
        refuse("end", f"must be after start ({format_instant(start)})")
    elif end is not None and now is not None and end <= _utc(now):
        refuse("end", f"{format_instant(end)} is in the past")
    between = None
    if "between" in item and kind in ("cron", "every", None):
        between = _parse_between(item["between"], f"{path}.between", problems)
    calendar = None
    if "calendar" in item and kind in ("at", "keepalive", "after"):
        refuse("calendar", f"only cron and every take a calendar, not {kind}")
    elif "calendar" in item:
        calendar = _parse_calendar_rule(item["calendar"], f"{path}.calendar", problems)

    raw = item.get(kind) if kind else None
    if kind == "cron" and (message := cron_problem(raw)):
        refuse("cron", message)
    every = read("every", lambda v: _check_every(round(parse_duration(v), 3)))
    at = read("at", parse_instant)
    if at is not None and now is not None and at <= _utc(now):
        refuse("at", f"{format_instant(at)} is in the past")
    if kind == "keepalive" and raw is not True:
        refuse("keepalive", f"must be true, got {show_value(raw)}")
    parents: tuple[str, ...] = ()
    within = None
    if kind == "after":
        parents = _parse_parents(raw, f"{path}.after", problems)
        within = read("within", lambda v: _check_within(parse_duration(v)))
    if kind is None or len(problems) > before:
        return None
    if kind == "after":
        return AfterSchedule(parents, timezone_name, within)

    window = Window(start, end, between, calendar)
    schedule: Schedule
    if kind == "cron":
        schedule = CronSchedule(raw, timezone_name, window)
    elif kind == "every":
        schedule = EverySchedule(every, timezone_name, window)
    else:
        schedule = AtSchedule(at, window) if kind == "at" else KeepaliveSchedule()
    if between is not None and schedule.next_after((start or EPOCH) - _MICROSECOND) is None:
        refuse("between", "the schedule never fires inside this between window")
        return None
    return schedule


def _parse_parents(value: object, path: str, problems: list[Problem]) -> tuple[str, ...]:
    """The parent task names of an after schedule: 1 to MAX_PARENTS distinct names."""
    rule = f"expected a list of 1 to {MAX_PARENTS} task names"
    if not isinstance(value, list) or not value or len(value) > MAX_PARENTS:
        problems.append(Problem(path, f"{rule}, got {show_value(value)}"))
        return ()
    names: list[str] = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            problems.append(
                Problem(f"{path}[{i}]", f"expected a task name, got {show_value(name)}")
            )
        elif name in names:
            problems.append(Problem(f"{path}[{i}]", f"{name!r} is named twice"))
        else:
            names.append(name)
    return tuple(names)


def _parse_calendar_rule(value: object, path: str, problems: list[Problem]) -> CalendarRule | None:
    """``{"only": NAME or [NAMES], "skip": NAME or [NAMES]}``, one side at least."""
    example = '{"only": "workdays", "skip": "holidays"}'
    if not isinstance(value, dict) or not value:
        problems.append(Problem(path, f"expected an object such as {example}"))
        return None
    before = len(problems)
    sides: dict[str, tuple[str, ...]] = {}
    for key, names in value.items():
        if key not in ("only", "skip"):
            problems.append(Problem(f"{path}.{key}", "unknown key; expected only or skip"))
            continue
        listed = [names] if isinstance(names, str) else names
        if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_RULE_CALENDARS:
            rule = f"expected a calendar's name or a list of 1 to {MAX_RULE_CALENDARS} names"
            problems.append(Problem(f"{path}.{key}", f"{rule}, got {show_value(names)}"))
            continue
        for i, name in enumerate(listed):
            where = f"{path}.{key}" if isinstance(names, str) else f"{path}.{key}[{i}]"
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                problems.append(Problem(where, f"a calendar's name: {NAME_RULE}"))
            elif name in listed[:i]:
                problems.append(Problem(where, f"{name!r} is named twice"))
        sides[key] = tuple(listed)
    if len(problems) > before:
        return None
    for name in set(sides.get("only", ())) & set(sides.get("skip", ())):
        problems.append(Problem(path, f"{name!r} is both in only and in skip"))
    if len(problems) > before:
        return None
    return CalendarRule(sides.get("only", ()), sides.get("skip", ()))


def _check_within(seconds: float) -> float:
    if not 60 <= seconds <= 7 * 86400:
        raise ValueError("expected a duration from 1m to 7d")
    return seconds


def _parse_between(value: object, path: str, problems: list[Problem]) -> tuple[time, time] | None:
    if not isinstance(value, list) or len(value) != 2:
        got = f'expected two times such as ["22:00", "06:00"], got {show_value(value)}'
        problems.append(Problem(path, got))
        return None
    clocks = []
    for i, text in enumerate(value):
        if isinstance(text, str) and (match := _CLOCK.fullmatch(text)):
            clocks.append(time(int(match[1]), int(match[2])))
        else:
            problems.append(
                Problem(f"{path}[{i}]", f"expected a time 'HH:MM', got {show_value(text)}")
            )
    if len(clocks) == 2 and clocks[0] == clocks[1]:
        problems.append(Problem(path, "the window opens and closes at the same time"))
    return (clocks[0], clocks[1]) if len(clocks) == 2 and clocks[0] != clocks[1] else None


def schedule_summary(schedule: Any) -> str:
    """One line per schedule of a stored spec: ``cron 0 3 * * * Europe/Berlin``, ``every 10s``."""
    items = schedule if isinstance(schedule, list) else [schedule]
    parts = []
    for item in items:
        if not isinstance(item, dict):
            continue
        zone = item.get("timezone", "UTC")
        if "cron" in item:
            text = f"cron {item['cron']}" + (f" {zone}" if zone != "UTC" else "")
        elif "every" in item:
            text = f"every {item['every']}"
        elif "at" in item:
            text = f"at {item['at']}"
        elif "keepalive" in item:
            text = "keepalive"
        elif "after" in item and isinstance(item["after"], list):
            text = "after " + " and ".join(map(str, item["after"]))
            if item.get("within"):
                text += f" within {item['within']}"
        else:
            continue
        if item.get("between"):
            text += f" between {'-'.join(item['between'])}" + (f" {zone}" if zone != "UTC" else "")
        if isinstance(item.get("calendar"), dict):
            for side in ("only", "skip"):
                names = item["calendar"].get(side)
                if names:
                    text += f" {side} " + ",".join(names if isinstance(names, list) else [names])
        parts.append(text)
    return " + ".join(parts) or "–"
