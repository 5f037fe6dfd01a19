"""Calendars and blackouts, the pure part: a schedule's calendar rule (time zones, daylight
saving), blackout windows in local time, iCalendar import (RRULE, EXDATE, all-day and timed
events, malformed files), and the agent's scheduler honouring both."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from cloudtask.agent.scheduler import Scheduler
from cloudtask.calendars import (
    Blackout,
    CalendarBook,
    IcsError,
    ics_dates,
    next_fire,
    open_time_reached,
    parse_blackout,
    parse_calendar,
    preview,
)
from cloudtask.schedules import parse_schedule
from cloudtask.task import parse_task

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
WORKDAYS = {"name": "workdays", "weekdays": ["mon", "tue", "wed", "thu", "fri"]}
HOLIDAYS = {"name": "holidays", "dates": ["2026-12-24", "2026-12-25", "2026-12-26"]}


def book(*blackouts: dict, calendars=(WORKDAYS, HOLIDAYS)) -> CalendarBook:
    docs = []
    for b in blackouts:
        doc, problems = parse_blackout(b.pop("name"), b)
        assert not problems, problems
        docs.append(doc)
    return CalendarBook.from_docs(calendars, docs)


def schedule(value: dict):
    parsed, problems = parse_schedule(value)
    assert not problems, problems
    return parsed


def local_fires(value: dict, start: datetime, n: int, b: CalendarBook, zone=BERLIN) -> list[str]:
    out = []
    t = start
    for _ in range(n):
        t = next_fire(schedule(value), t, b)
        if t is None:
            break
        out.append(t.astimezone(zone).strftime("%a %Y-%m-%d %H:%M"))
    return out


# --- the calendar rule -----------------------------------------------------------------------


def test_only_workdays_skip_holidays_in_the_schedules_time_zone():
    value = {
        "cron": "30 0 * * *",
        "timezone": "Europe/Berlin",
        "calendar": {"only": "workdays", "skip": "holidays"},
    }
    # 00:30 in Berlin is the day before in UTC: the local date is what counts
    fires = local_fires(value, datetime(2026, 12, 21, tzinfo=UTC), 6, book())
    assert fires == [
        "Tue 2026-12-22 00:30",
        "Wed 2026-12-23 00:30",
        "Mon 2026-12-28 00:30",  # Thu 24 and Fri 25 are holidays; Sat 26, Sun 27 no workdays
        "Tue 2026-12-29 00:30",
        "Wed 2026-12-30 00:30",
        "Thu 2026-12-31 00:30",
    ]


def test_a_rule_across_the_daylight_saving_changes():
    # Berlin: 2026-03-29 02:00 jumps to 03:00 (a Sunday); 2026-10-25 03:00 goes back to 02:00
    sundays = {"name": "sundays", "weekdays": ["sun"]}
    b = book(calendars=[sundays])
    value = {"cron": "30 2 * * *", "timezone": "Europe/Berlin", "calendar": {"only": "sundays"}}
    spring = local_fires(value, datetime(2026, 3, 27, tzinfo=UTC), 2, b)
    # 02:30 is skipped by the clock: the fire runs once at 03:00, still on that Sunday
    assert spring == ["Sun 2026-03-29 03:00", "Sun 2026-04-05 02:30"]
    autumn = [
        next_fire(schedule(value), datetime(2026, 10, 23, tzinfo=UTC), b),
    ]
    assert autumn[0] == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # its first pass (CEST)
    skip = {"cron": "0 * * * *", "timezone": "Europe/Berlin", "calendar": {"skip": "sundays"}}
    # hourly, skipping the Sunday of the autumn change: from Saturday 23:00 to Monday 00:00
    fires = local_fires(skip, datetime(2026, 10, 24, 20, 30, tzinfo=UTC), 3, b)
    assert fires == ["Sat 2026-10-24 23:00", "Mon 2026-10-26 00:00", "Mon 2026-10-26 01:00"]


def test_an_every_schedule_and_a_list_of_schedules_each_with_its_rule():
    b = book()
    every = {"every": "6h", "timezone": "Europe/Berlin", "calendar": {"skip": "holidays"}}
    fires = local_fires(every, datetime(2026, 12, 23, 17, tzinfo=UTC), 3, b)
    assert fires == ["Wed 2026-12-23 19:00", "Sun 2026-12-27 01:00", "Sun 2026-12-27 07:00"]
    both = [
        {"cron": "0 9 * * *", "calendar": {"only": "workdays"}},
        {"cron": "0 12 * * *", "calendar": {"only": "holidays"}},
    ]
    got = []
    t = datetime(2026, 12, 23, tzinfo=UTC)
    for _ in range(4):
        t = next_fire(schedule(both), t, b)
        got.append(t.strftime("%a %d %H"))
    assert got == ["Wed 23 09", "Thu 24 09", "Thu 24 12", "Fri 25 09"]


def test_a_rule_that_lets_nothing_through_ends_and_none_book_ignores_rules():
    value = {"cron": "* * * * * *", "calendar": {"only": "holidays"}}
    assert next_fire(schedule(value), datetime(2026, 12, 27, tzinfo=UTC), book()) is None
    assert next_fire(schedule(value), datetime(2026, 12, 27, tzinfo=UTC), None) == datetime(
        2026, 12, 27, 0, 0, 1, tzinfo=UTC
    )
    # an unknown calendar matches no date: only lets nothing through, skip skips nothing
    only_unknown = {"cron": "0 3 * * *", "calendar": {"only": "nope"}}
    assert next_fire(schedule(only_unknown), datetime(2026, 1, 1, tzinfo=UTC), book()) is None
    skip_unknown = {"cron": "0 3 * * *", "calendar": {"skip": "nope"}}
    assert next_fire(schedule(skip_unknown), datetime(2026, 1, 1, tzinfo=UTC), book()) == (
        datetime(2026, 1, 1, 3, tzinfo=UTC)
    )


def test_the_rule_is_validated_with_paths_and_round_trips():
    _, problems = parse_schedule(
        {"cron": "0 3 * * *", "calendar": {"only": ["a", "a"], "skip": "b c", "when": 1}}
    )
    assert sorted(p.path for p in problems) == [
        "schedule.calendar.only[1]",
        "schedule.calendar.skip",
        "schedule.calendar.when",
    ]
    _, problems = parse_schedule({"keepalive": True, "calendar": {"only": "a"}})
    assert [p.path for p in problems] == ["schedule.calendar"]
    _, problems = parse_schedule({"cron": "0 3 * * *", "calendar": {"only": "a", "skip": "a"}})
    assert "both in only and in skip" in problems[0].message
    _, problems = parse_schedule({"cron": "0 3 * * *", "calendar": {}})
    assert [p.path for p in problems] == ["schedule.calendar"]
    spec = parse_task(
        {
            "name": "t",
            "command": "true",
            "schedule": {"cron": "0 3 * * *", "calendar": {"only": "workdays", "skip": ["x", "y"]}},
        }
    )
    out = spec.to_dict()["schedule"]
    assert out["calendar"] == {"only": "workdays", "skip": ["x", "y"]}
    assert parse_task({**spec.to_dict()}).to_dict() == spec.to_dict()


# --- calendars and blackouts as stored -------------------------------------------------------


def test_parse_calendar_canonical_and_refusals():
    doc, problems = parse_calendar(
        "de", {"dates": ["2026-12-26", "2026-12-24..2026-12-25"], "weekdays": ["Sunday", "sat"]}
    )
    assert not problems
    assert doc["dates"] == ["2026-12-24", "2026-12-25", "2026-12-26"]
    assert doc["weekdays"] == ["sat", "sun"]
    _, problems = parse_calendar(
        "bad name!",
        {"dates": ["2026-02-30", "tomorrow", "2026-12-31..2026-12-01"], "weekdays": ["funday"]},
    )
    assert sorted(p.path for p in problems) == [
        "dates[0]",
        "dates[1]",
        "dates[2]",
        "name",
        "weekdays[0]",
    ]
    _, problems = parse_calendar("empty", {})
    assert "at least one date or weekday" in problems[0].message
    _, problems = parse_calendar("big", {"dates": ["2000-01-01..2030-01-01"]})
    assert problems and "more than" in problems[0].message


def test_blackouts_weekly_in_local_time_across_daylight_saving():
    b = book(
        {
            "name": "sunday-maint",
            "group": "default",
            "days": ["sun"],
            "from": "02:00",
            "to": "04:00",
            "timezone": "Europe/Berlin",
        }
    )

    def at(text: str, zone=BERLIN, fold=0) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold).astimezone(UTC)

    hit = b.blackout_at("default", at("2026-12-27T02:00"))
    assert hit is not None and hit.name == "sunday-maint"
    assert b.blackout_at("default", at("2026-12-27T03:59")) is not None
    assert b.blackout_at("default", at("2026-12-27T04:00")) is None
    assert b.blackout_at("default", at("2026-12-27T01:59")) is None
    assert b.blackout_at("other", at("2026-12-27T02:30")) is None  # another group
    assert b.blackout_at("default", at("2026-12-26T02:30")) is None  # a Saturday
    # spring forward (2026-03-29): the window is 03:00-04:00 local, one hour
    assert b.blackout_end("default", at("2026-03-29T03:10")) == at("2026-03-29T04:00")
    assert b.blackout_at("default", datetime(2026, 3, 29, 0, 59, tzinfo=UTC)) is None
    assert b.blackout_at("default", datetime(2026, 3, 29, 1, 0, tzinfo=UTC)) is not None
    # fall back (2026-10-25): 02:00-03:00 happens twice, both in the window: three hours
    assert b.blackout_at("default", at("2026-10-25T02:30", fold=1)) is not None
    assert b.blackout_at("default", datetime(2026, 10, 25, 0, 0, tzinfo=UTC)) is not None
    assert b.blackout_at("default", datetime(2026, 10, 25, 2, 59, tzinfo=UTC)) is not None
    assert b.blackout_at("default", datetime(2026, 10, 25, 3, 0, tzinfo=UTC)) is None


def test_blackouts_past_midnight_on_dates_once_and_for_every_group():
    b = book(
        {
            "name": "night",
            "group": "batch",
            "dates": ["2026-12-31"],
            "from": "22:00",
            "to": "02:00",
        },
        {"name": "move", "group": "*", "start": "2027-01-10T08:00", "end": "2027-01-10T12:30"},
    )
    assert b.blackout_at("batch", datetime(2027, 1, 1, 1, 59, tzinfo=UTC)).name == "night"
    assert b.blackout_at("batch", datetime(2027, 1, 1, 2, 0, tzinfo=UTC)) is None
    assert b.blackout_at("batch", datetime(2026, 12, 30, 23, 0, tzinfo=UTC)) is None
    assert b.blackout_at("anything", datetime(2027, 1, 10, 12, 29, tzinfo=UTC)).name == "move"
    assert b.blackout_end("batch", datetime(2026, 12, 31, 22, 0, tzinfo=UTC)) == datetime(
        2027, 1, 1, 2, 0, tzinfo=UTC
    )


def test_the_next_opening_of_a_window_weekly_across_daylight_saving_dated_and_once():
    def window(**body) -> Blackout:
        doc, problems = parse_blackout("w", {"group": "*", **body})
        assert not problems, problems
        return Blackout.from_doc(doc)

    sunday = window(days=["sun"], **{"from": "02:00", "to": "04:00"}, timezone="Europe/Berlin")
    # from a Thursday: the coming Sunday at 02:00 Berlin time (winter: 01:00 UTC)
    assert sunday.next_opening(datetime(2026, 12, 24, 12, tzinfo=UTC)) == datetime(
        2026, 12, 27, 1, tzinfo=UTC
    )
    # while one is open, the next one is a week later
    assert sunday.next_opening(datetime(2026, 12, 27, 2, tzinfo=UTC)) == datetime(
        2027, 1, 3, 1, tzinfo=UTC
    )
    # 02:00 does not exist on 2026-03-29 in Berlin: the window opens when the clock jumps
    assert sunday.next_opening(datetime(2026, 3, 28, tzinfo=UTC)) == datetime(
        2026, 3, 29, 1, tzinfo=UTC
    )
    dated = window(dates=["2026-12-31"], **{"from": "22:00", "to": "02:00"})
    assert dated.next_opening(datetime(2026, 12, 1, tzinfo=UTC)) == datetime(
        2026, 12, 31, 22, tzinfo=UTC
    )
    assert dated.next_opening(datetime(2026, 12, 31, 22, tzinfo=UTC)) is None  # all behind
    once = window(start="2027-01-10T08:00", end="2027-01-10T12:30", timezone="Europe/Berlin")
    assert once.next_opening(datetime(2027, 1, 1, tzinfo=UTC)) == datetime(
        2027, 1, 10, 7, tzinfo=UTC
    )
    assert once.next_opening(datetime(2027, 1, 10, 7, tzinfo=UTC)) is None


def test_open_time_leaves_out_the_dates_a_rule_skips_and_the_blackouts():
    b = book(
        {"name": "night", "group": "g", "days": ["wed"], "from": "00:00", "to": "06:00"},
        calendars=(WORKDAYS, HOLIDAYS),
    )
    rule = {"only": "workdays", "skip": "holidays"}
    (workdays,) = parse_schedule({"cron": "0 6 * * *", "calendar": rule})[0].items
    friday = datetime(2026, 12, 18, 12, tzinfo=UTC)
    # Friday noon + 24 open hours: Friday's 12 hours, then Monday's first 12
    assert open_time_reached(workdays, friday, 24 * 3600, b, "g") == datetime(
        2026, 12, 21, 12, tzinfo=UTC
    )
    # over Christmas (24th-26th, then the weekend): from Wednesday the 23rd at noon, 36 hours
    # are the 23rd's 12, then Monday the 28th's 24
    wednesday = datetime(2026, 12, 23, 12, tzinfo=UTC)
    assert open_time_reached(workdays, wednesday, 36 * 3600, b, "g") == datetime(
        2026, 12, 29, 0, tzinfo=UTC
    )
    # Wednesday's 00:00-06:00 window of group g does not count either
    tuesday = datetime(2026, 12, 15, 20, tzinfo=UTC)
    assert open_time_reached(workdays, tuesday, 6 * 3600, b, "g") == datetime(
        2026, 12, 16, 8, tzinfo=UTC
    )
    assert open_time_reached(workdays, tuesday, 6 * 3600, b, "other") == datetime(
        2026, 12, 16, 2, tzinfo=UTC
    )
    # a schedule with a rule-free part lets every date through; no book leaves nothing out
    both = parse_schedule([{"cron": "0 6 * * *", "calendar": rule}, {"every": "1h"}])[0]
    assert open_time_reached(both, friday, 24 * 3600, b, "x") == friday + timedelta(days=1)
    assert open_time_reached(workdays, friday, 3600, None, "g") == friday + timedelta(hours=1)
    # local dates: a Berlin workday begins at 23:00 UTC the day before (in winter)
    (berlin,) = parse_schedule(
        {"cron": "0 6 * * *", "timezone": "Europe/Berlin", "calendar": {"only": "workdays"}}
    )[0].items
    saturday = datetime(2026, 12, 19, 12, tzinfo=UTC)
    assert open_time_reached(berlin, saturday, 3600, b, "x") == datetime(
        2026, 12, 21, 0, tzinfo=UTC
    )
    # a long span is found past the 400 days of the horizon (300 workdays' worth: 420 days)
    long = open_time_reached(workdays, friday, 300 * 86400, b, "x")
    assert long is not None and long - friday > timedelta(days=400)
    # a rule that lets no date through never reaches it
    nothing = CalendarBook.from_docs([{"name": "never", "dates": ["2000-01-01"]}], [])
    (never,) = parse_schedule({"every": "1h", "calendar": {"only": "never"}})[0].items
    assert open_time_reached(never, friday, 60, nothing, "g") is None


def test_a_calendar_of_too_many_entries_is_refused_without_reading_them_all():
    import time as clock

    started = clock.perf_counter()
    _, problems = parse_calendar("big", {"dates": ["2026-01-01..2039-09-08"] * 4000})
    assert [str(p) for p in problems] == ["dates: at most 5000 dates"]
    _, problems = parse_calendar("big", {"dates": ["2026-01-01"] * 5001})
    assert [str(p) for p in problems] == ["dates: 5001 entries; at most 5000 dates"]
    assert clock.perf_counter() - started < 5  # (it took 8 s reading each range)
    _, problems = parse_calendar("bad", {"dates": ["nope"] * 100})
    assert (
        len(problems) == 21 and str(problems[-1]) == "dates: and 80 more entries that are not dates"
    )


def test_parse_blackout_refusals():
    cases = {
        "no window": ({"group": "g"}, ""),
        "both forms": ({"group": "g", "days": ["sun"], "start": "2026-01-01T00:00"}, ""),
        "bad day": ({"group": "g", "days": ["someday"]}, "days[0]"),
        "bad clock": ({"group": "g", "days": ["sun"], "from": "25:00"}, "from"),
        "same": ({"group": "g", "days": ["sun"], "from": "02:00", "to": "02:00"}, "to"),
        "order": ({"group": "g", "start": "2026-01-02T00:00", "end": "2026-01-01T00:00"}, "end"),
        "long": ({"group": "g", "start": "2026-01-01T00:00", "end": "2026-03-01T00:00"}, "end"),
        "zone": ({"group": "g", "days": ["sun"], "timezone": "Mars/Base"}, "timezone"),
        "group": ({"group": "", "days": ["sun"]}, "group"),
        "key": ({"group": "g", "days": ["sun"], "weekly": True}, "weekly"),
    }
    for label, (body, path) in cases.items():
        doc, problems = parse_blackout("b", body)
        assert doc is None and path in [p.path for p in problems], (label, problems)


def test_preview_marks_the_fires_a_blackout_skips():
    b = book(
        {
            "name": "maint",
            "group": "default",
            "days": ["sun"],
            "from": "02:00",
            "to": "04:00",
            "timezone": "Europe/Berlin",
        }
    )
    fires = preview(
        schedule({"cron": "0 * * * *", "timezone": "Europe/Berlin"}),
        "default",
        datetime(2026, 12, 27, 0, 30, tzinfo=UTC),  # 01:30 Berlin
        4,
        b,
    )
    assert [(f.astimezone(BERLIN).hour, name) for f, name in fires] == [
        (2, "maint"),
        (3, "maint"),
        (4, None),
        (5, None),
    ]


# --- iCalendar import ------------------------------------------------------------------------


def ics(*events: str) -> bytes:
    body = "".join(f"BEGIN:VEVENT\r\n{e.strip()}\r\nEND:VEVENT\r\n" for e in events)
    return (
        f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n{body}END:VCALENDAR\r\n".encode()
    )


TODAY = date(2026, 12, 1)


def test_ics_all_day_events_with_rrule_and_exdate():
    data = ics(
        "UID:xmas\r\nSUMMARY:Christmas\r\nDTSTART;VALUE=DATE:20251225\r\nDTEND;VALUE=DATE:20251227\r\n"
        "RRULE:FREQ=YEARLY\r\nEXDATE;VALUE=DATE:20271225",
        "UID:ny\r\nSUMMARY:New Year\r\nDTSTART;VALUE=DATE:20270101",  # no DTEND: one day
    )
    days = [d.isoformat() for d in ics_dates(data, TODAY)]
    assert days == [
        "2025-12-25",
        "2025-12-26",
        "2026-12-25",
        "2026-12-26",
        "2027-01-01",
        "2028-12-25",  # 2027 was excluded (EXDATE removes the whole occurrence)
        "2028-12-26",  # (2029-12-25 is past the horizon: three years ahead)
    ]


def test_ics_timed_events_take_the_local_dates_and_the_horizon_is_bounded():
    timed = ics(
        "UID:a\r\nDTSTART:20261231T230000Z\r\nDTEND:20270101T010000Z",  # 00:00-02:00 in Berlin
        "UID:b\r\nDTSTART;TZID=Europe/Berlin:20261210T220000\r\n"
        "DTEND;TZID=Europe/Berlin:20261211T000000",  # ends at midnight: one date
    )
    assert ics_dates(timed, TODAY, "Europe/Berlin") == [date(2026, 12, 10), date(2027, 1, 1)]
    # read in UTC, the first one covers two dates
    assert ics_dates(timed, TODAY) == [date(2026, 12, 10), date(2026, 12, 31), date(2027, 1, 1)]
    daily = ics("UID:c\r\nDTSTART;VALUE=DATE:20200101\r\nRRULE:FREQ=DAILY")
    days = ics_dates(daily, TODAY)
    assert min(days) == TODAY - timedelta(days=366)
    assert max(days) == TODAY + timedelta(days=3 * 366)
    assert len(days) == 4 * 366 + 1


@pytest.mark.parametrize(
    ("data", "where", "what"),
    [
        (b"hello world", "line 1", "not an iCalendar line"),
        (b"", "file", "starts with BEGIN:VCALENDAR"),
        (
            b"BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:2026xx\nEND:VEVENT\nEND:VCALENDAR\n",
            "line 3",
            "DTSTART",
        ),
        (
            b"BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20260101\nRRULE:FREQ=SOMETIMES\nEND:VEVENT\nEND:VCALENDAR\n",
            "line 4",
            "RRULE",
        ),
        (
            b"BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20260101\nEND:VCALENDAR\n",
            "line 4",
            "BEGIN:VEVENT at line 2 is open",
        ),
        (
            b"BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:abc\nEND:VEVENT\nEND:VCALENDAR\n",
            "file",
            "event abc has no DTSTART",
        ),
        (b"BEGIN:VCALENDAR\nVERSION:2.0\n\xff\xfe\nEND:VCALENDAR\n", "line 3", "not UTF-8"),
        (b"BEGIN:VCALENDAR\nVERSION:2.0\nEND:VCALENDAR\n", "file", "no events"),
        (
            b"BEGIN:VCALENDAR\nEND:VCALENDAR\nBEGIN:VCALENDAR\nEND:VCALENDAR\n",
            "line 3",
            "after END:VCALENDAR",
        ),
        (
            b"BEGIN:VCALENDAR\n" + b"X-PAD:" + b"a" * (1024 * 1024) + b"\nEND:VCALENDAR\n",
            "file",
            "larger than",
        ),
    ],
)
def test_malformed_ics_files_are_refused_saying_where(data, where, what):
    with pytest.raises(IcsError) as e:
        ics_dates(data, TODAY)
    assert any(p.path == where and what in p.message for p in e.value.problems), e.value.problems


# --- the agent's scheduler -------------------------------------------------------------------


class Feed:
    def __init__(self, b: CalendarBook) -> None:
        self.book = b


def task(value: dict, group: str = "default"):
    return parse_task({"name": "t", "group": group, "command": "true", "schedule": value})


def test_the_scheduler_skips_excluded_dates_and_records_blackout_fires_skipped():
    feed = Feed(
        book(
            {
                "name": "maint",
                "group": "default",
                "start": "2026-12-23T10:00:02",
                "end": "2026-12-23T10:00:05",
            }
        )
    )
    sched = Scheduler(calendars=feed)
    now = datetime(2026, 12, 23, 10, 0, 0, tzinfo=UTC)
    sched.upsert("t1", task({"every": "1s"}), revision=1, now=now)
    seen = []
    for k in range(1, 8):
        fires, _ = sched.tick(now + timedelta(seconds=k))
        seen += [(f.scheduled_for.second, f.status, f.note) for f in fires]
    assert seen == [
        (1, None, None),
        (2, "skipped", "blackout maint"),
        (3, "skipped", "blackout maint"),
        (4, "skipped", "blackout maint"),
        (5, None, None),
        (6, None, None),
        (7, None, None),
    ]
    # a calendar rule: a fire on a holiday does not exist
    sched.upsert(
        "t2", task({"cron": "0 3 * * *", "calendar": {"skip": "holidays"}}), revision=1, now=now
    )
    assert sched.next_fire("t2") == datetime(2026, 12, 27, 3, tzinfo=UTC)
    # the book changes: refresh plans the next fire again
    feed.book = CalendarBook.from_docs(
        [WORKDAYS, {"name": "holidays", "dates": ["2026-12-30"]}], []
    )
    sched.refresh(now)
    assert sched.next_fire("t2") == datetime(2026, 12, 24, 3, tzinfo=UTC)


def test_a_keepalive_waits_for_the_end_of_a_blackout_and_retries_in_one_are_skipped():
    feed = Feed(
        book(
            {
                "name": "m",
                "group": "default",
                "start": "2026-12-23T10:00:00",
                "end": "2026-12-23T10:05:00",
            }
        )
    )
    sched = Scheduler(calendars=feed)
    now = datetime(2026, 12, 23, 10, 1, tzinfo=UTC)
    sched.upsert("k", task({"keepalive": True}), revision=1, now=now)
    fires, _ = sched.tick(now)
    assert fires == []
    assert sched.next_fire("k") == datetime(2026, 12, 23, 10, 5, tzinfo=UTC)
    fires, _ = sched.tick(datetime(2026, 12, 23, 10, 5, tzinfo=UTC))
    assert [f.trigger for f in fires] == ["schedule"]
    sched.upsert("r", task({"cron": "0 3 * * *"}), revision=1, now=now)
    sched.retry("r", datetime(2026, 12, 23, 3, tzinfo=UTC), 1, now)
    fires, _ = sched.tick(now)
    assert [(f.trigger, f.status, f.note) for f in fires] == [("retry", "skipped", "blackout m")]


def test_blackout_from_doc_round_trip():
    doc, _ = parse_blackout("w", {"group": "g", "days": ["mon"], "from": "23:00", "to": "24:00"})
    blackout = Blackout.from_doc(doc)
    assert blackout.closes is None and blackout.opens.hour == 23
    assert blackout.contains(datetime(2026, 12, 21, 23, 59, tzinfo=UTC))
    assert not blackout.contains(datetime(2026, 12, 22, 0, 0, tzinfo=UTC))


def test_a_claim_made_ahead_starts_only_if_the_new_revision_has_its_fire():
    from cloudtask.agent.scheduler import has_fire

    at = datetime(2026, 12, 24, 3, tzinfo=UTC)
    plain = task({"cron": "0 3 * * *"})
    ruled = task({"cron": "0 3 * * *", "calendar": {"skip": "holidays"}})
    assert has_fire(plain, at, book()) and has_fire(ruled, at, None)
    assert not has_fire(ruled, at, book())  # the 24th is a holiday now
