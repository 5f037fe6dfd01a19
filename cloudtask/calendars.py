"""Calendars and blackout windows: pure logic, no I/O, the current time always an argument.

A **calendar** is a named set of dates (holidays) and weekdays: ``workdays`` is Monday to
Friday, ``de-holidays`` the dates of an iCalendar file (:func:`ics_dates`). A schedule names
calendars in its ``calendar`` rule (``{"only": "workdays", "skip": "de-holidays"}``): a fire
whose local date, in the schedule's time zone, is not let through does not exist, like a cron
that names only some days. It is not recorded, not counted missed, and the next-fire preview
leaves it out (:func:`next_fire`).

A **blackout** is a maintenance window of an agent group (or of every group, ``"*"``): on
some weekdays or dates from a local time to another (``{"days": ["sun"], "from": "02:00",
"to": "04:00", "timezone": "Europe/Berlin"}``; ``to`` at or before ``from`` closes the next
day), or once from a local ``start`` to an ``end``. Nothing of the group starts in it: each
fire that falls in it is recorded ``skipped`` with the reason ``blackout NAME`` (one run
document per fire, so the history tells the truth), and the preview shows it as skipped.
Windows are judged on local wall-clock times, so a window keeps its local hours across
daylight-saving changes (02:00-04:00 on the night the clock skips 02:00-03:00 is one hour
long; on the night 02:00-03:00 happens twice it is three hours long).

:class:`CalendarBook` holds what is known of both (the agent's copy, the web site's read) and
answers the questions. Everything stored is validated here first: :func:`parse_calendar`,
:func:`parse_blackout` give canonical documents or every problem with its path.
"""

from __future__ import annotations

import bisect
import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from .exceptions import Problem
from .schedules import (
    NAME_PATTERN,
    NAME_RULE,
    CalendarRule,
    Schedule,
    ScheduleSet,
    _opening_instant,
    show_value,
    timezone_problem,
)

UTC = timezone.utc
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAY_NAMES = {
    **{name: i for i, name in enumerate(WEEKDAYS)},
    **{
        full: i
        for i, full in enumerate(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        )
    },
}
MAX_DATES = 5000  # dates of one calendar (about 13 years of holidays: 14 a year)
MAX_DESCRIPTION = 1000
MAX_ICS_BYTES = 1024 * 1024  # an iCalendar file imported
MAX_ICS_EVENTS = 20_000  # occurrences expanded from one file
IMPORT_PAST_DAYS = 366  # an import keeps the dates of the last year ...
IMPORT_FUTURE_DAYS = 3 * 366  # ... and of the next three
MAX_EVENT_DAYS = 366  # dates one occurrence may cover
MAX_BLACKOUT_DATES = 1000
MAX_DATE_PROBLEMS = 20  # wrong dates named one by one; the rest are counted
MAX_BLACKOUT_SPAN = timedelta(days=31)  # a one-off window
# a rule that lets no date through this long is treated as never firing again
DAY_HORIZON = 3660
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)|24:00")
_LOCAL = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?")
_EPSILON = timedelta(microseconds=1)
_SORTED_DATES: dict[frozenset[date], list[date]] = {}  # a blackout's dates, in order


class IcsError(ValueError):
    """An iCalendar file that cannot be imported; ``problems`` say where and what."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


# --- calendars -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calendar:
    """A named set of dates and weekdays (0 is Monday)."""

    name: str
    dates: frozenset[date] = frozenset()
    weekdays: frozenset[int] = frozenset()

    def matches(self, day: date) -> bool:
        return day in self.dates or day.weekday() in self.weekdays

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Calendar:
        """From a stored (canonical) calendar: ``name``, ``dates`` as ``YYYY-MM-DD``,
        ``weekdays`` as ``mon``..``sun``."""
        return cls(
            str(doc["name"]),
            frozenset(date.fromisoformat(d) for d in doc.get("dates") or ()),
            frozenset(_WEEKDAY_NAMES[w] for w in doc.get("weekdays") or ()),
        )


def parse_weekday(value: object) -> int:
    """``mon``..``sun`` or the full English name, any case, as 0..6 (ValueError)."""
    if isinstance(value, str) and value.strip().lower() in _WEEKDAY_NAMES:
        return _WEEKDAY_NAMES[value.strip().lower()]
    raise ValueError(f"expected a weekday such as 'mon' or 'sunday', got {show_value(value)}")


def parse_day(value: object) -> date:
    """A date ``YYYY-MM-DD`` (ValueError with a user's message)."""
    if isinstance(value, str) and _DAY.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a date of the calendar") from None
    raise ValueError(f"expected a date such as '2026-12-24', got {show_value(value)}")


def parse_dates(values: object, path: str, problems: list[Problem], limit: int) -> set[date]:
    """A list of dates, each ``YYYY-MM-DD`` or a range ``YYYY-MM-DD..YYYY-MM-DD`` (both
    included); at most ``limit`` dates in all."""
    if not isinstance(values, list):
        problems.append(Problem(path, f"expected a list of dates, got {show_value(values)}"))
        return set()
    if len(values) > limit:
        problems.append(Problem(path, f"{len(values)} entries; at most {limit} dates"))
        return set()
    days: set[date] = set()
    expanded = 0  # dates read, repeats too: a range given a thousand times is work
    refused = 0
    for i, value in enumerate(values):
        where = f"{path}[{i}]"
        try:
            if isinstance(value, str) and ".." in value:
                first_text, last_text = value.split("..", 1)
                first, last = parse_day(first_text), parse_day(last_text)
                if last < first:
                    raise ValueError(f"the range {value!r} ends before it begins")
                if (last - first).days >= limit:
                    raise ValueError(f"the range {value!r} holds more than {limit} dates")
                expanded += (last - first).days + 1
                if expanded > 4 * limit:
                    problems.append(Problem(path, f"at most {limit} dates"))
                    break
                days.update(first + timedelta(days=n) for n in range((last - first).days + 1))
            else:
                expanded += 1
                days.add(parse_day(value))
        except ValueError as e:
            refused += 1
            if refused <= MAX_DATE_PROBLEMS:
                problems.append(Problem(where, str(e)))
            continue
        if len(days) > limit:
            problems.append(Problem(path, f"at most {limit} dates"))
            break
    if refused > MAX_DATE_PROBLEMS:
        more = refused - MAX_DATE_PROBLEMS
        problems.append(Problem(path, f"and {more} more entries that are not dates"))
    return days


def _parse_weekdays(values: object, path: str, problems: list[Problem]) -> set[int]:
    if not isinstance(values, list):
        got = show_value(values)
        problems.append(Problem(path, f"expected a list of weekdays such as ['sat'], got {got}"))
        return set()
    out = set()
    for i, value in enumerate(values):
        try:
            out.add(parse_weekday(value))
        except ValueError as e:
            problems.append(Problem(f"{path}[{i}]", str(e)))
    return out


def _description(body: Mapping[str, Any], problems: list[Problem]) -> str:
    text = body.get("description", "")
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION or "\x00" in text:
        limit = f"text of at most {MAX_DESCRIPTION} characters"
        problems.append(Problem("description", f"expected {limit}, got {show_value(text)}"))
        return ""
    return text


def name_problem(name: object, what: str) -> Problem | None:
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return None
    return Problem("name", f"{what}'s name: {NAME_RULE}, got {show_value(name)}")


def parse_calendar(name: object, body: object) -> tuple[dict[str, Any] | None, list[Problem]]:
    """A calendar to store: ``{"dates": [...], "weekdays": [...], "description": ...}`` as
    its canonical document (dates sorted ``YYYY-MM-DD``, weekdays ``mon``..``sun`` in order),
    or every problem."""
    problems: list[Problem] = []
    if (problem := name_problem(name, "a calendar")) is not None:
        problems.append(problem)
    if not isinstance(body, Mapping):
        return None, [*problems, Problem("", "expected an object with dates and/or weekdays")]
    for key in body:
        if key not in ("dates", "weekdays", "description", "source"):
            problems.append(
                Problem(str(key), "unknown key; expected dates, weekdays or description")
            )
    dates = parse_dates(body.get("dates", []), "dates", problems, MAX_DATES)
    weekdays = _parse_weekdays(body.get("weekdays", []), "weekdays", problems)
    description = _description(body, problems)
    source = body.get("source")
    if source is not None and (not isinstance(source, str) or len(source) > 300):
        problems.append(Problem("source", "expected text of at most 300 characters"))
    if not problems and not dates and not weekdays:
        problems.append(Problem("", "a calendar needs at least one date or weekday"))
    if problems:
        return None, problems
    return {
        "name": name,
        "dates": sorted(d.isoformat() for d in dates),
        "weekdays": [w for i, w in enumerate(WEEKDAYS) if i in weekdays],
        "description": description,
        "source": source,
    }, []


# --- iCalendar import ------------------------------------------------------------------------


@dataclass
class _Line:
    number: int  # the first physical line of a (possibly folded) content line
    name: str
    value: str


def _content_lines(data: bytes) -> list[_Line]:
    """The unfolded content lines of an iCalendar file with their line numbers (RFC 5545
    3.1); IcsError at the first line that is not ``NAME[;PARAMS]:VALUE`` or unbalanced
    ``BEGIN``/``END``."""
    if len(data) > MAX_ICS_BYTES:
        raise IcsError([Problem("file", f"larger than {MAX_ICS_BYTES // 1024} KiB")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise IcsError([Problem(f"line {line}", "not UTF-8 text")]) from None
    if "\x00" in text:
        raise IcsError([Problem("file", "a NUL character: not an iCalendar file")])
    physical = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines: list[_Line] = []
    for number, raw in enumerate(physical, 1):
        if raw[:1] in (" ", "\t") and lines:
            lines[-1].value += raw[1:]  # a folded line goes on
            continue
        if not raw.strip():
            continue
        head, colon, value = raw.partition(":")
        name = head.split(";", 1)[0].strip().upper()
        if not colon or not re.fullmatch(r"[A-Z0-9-]+", name):
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            raise IcsError(
                [Problem(f"line {number}", f"not an iCalendar line NAME:VALUE: {shown!r}")]
            )
        lines.append(_Line(number, name, value))
    if not lines or lines[0].name != "BEGIN" or lines[0].value.strip().upper() != "VCALENDAR":
        where = f"line {lines[0].number}" if lines else "file"
        raise IcsError([Problem(where, "an iCalendar file starts with BEGIN:VCALENDAR")])
    stack: list[tuple[str, int]] = []
    for line in lines:
        if line.name == "BEGIN":
            stack.append((line.value.strip().upper(), line.number))
        elif line.name == "END":
            kind = line.value.strip().upper()
            if not stack or stack[-1][0] != kind:
                opened = f" (BEGIN:{stack[-1][0]} at line {stack[-1][1]} is open)" if stack else ""
                raise IcsError([Problem(f"line {line.number}", f"END:{kind} unexpected{opened}")])
            stack.pop()
            if not stack and line is not lines[-1]:
                later = lines[lines.index(line) + 1]
                raise IcsError(
                    [Problem(f"line {later.number}", "text after END:VCALENDAR (one calendar)")]
                )
    if stack:
        kind, number = stack[-1]
        raise IcsError([Problem(f"line {number}", f"BEGIN:{kind} is never ended")])
    return lines


def _line_of(lines: list[_Line], name: str, value: str | None = None) -> str:
    for line in lines:
        if line.name == name and (value is None or line.value.strip() == value.strip()):
            return f"line {line.number}"
    return "file"


def _as_day(value: Any, zone: ZoneInfo) -> date:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(zone)
        return value.date()
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def ics_dates(data: bytes, today: date, zone_name: str = "UTC") -> list[date]:
    """The dates the events of an iCalendar file cover, from ``IMPORT_PAST_DAYS`` before
    ``today`` to ``IMPORT_FUTURE_DAYS`` after it: recurrences (RRULE, RDATE) expanded less
    their EXDATEs; an all-day event covers its dates up to DTEND (excluded); a timed one the
    local dates (in ``zone_name``; a floating time as it is) from its start to its end.
    IcsError, saying where, for a file that cannot be read."""
    import icalendar
    import recurring_ical_events

    lines = _content_lines(data)
    zone = ZoneInfo(zone_name)
    try:
        calendar = icalendar.Calendar.from_ical(data)
    except ValueError as e:
        raise IcsError([Problem("file", f"not a readable iCalendar file: {e}")]) from None
    problems = []
    events = 0
    for component in calendar.walk():
        if component.name == "VEVENT":
            events += 1
            if "DTSTART" not in component:
                uid = component.get("UID") or component.get("SUMMARY") or f"number {events}"
                problems.append(Problem("file", f"event {uid} has no DTSTART"))
        for prop, message in getattr(component, "errors", []) or []:
            raw = component.get(prop)
            raw_text = str(raw) if raw is not None else None
            problems.append(Problem(_line_of(lines, str(prop), raw_text), f"{prop}: {message}"))
    if problems:
        raise IcsError(problems)
    if events == 0:
        raise IcsError([Problem("file", "no events (VEVENT) in the file")])
    first = today - timedelta(days=IMPORT_PAST_DAYS)
    last = today + timedelta(days=IMPORT_FUTURE_DAYS)
    days: set[date] = set()
    try:
        occurrences = recurring_ical_events.of(calendar, components=["VEVENT"]).between(
            first, last + timedelta(days=1)
        )
        for count, event in enumerate(occurrences, 1):
            if count > MAX_ICS_EVENTS:
                raise IcsError(
                    [Problem("file", f"more than {MAX_ICS_EVENTS} occurrences in the range")]
                )
            start = event.get("DTSTART").dt
            end_prop = event.get("DTEND")
            begin = _as_day(start, zone)
            if end_prop is not None:
                end_value = end_prop.dt
                stop = _as_day(end_value, zone)
                timed_to_midnight = isinstance(end_value, datetime) and (
                    end_value.astimezone(zone) if end_value.tzinfo else end_value
                ).time() == time(0)
                if not isinstance(end_value, datetime) or timed_to_midnight:
                    stop -= timedelta(days=1)  # DTEND of an all-day event is not in it
            else:
                stop = begin
            stop = max(begin, min(stop, begin + timedelta(days=MAX_EVENT_DAYS - 1)))
            day = begin
            while day <= stop:
                if first <= day <= last:
                    days.add(day)
                day += timedelta(days=1)
    except IcsError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        message = str(e)
        where = "file"
        if "RRULE" in message.upper() or type(e).__name__.startswith("BadRule"):
            where = _line_of(lines, "RRULE")
        raise IcsError([Problem(where, f"the events cannot be expanded: {message}")]) from None
    if len(days) > MAX_DATES:
        raise IcsError([Problem("file", f"more than {MAX_DATES} dates in the range")])
    return sorted(days)


# --- blackout windows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Blackout:
    """A group's maintenance window (see the module docstring). Local wall-clock times:
    ``opens``/``closes`` on ``days`` (0 is Monday) and ``dates`` (``closes`` None is 24:00,
    at or before ``opens`` the next day), or once [``start``, ``end``)."""

    name: str
    group: str
    timezone: str = "UTC"
    days: frozenset[int] = frozenset()
    dates: frozenset[date] = frozenset()
    opens: time = time(0)
    closes: time | None = None
    start: datetime | None = None  # naive local
    end: datetime | None = None

    def applies_to(self, group: str) -> bool:
        return self.group in ("*", group)

    def _spans(self, wall: datetime) -> Iterable[tuple[datetime, datetime]]:
        """The windows [open, close) (naive local) that may hold local time ``wall``."""
        if self.start is not None and self.end is not None:
            yield self.start, self.end
            return
        for day in (wall.date() - timedelta(days=1), wall.date()):
            if day.weekday() in self.days or day in self.dates:
                opened = datetime.combine(day, self.opens)
                if self.closes is None:
                    closed = datetime.combine(day + timedelta(days=1), time(0))
                elif self.closes <= self.opens:
                    closed = datetime.combine(day + timedelta(days=1), self.closes)
                else:
                    closed = datetime.combine(day, self.closes)
                yield opened, closed

    def window_at(self, instant: datetime) -> tuple[datetime, datetime] | None:
        """The window holding ``instant`` as UTC [open, close), or None."""
        zone = ZoneInfo(self.timezone)
        wall = instant.astimezone(zone).replace(tzinfo=None)
        for opened, closed in self._spans(wall):
            if opened <= wall < closed:
                return _opening_instant(opened, zone), _opening_instant(closed, zone)
        return None

    def contains(self, instant: datetime) -> bool:
        return self.window_at(instant) is not None

    def next_opening(self, instant: datetime, horizon_days: int = 400) -> datetime | None:
        """When the next window after ``instant`` opens (UTC), within ``horizon_days``; None
        if none does (a one-off window that has passed, dates that are all behind)."""
        zone = ZoneInfo(self.timezone)
        if self.start is not None:
            opened = _opening_instant(self.start, zone)
            return opened if opened > instant else None
        today = instant.astimezone(zone).date()
        last = today + timedelta(days=horizon_days)
        candidates: list[date] = []
        if self.days:  # the next two matching weekdays (today's may have opened already)
            week = [today + timedelta(days=n) for n in range(15)]
            candidates += [d for d in week if d.weekday() in self.days][:2]
        if self.dates:
            ordered = self._sorted_dates()
            at = bisect.bisect_left(ordered, today)
            candidates += ordered[at : at + 2]
        for day in sorted(candidates):
            opened = _opening_instant(datetime.combine(day, self.opens), zone)
            if day <= last and opened > instant:
                return opened
        return None

    def _sorted_dates(self) -> list[date]:
        known = _SORTED_DATES.get(self.dates)
        if known is None:
            if len(_SORTED_DATES) > 1000:
                _SORTED_DATES.clear()
            known = _SORTED_DATES[self.dates] = sorted(self.dates)
        return known

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Blackout:
        """From a stored (canonical) blackout (see :func:`parse_blackout`)."""

        def clock(text: str | None) -> time | None:
            return None if text in (None, "24:00") else time.fromisoformat(str(text))

        start, end = doc.get("start"), doc.get("end")
        return cls(
            name=str(doc["name"]),
            group=str(doc["group"]),
            timezone=str(doc.get("timezone") or "UTC"),
            days=frozenset(_WEEKDAY_NAMES[d] for d in doc.get("days") or ()),
            dates=frozenset(date.fromisoformat(d) for d in doc.get("dates") or ()),
            opens=clock(doc.get("from")) or time(0),
            closes=clock(doc.get("to")),
            start=datetime.fromisoformat(start) if start else None,
            end=datetime.fromisoformat(end) if end else None,
        )


def _parse_clock(value: object, path: str, problems: list[Problem]) -> str | None:
    if isinstance(value, str) and _CLOCK.fullmatch(value):
        return value
    problems.append(Problem(path, f"expected a local time 'HH:MM', got {show_value(value)}"))
    return None


def _parse_local(value: object, path: str, problems: list[Problem]) -> datetime | None:
    if isinstance(value, str) and _LOCAL.fullmatch(value.strip()):
        try:
            return datetime.fromisoformat(value.strip().replace(" ", "T"))
        except ValueError:
            pass
    example = "'2026-12-24T18:00' (local time, in the blackout's time zone)"
    problems.append(
        Problem(path, f"expected a local time such as {example}, got {show_value(value)}")
    )
    return None


BLACKOUT_KEYS = ("group", "timezone", "days", "dates", "from", "to", "start", "end", "description")


def parse_blackout(name: object, body: object) -> tuple[dict[str, Any] | None, list[Problem]]:
    """A blackout to store, as its canonical document, or every problem. Either ``days``
    and/or ``dates`` with ``from``/``to`` (00:00 and 24:00 unless given), or ``start`` and
    ``end`` (local times, at most 31 days apart); ``group`` (``"*"``: every group) and
    ``timezone`` (UTC unless given)."""
    problems: list[Problem] = []
    if (problem := name_problem(name, "a blackout")) is not None:
        problems.append(problem)
    if not isinstance(body, Mapping):
        return None, [*problems, Problem("", "expected an object with group and a window")]
    for key in body:
        if key not in BLACKOUT_KEYS:
            problems.append(
                Problem(str(key), f"unknown key; expected one of {', '.join(BLACKOUT_KEYS)}")
            )
    group = body.get("group")
    if group != "*" and (not isinstance(group, str) or not NAME_PATTERN.fullmatch(group)):
        problems.append(
            Problem("group", f"an agent group's name ({NAME_RULE}) or '*' (every group)")
        )
    zone = body.get("timezone", "UTC")
    if (message := timezone_problem(zone)) is not None:
        problems.append(Problem("timezone", message))
    recurring = any(k in body for k in ("days", "dates", "from", "to"))
    once = any(k in body for k in ("start", "end"))
    out: dict[str, Any] = {"name": name, "group": group, "timezone": zone}
    if recurring and once:
        problems.append(
            Problem("", "either days/dates with from/to, or start and end (one window), not both")
        )
    elif once:
        start = _parse_local(body.get("start"), "start", problems)
        end = _parse_local(body.get("end"), "end", problems)
        if start is not None and end is not None:
            if end <= start:
                problems.append(Problem("end", "must be after start"))
            elif end - start > MAX_BLACKOUT_SPAN:
                problems.append(Problem("end", "a window is at most 31 days long"))
        out.update(
            start=start.isoformat() if start else None,
            end=end.isoformat() if end else None,
        )
    elif recurring:
        days = _parse_weekdays(body.get("days", []), "days", problems)
        dates = parse_dates(body.get("dates", []), "dates", problems, MAX_BLACKOUT_DATES)
        opens = _parse_clock(body.get("from", "00:00"), "from", problems)
        closes = _parse_clock(body.get("to", "24:00"), "to", problems)
        if opens == "24:00":
            problems.append(Problem("from", "a window opens at 23:59 at the latest"))
        if opens is not None and opens == closes:
            problems.append(Problem("to", "the window opens and closes at the same time"))
        if (
            not days
            and not dates
            and not any(p.path.startswith(("days", "dates")) for p in problems)
        ):
            problems.append(Problem("days", "name the weekdays or dates the window is on"))
        out.update(
            days=[w for i, w in enumerate(WEEKDAYS) if i in days],
            dates=sorted(d.isoformat() for d in dates),
            **{"from": opens, "to": closes},
        )
    else:
        problems.append(
            Problem(
                "",
                'expected a window: {"days": ["sun"], "from": "02:00", "to": "04:00"} '
                'or {"start": "2026-12-24T18:00", "end": "2026-12-27T06:00"}',
            )
        )
    out["description"] = _description(body, problems)
    if problems:
        return None, problems
    return out, []


def describe_blackout(doc: Mapping[str, Any]) -> str:
    """One line: ``sun 02:00-04:00 Europe/Berlin`` or ``2026-12-24T18:00 to ... UTC``."""
    zone = doc.get("timezone") or "UTC"
    if doc.get("start"):
        return f"{doc['start']} to {doc['end']} {zone}"
    on = ",".join([*(doc.get("days") or []), *(doc.get("dates") or [])][:8])
    more = " ..." if len(doc.get("days") or []) + len(doc.get("dates") or []) > 8 else ""
    return f"{on}{more} {doc.get('from')}-{doc.get('to')} {zone}"


# --- the book ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalendarBook:
    """What is known of the calendars and blackouts (an agent's copy, a page's read)."""

    calendars: Mapping[str, Calendar] = field(default_factory=dict)
    blackouts: tuple[Blackout, ...] = ()

    @classmethod
    def from_docs(
        cls, calendars: Iterable[Mapping[str, Any]], blackouts: Iterable[Mapping[str, Any]]
    ) -> CalendarBook:
        cals = {str(d["name"]): Calendar.from_doc(d) for d in calendars}
        return cls(cals, tuple(Blackout.from_doc(d) for d in blackouts))

    def allows(self, rule: CalendarRule, day: date) -> bool:
        """Whether a schedule with ``rule`` fires on local date ``day``. A calendar not in the
        book matches no date (a task naming one is refused when saved, and a calendar is not
        deleted while a task names it)."""
        cals = self.calendars
        if rule.only and not any(n in cals and cals[n].matches(day) for n in rule.only):
            return False
        return not any(n in cals and cals[n].matches(day) for n in rule.skip)

    def next_allowed_day(self, rule: CalendarRule, day: date) -> date | None:
        """The first date from ``day`` on that ``rule`` lets through (within DAY_HORIZON)."""
        for n in range(DAY_HORIZON):
            candidate = day + timedelta(days=n)
            if self.allows(rule, candidate):
                return candidate
        return None

    def blackout_at(self, group: str, instant: datetime) -> Blackout | None:
        """The blackout of ``group`` holding ``instant`` (the first by name), or None."""
        for blackout in self.blackouts:
            if blackout.applies_to(group) and blackout.contains(instant):
                return blackout
        return None

    def blackout_end(self, group: str, instant: datetime) -> datetime | None:
        """When the blackouts of ``group`` holding ``instant`` are all over (windows that
        touch are followed), or None when none holds it."""
        end = None
        t = instant
        for _ in range(100):
            ends = [
                w[1]
                for b in self.blackouts
                if b.applies_to(group) and (w := b.window_at(t)) is not None
            ]
            if not ends:
                break
            end = t = max(ends)
        return end


def _zone_of(item: Schedule) -> ZoneInfo:
    return ZoneInfo(getattr(item, "timezone", "UTC") or "UTC")


def _next_item(item: Schedule, t: datetime, book: CalendarBook) -> datetime | None:
    rule = item.window.calendar
    if rule is None:
        return item.next_after(t)
    zone = _zone_of(item)
    cursor = t
    for _ in range(DAY_HORIZON):
        fire = item.next_after(cursor)
        if fire is None:
            return None
        day = fire.astimezone(zone).date()
        if book.allows(rule, day):
            return fire
        allowed = book.next_allowed_day(rule, day + timedelta(days=1))
        if allowed is None:
            return None
        # on to the first instant of the next date it lets through
        opening = _opening_instant(datetime.combine(allowed, time(0)), zone)
        cursor = max(cursor, opening - _EPSILON)
    return None


def has_rules(schedule: ScheduleSet | Schedule) -> bool:
    items = schedule.items if isinstance(schedule, ScheduleSet) else (schedule,)
    return any(item.window.calendar is not None for item in items)


def rule_names(schedule: ScheduleSet | Schedule) -> set[str]:
    """The calendars a schedule names."""
    items = schedule.items if isinstance(schedule, ScheduleSet) else (schedule,)
    return {n for i in items if i.window.calendar is not None for n in i.window.calendar.names()}


def next_fire(
    schedule: ScheduleSet | Schedule, t: datetime, book: CalendarBook | None
) -> datetime | None:
    """The earliest fire strictly after ``t`` whose local date the schedule's calendar rule
    lets through (``book`` None: the rules are not judged)."""
    if book is None or not has_rules(schedule):
        return schedule.next_after(t)
    items = schedule.items if isinstance(schedule, ScheduleSet) else (schedule,)
    fires = [f for f in (_next_item(item, t, book) for item in items) if f is not None]
    return min(fires, default=None)


def preview(
    schedule: ScheduleSet | Schedule,
    group: str,
    start: datetime,
    n: int,
    book: CalendarBook | None,
) -> list[tuple[datetime, str | None]]:
    """The next ``n`` fires after ``start``, each with the blackout that will record it
    ``skipped`` (its name), or None for a fire that runs."""
    out: list[tuple[datetime, str | None]] = []
    t = start
    while len(out) < n:
        fire = next_fire(schedule, t, book)
        if fire is None:
            break
        blackout = book.blackout_at(group, fire) if book is not None else None
        out.append((fire, blackout.name if blackout is not None else None))
        t = fire
    return out


OPEN_TIME_HORIZON = timedelta(days=400)  # open time looked for past its start, at least ...
OPEN_TIME_SPANS = 10  # ... and this many times the time asked for


def open_time_reached(
    schedule: ScheduleSet | Schedule,
    since: datetime,
    seconds: float,
    book: CalendarBook | None,
    group: str,
) -> datetime | None:
    """When ``seconds`` of the time a schedule could run have passed since ``since``: not
    counting the local dates its calendar rule leaves out (a date counts if any of its
    schedules lets it through; a schedule without a rule lets every date through) nor
    ``group``'s blackout windows. A task that runs on workdays only and expects a success
    every 25 hours is not overdue on a Saturday: its Friday success is 25 counted hours old
    on Monday morning. None when that much is not found within the horizon (400 days, or ten
    times the time asked for: a rule that lets (almost) no date through); ``book`` None:
    nothing is left out.

    The walk goes from boundary to boundary: local midnights (where a rule may decide
    otherwise) and the blackouts' openings, kept in a heap (each blackout's next opening is
    computed again only once passed), so many blackouts cost little more than a few."""
    asked = timedelta(seconds=seconds)
    if book is None:
        return since + asked
    items = schedule.items if isinstance(schedule, ScheduleSet) else (schedule,)
    ruled = [(i.window.calendar, _zone_of(i)) for i in items]
    if any(rule is None for rule, _ in ruled):
        ruled = []  # every date is let through by one of them
    windows = [b for b in book.blackouts if b.applies_to(group)]
    openings: list[tuple[datetime, int]] = []  # (next opening, index in windows)
    closes = since  # the latest end of a window found open
    for n, blackout in enumerate(windows):
        held = blackout.window_at(since)
        if held is not None:
            closes = max(closes, held[1])
        if (opening := blackout.next_opening(since)) is not None:
            openings.append((opening, n))
    heapq.heapify(openings)
    remaining = asked
    t = since
    limit = since + max(OPEN_TIME_HORIZON, asked * OPEN_TIME_SPANS)
    while t < limit:
        while openings and openings[0][0] <= max(t, closes):  # windows opening by then
            opened, n = heapq.heappop(openings)
            held = windows[n].window_at(opened)
            if held is not None:
                closes = max(closes, held[1])
            if (following := windows[n].next_opening(opened)) is not None:
                heapq.heappush(openings, (following, n))
        if closes > t:  # in a window: nothing starts, the time does not count
            t = closes
            continue
        dates_end = None  # the next local midnight, where a rule may decide otherwise
        if ruled:
            local = [(rule, t.astimezone(zone).date(), zone) for rule, zone in ruled]
            dates_end = min(
                _opening_instant(datetime.combine(day + timedelta(days=1), time(0)), zone)
                for _, day, zone in local
            )
            if not any(rule is not None and book.allows(rule, day) for rule, day, _ in local):
                t = dates_end
                continue
        stops = [t + remaining, dates_end, openings[0][0] if openings else None]
        stop = min(s for s in stops if s is not None)
        remaining -= stop - t
        if remaining <= timedelta(0):
            return stop
        t = stop
    return None
