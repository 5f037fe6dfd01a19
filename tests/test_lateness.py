"""Lateness alerts: the deadline's day windows (pure), and the leader's checks
(cloudtask/center/lateness.py) on a real store with a clock the test moves.

The checks are driven as the leader's upkeep drives them (``Lateness.check`` on the tasks the
task feed read); what they record is read back from the events and ``lateness`` collections,
and a second ``Lateness`` on the same store plays the next leader."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import run_document

from cloudtask.center import lateness as lateness_module
from cloudtask.center.lateness import Lateness, had_chance
from cloudtask.center.tasks import refresh_tasks
from cloudtask.deadlines import (
    DeadlineSpec,
    day_window,
    deadline_problems,
    last_window,
    local_instant,
    next_deadline,
    parse_deadline,
    task_timezone,
)
from cloudtask.exceptions import StoreError
from cloudtask.notify import content
from cloudtask.task import parse_task, validate_task

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- deadlines: parsing ---------------------------------------------------------------------


def test_deadline_forms_and_their_canonical_value():
    assert parse_deadline("06:00").to_value() == "06:00"
    assert parse_deadline("6:05").to_value() == "06:05"
    assert parse_deadline("06:00 mon-fri").to_value() == "06:00 mon-fri"
    assert parse_deadline("23:59 sat, sun").to_value() == "23:59 sat,sun"
    assert parse_deadline("06:00 fri-mon").days == frozenset({4, 5, 6, 0})
    spec = parse_deadline({"at": "06:00", "days": "mon-fri", "timezone": "Europe/Berlin"})
    assert spec.to_value() == {"at": "06:00", "timezone": "Europe/Berlin", "days": "mon-fri"}
    assert parse_deadline(spec.to_value()) == spec
    assert parse_deadline({"at": "00:00", "days": ["mon", "wed-thu"]}).to_value() == (
        "00:00 mon,wed,thu"
    )


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ("24:00", "", "HH:MM"),
        ("06:60", "", "HH:MM"),
        ("six", "", "HH:MM"),
        ("06:00 weekdays", "", "is not a day"),
        ("06:00 mon-xyz", "", "is not a day"),
        (6, "", "expected"),
        ([], "", "expected"),
        ({"days": "mon"}, "at", "required"),
        ({"at": "06:00", "timezone": "Mars/Base"}, "timezone", "unknown timezone"),
        ({"at": "06:00", "days": 3}, "days", "expected days"),
        ({"at": "06:00", "when": 1}, "when", "unknown key"),
    ],
)
def test_bad_deadlines_say_what_is_wrong_and_where(value, path, words):
    spec, problems = deadline_problems(value)
    assert spec is None
    assert any(p == path and words in m for p, m in problems), problems
    task = {"name": "t", "schedule": {"every": "1h"}, "command": "true", "deadline": value}
    where = f"deadline.{path}" if path else "deadline"
    assert any(p.path == where and words in p.message for p in validate_task(task))


def test_the_task_fields_are_validated_with_their_paths():
    base = {"name": "t", "schedule": {"every": "1h"}, "command": "true"}
    spec = parse_task({**base, "warn_after": "90s", "deadline": "06:00", "expect_every": "6h"})
    assert (spec.warn_after, spec.expect_every) == (90.0, 21600.0)
    assert spec.to_dict()["warn_after"] == "1m30s"
    assert parse_task(spec.to_dict()) == spec

    def problems(**more: Any) -> list[str]:
        return [str(p) for p in validate_task({**base, **more})]

    assert problems(warn_after="1h", timeout="10m") == [
        "warn_after: must be shorter than the timeout (10m): the run is killed before it "
        "would alert"
    ]
    assert problems(warn_after="soon")[0].startswith("warn_after: 'soon' is not a duration")
    assert problems(expect_every="500ms") == ["expect_every: must be at least 1s"]
    assert problems(expect_every=0)[0].startswith("expect_every: must be more than 0")
    assert problems(warn_after=None, deadline=None, expect_every=None) == []


def test_the_task_timezone_is_its_first_schedule_that_names_one():
    assert task_timezone({"cron": "0 3 * * *", "timezone": "Europe/Berlin"}) == "Europe/Berlin"
    assert task_timezone(
        [{"at": "2026-12-01T00:00:00Z"}, {"every": "1h", "timezone": "Asia/Tokyo"}]
    ) == ("Asia/Tokyo")
    assert task_timezone({"every": "1h"}) == "UTC"
    assert task_timezone(None) == "UTC"


# --- deadlines: day windows -----------------------------------------------------------------


def test_a_day_is_the_24_hours_ending_at_the_deadline():
    spec = parse_deadline("06:00")
    w = day_window(spec, "Europe/Berlin", date(2026, 12, 4))
    assert w.opens == utc(2026, 12, 3, 5) and w.closes == utc(2026, 12, 4, 5)
    # the latest deadline at or before now: today's once it passed, else yesterday's
    assert last_window(spec, "Europe/Berlin", utc(2026, 12, 4, 5)).day == date(2026, 12, 4)
    assert last_window(spec, "Europe/Berlin", utc(2026, 12, 4, 4, 59)).day == date(2026, 12, 3)
    assert next_deadline(spec, "Europe/Berlin", utc(2026, 12, 4, 5)) == utc(2026, 12, 5, 5)


def test_across_the_spring_forward_night_in_berlin_the_day_is_23_hours():
    spec = parse_deadline("06:00")
    w = day_window(spec, "Europe/Berlin", date(2026, 3, 29))  # clocks jump 02:00 -> 03:00
    assert w.opens == utc(2026, 3, 28, 5)  # 06:00 CET
    assert w.closes == utc(2026, 3, 29, 4)  # 06:00 CEST
    assert w.closes - w.opens == timedelta(hours=23)


def test_across_the_fall_back_night_in_berlin_the_day_is_25_hours():
    spec = parse_deadline("06:00")
    w = day_window(spec, "Europe/Berlin", date(2026, 10, 25))  # 03:00 -> 02:00
    assert w.closes - w.opens == timedelta(hours=25)


def test_a_deadline_the_clocks_skip_falls_at_the_jump_and_a_repeated_one_on_its_first():
    skipped = local_instant(date(2026, 3, 29), time(2, 30), BERLIN)
    assert skipped == utc(2026, 3, 29, 1)  # 03:00 CEST, the first instant after the gap
    repeated = local_instant(date(2026, 10, 25), time(2, 30), BERLIN)
    assert repeated == utc(2026, 10, 25, 0, 30)  # 02:30 CEST, the first of the two
    spec = parse_deadline("02:30")
    w = day_window(spec, "Europe/Berlin", date(2026, 3, 29))
    assert w.closes == utc(2026, 3, 29, 1) and w.opens == utc(2026, 3, 28, 1, 30)
    nxt = day_window(spec, "Europe/Berlin", date(2026, 3, 30))
    assert nxt.opens == w.closes  # the days follow each other, no gap, no overlap


def test_deadlines_near_midnight():
    late = parse_deadline("23:59")
    w = last_window(late, "Europe/Berlin", utc(2026, 12, 31, 23, 30))  # 00:30 on Jan 1
    assert w.day == date(2026, 12, 31) and w.closes == utc(2026, 12, 31, 22, 59)
    midnight = parse_deadline("00:00")
    w = last_window(midnight, "Europe/Berlin", utc(2026, 12, 31, 23, 0))  # 00:00 Jan 1 Berlin
    assert w.day == date(2027, 1, 1) and w.closes == utc(2026, 12, 31, 23)
    assert w.opens == utc(2026, 12, 30, 23)
    # in UTC a minute before midnight is still the day before's window
    w = last_window(midnight, "UTC", utc(2027, 1, 1, 23, 59))
    assert w.day == date(2027, 1, 1)


def test_deadline_days_skip_the_others_and_its_own_zone_wins():
    weekdays = parse_deadline("06:00 mon-fri")
    saturday_noon = utc(2026, 12, 5, 12)  # a Saturday
    w = last_window(weekdays, "UTC", saturday_noon)
    assert w.day == date(2026, 12, 4)  # Friday's; the window is still Thursday 06:00 ->
    assert w.opens == utc(2026, 12, 3, 6)
    assert next_deadline(weekdays, "UTC", saturday_noon) == utc(2026, 12, 7, 6)  # Monday
    tokyo = DeadlineSpec(time(6, 0), timezone="Asia/Tokyo")
    assert last_window(tokyo, "Europe/Berlin", utc(2026, 12, 4, 22)).closes == utc(2026, 12, 4, 21)


def test_a_task_created_during_the_day_is_held_to_it_only_if_it_had_a_fire():
    closes = utc(2026, 12, 4, 6)
    nightly = {"cron": "0 3 * * *"}
    assert had_chance(nightly, utc(2026, 12, 4, 2), closes)  # 03:00 came after it
    assert not had_chance(nightly, utc(2026, 12, 4, 4), closes)  # created after 03:00
    assert had_chance({"every": "30s"}, utc(2026, 12, 4, 5, 59), closes)


# --- the checks on a real store -------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def no_fence() -> None:
    pass


T0 = utc(2026, 12, 3, 12)  # a Thursday, 13:00 in Berlin


def task(store, name: str, created: datetime, **spec: Any) -> dict[str, Any]:
    data = {"name": name, "schedule": {"cron": "0 3 * * *"}, "command": "true", **spec}
    return store.create_task(data, now=created)


def feed(store) -> dict:
    tasks: dict = {}
    refresh_tasks(store, tasks)
    return tasks


def events(store, kind: str | None = None) -> list[dict[str, Any]]:
    query = (
        {"kind": kind} if kind else {"kind": {"$regex": r"^(run\.slow|task\.(deadline|overdue))"}}
    )
    return list(store.events.find(query).sort("ts", 1))


def check(lateness: Lateness, store) -> None:
    lateness._checked_at = -1e9  # due now, whatever the interval
    lateness._looked.clear()  # and every task's successes may be read again
    lateness.check(feed(store), no_fence)


def success(store, t: dict, fired: datetime, took: float = 60.0, status: str = "succeeded"):
    run = run_document(t, fired, status=status, agent="a1")
    run.update(started_at=fired, finished_at=fired + timedelta(seconds=took), duration=took)
    store.runs.insert_one(run)
    return run


def test_a_slow_run_is_alerted_once_then_its_end(store):
    clock = Clock(T0)
    t = task(store, "slow-job", T0 - timedelta(hours=1), warn_after="30m")
    other = task(store, "quiet-job", T0 - timedelta(hours=1))  # sets no field: not watched
    run = run_document(t, T0, agent="a1")
    run.update(status="running", started_at=T0)
    store.runs.insert_one(run)
    theirs = run_document(other, T0, agent="a1")
    theirs.update(status="running", started_at=T0 - timedelta(hours=5))
    store.runs.insert_one(theirs)
    lateness = Lateness(store, clock=clock)

    clock.advance(minutes=29)
    check(lateness, store)
    assert events(store) == []
    clock.advance(minutes=2)
    check(lateness, store)
    check(lateness, store)
    (slow,) = events(store)
    assert slow["kind"] == "run.slow" and slow["run_id"] == run["_id"]
    assert slow["severity"] == "warning" and slow["details"]["warn_after"] == 1800
    assert "still running on agent a1 after 31m" in slow["message"]
    subject = content.event_subject(slow)
    assert subject.startswith("[CloudTask] SLOW slow-job still running after 31m (warn after 30m)")
    assert store.runs.find_one({"_id": run["_id"]})["status"] == "running"  # not killed

    # a new leader (a fresh Lateness on the same store) does not alert it again
    successor = Lateness(store, clock=clock)
    check(successor, store)
    assert len(events(store)) == 1

    store.runs.update_one(
        {"_id": run["_id"]},
        {
            "$set": {
                "status": "succeeded",
                "finished_at": T0 + timedelta(minutes=40),
                "duration": 2400.0,
            }
        },
    )
    check(successor, store)
    check(successor, store)
    kinds = [e["kind"] for e in events(store)]
    assert kinds == ["run.slow", "run.slow_ended"]
    ended = events(store, "run.slow_ended")[0]
    assert ended["details"]["status"] == "succeeded"
    assert content.event_subject(ended).startswith(
        "[CloudTask] SLOW RUN ENDED slow-job succeeded after 40m"
    )
    assert store.db["lateness"].find_one({"_id": t["_id"]})["slow"] == []


def test_the_run_of_a_one_shot_task_that_left_the_placement_is_still_watched(store):
    clock = Clock(T0)
    t = task(store, "once", T0, schedule={"at": "2026-12-03T12:00:01Z"}, warn_after="10m")
    lateness = Lateness(store, clock=clock)
    check(lateness, store)  # seen placed: it warns
    run = run_document(t, T0, agent="a1")
    run.update(status="running", started_at=T0)
    store.runs.insert_one(run)
    store.tasks.update_one({"_id": t["_id"]}, {"$set": {"done_at": T0}})  # fired: done
    assert feed(store) == {}
    clock.advance(minutes=11)
    successor = Lateness(store, clock=clock)  # a new leader never saw it placed
    check(successor, store)
    assert [e["kind"] for e in events(store)] == ["run.slow"]
    store.runs.update_one(
        {"_id": run["_id"]},
        {"$set": {"status": "failed", "finished_at": clock.now, "duration": 660.0}},
    )
    check(successor, store)
    assert [e["kind"] for e in events(store)] == ["run.slow", "run.slow_ended"]
    assert "ended failed after 11m" in events(store)[1]["message"]


def test_overdue_counts_from_creation_then_from_the_last_success(store):
    created = T0
    clock = Clock(created + timedelta(minutes=30))
    t = task(store, "hourly-sync", created, expect_every="1h")
    lateness = Lateness(store, clock=clock)
    check(lateness, store)
    assert events(store) == []  # 30 minutes since it was created: not overdue

    clock.now = created + timedelta(minutes=61)
    check(lateness, store)
    check(lateness, store)
    (overdue,) = events(store)
    assert overdue["kind"] == "task.overdue" and overdue["task_id"] == t["_id"]
    assert overdue["details"]["since"].startswith("2026-12-03T12:00:00")  # its creation
    assert overdue["details"]["since_success"] is False
    assert content.event_subject(overdue) == (
        "[CloudTask] OVERDUE hourly-sync has not succeeded for 1h1m (expected every 1h)"
    )
    body = content.event_body(overdue, store.find_task(t["_id"]), "https://ct.example.com")
    assert "Quiet since: 2026-12-03 12:00:00 UTC (created or resumed)" in body

    # a failure is no recovery; a success is, once
    success(store, t, created + timedelta(minutes=62), status="failed")
    clock.now = created + timedelta(minutes=65)
    check(lateness, store)
    assert len(events(store)) == 1
    good = success(store, t, created + timedelta(minutes=64), took=30)
    check(lateness, store)
    check(lateness, store)
    kinds = [e["kind"] for e in events(store)]
    assert kinds == ["task.overdue", "task.overdue_recovered"]
    recovered = events(store, "task.overdue_recovered")[0]
    assert recovered["run_id"] == good["_id"] and recovered["severity"] == "info"
    assert content.event_subject(recovered) == (
        "[CloudTask] RECOVERED hourly-sync succeeded again after 1h4m30s"
    )

    # from that success on, the next silence counts from it
    clock.now = created + timedelta(minutes=64, seconds=30) + timedelta(minutes=59)
    check(lateness, store)
    assert len(events(store)) == 2
    clock.advance(minutes=2)
    check(lateness, store)
    second = events(store, "task.overdue")
    assert len(second) == 2 and second[1]["details"]["since_success"] is True
    assert second[1]["_id"] != second[0]["_id"]


def test_a_paused_task_is_not_overdue_and_counts_again_from_its_resume(store):
    clock = Clock(T0)
    t = task(store, "paused-job", T0 - timedelta(days=2), expect_every="1h")
    lateness = Lateness(store, clock=clock)
    spec = {**t["spec"], "enabled": False}
    store.replace_task(t["_id"], spec, now=T0)
    check(lateness, store)  # paused: not looked at
    clock.advance(hours=5)
    check(lateness, store)
    assert events(store) == []
    store.replace_task(t["_id"], {**spec, "enabled": True}, now=clock.now)
    clock.advance(minutes=59)
    check(lateness, store)
    assert events(store) == []  # counted from the resume, not from its creation
    clock.advance(minutes=2)
    check(lateness, store)
    assert [e["kind"] for e in events(store)] == ["task.overdue"]


def test_a_missed_deadline_is_alerted_once_for_its_day_then_its_recovery(store):
    # the task runs nightly at 03:00 Berlin time and must have succeeded by 06:00
    zone = {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}
    t = task(store, "nightly-report", utc(2026, 12, 1), schedule=zone, deadline="06:00")
    clock = Clock(utc(2026, 12, 4, 4, 59))  # 05:59 in Berlin
    lateness = Lateness(store, clock=clock)
    check(lateness, store)
    # yesterday's deadline was missed too (nothing ever ran): one alert, for Dec 3
    (first,) = events(store)
    assert first["details"]["day"] == "2026-12-03"
    clock.now = utc(2026, 12, 4, 5, 0, 1)
    check(lateness, store)
    check(lateness, store)
    missed = events(store, "task.deadline_missed")
    assert [e["details"]["day"] for e in missed] == ["2026-12-03", "2026-12-04"]
    today = missed[1]
    assert today["_id"] == f"task.deadline_missed:{t['_id']}:2026-12-04"
    assert content.event_subject(today) == (
        "[CloudTask] LATE nightly-report missed its 06:00 deadline (Europe/Berlin) of 2026-12-04"
    )
    body = content.event_body(today, store.find_task(t["_id"]), "https://ct.example.com")
    assert "Deadline:    06:00 Europe/Berlin on 2026-12-04" in body
    assert "Window:      runs fired from 2026-12-03 05:00:00 UTC" in body

    # a new leader does not alert it again
    successor = Lateness(store, clock=clock)
    check(successor, store)
    assert len(events(store, "task.deadline_missed")) == 2

    # a success fired before the window opened is no recovery; one fired in it is
    success(store, t, utc(2026, 12, 3, 4, 59), took=10)
    check(successor, store)
    assert events(store, "task.deadline_recovered") == []
    late = success(store, t, utc(2026, 12, 4, 5, 20), took=600)
    clock.now = utc(2026, 12, 4, 5, 31)
    check(successor, store)
    check(successor, store)
    (recovered,) = events(store, "task.deadline_recovered")
    assert recovered["run_id"] == late["_id"] and recovered["details"]["day"] == "2026-12-04"
    assert "succeeded, 30m after the deadline" in recovered["message"]
    assert content.event_subject(recovered) == (
        "[CloudTask] DONE LATE nightly-report succeeded after its 06:00 deadline "
        "(Europe/Berlin) of 2026-12-04"
    )

    # the next day it succeeds in time: no alert
    success(store, t, utc(2026, 12, 5, 2), took=60)
    clock.now = utc(2026, 12, 5, 5, 0, 5)
    check(successor, store)
    assert len(events(store)) == 3
    state = store.db["lateness"].find_one({"_id": t["_id"]})
    assert state["deadline"]["day"] == "2026-12-05" and state["deadline"]["status"] == "met"


def test_a_task_created_after_its_last_fire_of_the_day_is_not_held_to_that_day(store):
    zone = {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}
    # created at 04:00 Berlin: the 03:00 fire had passed, so its 06:00 deadline is not due
    t = task(store, "new-report", utc(2026, 12, 4, 3), schedule=zone, deadline="06:00")
    clock = Clock(utc(2026, 12, 4, 5, 1))
    lateness = Lateness(store, clock=clock)
    check(lateness, store)
    assert events(store) == []
    state = store.db["lateness"].find_one({"_id": t["_id"]})
    assert state["deadline"]["status"] == "skipped"
    clock.now = utc(2026, 12, 5, 5, 1)  # the next day it is
    check(lateness, store)
    assert [e["details"]["day"] for e in events(store)] == ["2026-12-05"]


def test_a_day_the_calendar_skips_or_a_blackout_covers_asks_nothing_of_the_deadline(store):
    """2026-12-04 is a holiday of the task's calendar: no fire that day, no deadline. On
    2026-12-05 the only fire falls in its group's maintenance window (recorded skipped by
    the agent): no deadline either. On 2026-12-06 it had its chance and missed it."""
    from cloudtask.operations import Operations

    ops = Operations(store)
    ops.set_calendar("test", "holidays", {"dates": ["2026-12-04"]})
    ops.set_blackout(
        "test",
        "maint",
        {"group": "default", "dates": ["2026-12-05"], "from": "02:00", "to": "04:00",
         "timezone": "Europe/Berlin"},
    )  # fmt: skip
    schedule = {
        "cron": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "calendar": {"skip": "holidays"},
    }
    t = task(store, "ledger-close", utc(2026, 12, 1), schedule=schedule, deadline="06:00")
    clock = Clock(utc(2026, 12, 4, 5, 1))  # 06:01 in Berlin on the holiday
    lateness = Lateness(store, clock=clock)
    check(lateness, store)
    assert events(store) == []
    assert store.db["lateness"].find_one({"_id": t["_id"]})["deadline"]["status"] == "skipped"
    clock.now = utc(2026, 12, 5, 5, 1)  # the blackout's day
    check(lateness, store)
    assert events(store) == []
    clock.now = utc(2026, 12, 6, 5, 1)  # an ordinary Sunday: a fire at 03:00, no success
    check(lateness, store)
    days = [e["details"]["day"] for e in events(store, "task.deadline_missed")]
    assert days == ["2026-12-06"]


def test_overdue_counts_only_the_time_the_task_could_run(store):
    """A payroll task runs at 06:00 Berlin time on workdays, except holidays, and expects a
    success every 25 hours. Its Friday success is not overdue over the weekend, nor on the
    holiday Monday, nor during Tuesday's maintenance window: 25 hours of the time it could
    run have passed only on Tuesday afternoon."""
    from cloudtask.operations import Operations

    ops = Operations(store)
    ops.set_calendar("test", "workdays", {"weekdays": ["mon", "tue", "wed", "thu", "fri"]})
    ops.set_calendar("test", "holidays", {"dates": ["2026-12-07"]})  # a Monday
    ops.set_blackout(
        "test",
        "maint",
        {"group": "default", "dates": ["2026-12-08"], "from": "00:00", "to": "12:00",
         "timezone": "Europe/Berlin"},
    )  # fmt: skip
    schedule = {
        "cron": "0 6 * * *",
        "timezone": "Europe/Berlin",
        "calendar": {"only": "workdays", "skip": "holidays"},
    }
    friday = utc(2026, 12, 4, 5)  # 06:00 Berlin
    t = task(store, "payroll", friday - timedelta(days=7), schedule=schedule, expect_every="25h")
    success(store, t, friday, took=60)  # ended 06:01 Berlin, Friday
    clock = Clock(friday + timedelta(hours=2))
    lateness = Lateness(store, clock=clock)
    check(lateness, store)
    # Friday 06:01 to midnight is 17h59m; Saturday to Monday are not counted; Tuesday counts
    # from 12:00 Berlin (the window's end): 7h01m more is 19:01 Berlin, 18:01 UTC
    for moment in (
        utc(2026, 12, 5, 12),  # Saturday: 30 hours of wall time
        utc(2026, 12, 7, 12),  # the holiday
        utc(2026, 12, 8, 10),  # Tuesday, in the window
        utc(2026, 12, 8, 18, 0),  # Tuesday, a minute short
    ):
        clock.now = moment
        check(lateness, store)
        assert events(store) == [], moment
    clock.now = utc(2026, 12, 8, 18, 1)
    check(lateness, store)
    check(lateness, store)
    (overdue,) = events(store)
    assert overdue["kind"] == "task.overdue" and overdue["details"]["since_success"] is True

    # the same task without the calendars counts wall time: overdue on Saturday morning
    plain = task(
        store, "payroll-plain", friday - timedelta(days=7), schedule={"cron": "0 6 * * *"},
        expect_every="25h",
    )  # fmt: skip
    success(store, plain, friday, took=60)
    lateness = Lateness(store, clock=Clock(utc(2026, 12, 5, 6, 2)))
    check(lateness, store)
    check(lateness, store)
    assert sorted(e["task_id"] for e in events(store, "task.overdue")) == sorted(
        [t["_id"], plain["_id"]]
    )


def test_a_calendar_counter_that_cannot_be_read_leaves_the_other_alerts_going(store, monkeypatch):
    """(a center whose MongoDB role cannot read calendar_state: overdue is judged on wall
    time, and the round's other alerts are recorded)"""
    from cloudtask.exceptions import StoreError

    def refused() -> int:
        raise StoreError("MongoDB refused: not authorized on cloudtask to find calendar_state")

    monkeypatch.setattr(store, "calendar_version", refused)
    clock = Clock(T0 + timedelta(hours=2))
    overdue = task(store, "quiet", T0, expect_every="1h")
    slow = task(store, "slow", T0, warn_after="30m")
    run = run_document(slow, T0, agent="a1")
    run.update(status="running", started_at=T0)
    store.runs.insert_one(run)
    lateness = Lateness(store, clock=clock)
    check(lateness, store)
    check(lateness, store)
    kinds = sorted((e["kind"], e["task_id"]) for e in events(store))
    assert kinds == [("run.slow", slow["_id"]), ("task.overdue", overdue["_id"])]


def test_a_schedule_without_fire_times_is_always_held_to_its_deadline():
    closes = utc(2026, 12, 4, 6)
    assert had_chance({"after": ["extract"]}, utc(2026, 12, 4, 5), closes)
    assert had_chance({"keepalive": True}, utc(2026, 12, 4, 5), closes)


def test_a_paused_task_does_not_miss_its_deadline(store):
    t = task(store, "paused-report", utc(2026, 12, 1), deadline="06:00")
    store.replace_task(t["_id"], {**t["spec"], "enabled": False}, now=T0)
    clock = Clock(utc(2026, 12, 5, 7))
    check(Lateness(store, clock=clock), store)
    assert events(store) == []


def test_an_alert_recorded_by_a_leader_that_died_before_noting_it_is_not_sent_twice(
    store, monkeypatch
):
    t = task(store, "flaky-sync", T0 - timedelta(hours=3), expect_every="1h")
    clock = Clock(T0)
    dying = Lateness(store, clock=clock)

    def crash(docs):
        raise StoreError("the leader died here")

    monkeypatch.setattr(store, "save_lateness_states", crash)
    check(dying, store)  # the event is recorded; the state is not
    assert [e["kind"] for e in events(store)] == ["task.overdue"]
    assert store.db["lateness"].count_documents({}) == 0
    monkeypatch.undo()

    clock.advance(seconds=10)
    successor = Lateness(store, clock=clock)
    check(successor, store)
    check(successor, store)
    assert [e["kind"] for e in events(store)] == ["task.overdue"]  # the same id: once
    state = store.db["lateness"].find_one({"_id": t["_id"]})
    assert state["overdue"] is not None


def test_many_tasks_due_at_once_are_looked_up_a_batch_a_round(store, monkeypatch):
    monkeypatch.setattr(lateness_module, "BATCH", 2)
    for i in range(5):
        task(store, f"report-{i}", utc(2026, 12, 1), deadline="06:00")
    clock = Clock(utc(2026, 12, 4, 6, 0, 1))
    lateness = Lateness(store, clock=clock)
    seen = []
    for _ in range(3):
        lateness._checked_at = -1e9
        lateness.check(feed(store), no_fence)
        seen.append(len(events(store)))
    assert seen == [2, 4, 5]  # the longest unseen first, each day's alert once


def test_a_round_asked_for_too_soon_is_done_when_due(store):
    lateness = Lateness(store, clock=Clock(T0), interval=2.0)
    lateness.check(feed(store), no_fence)  # nothing watched: no round is due after it
    assert lateness.due_in() is None
    task(store, "new-slow", T0, warn_after="1m")
    lateness.check(feed(store), no_fence)  # a new view within the interval: deferred
    assert lateness.rounds == 0 and 0 < lateness.due_in() <= 2.0
    lateness._checked_at -= 2.0  # the interval passed
    lateness.check(feed(store), no_fence)
    assert lateness.rounds == 1 and store.db["lateness"].count_documents({"active": True}) == 1


def test_a_deposed_leader_records_nothing_and_steps_down(store):
    from cloudtask.center.writer import LeadershipLost

    task(store, "late-sync", T0 - timedelta(hours=3), expect_every="1h")
    lateness = Lateness(store, clock=Clock(T0))

    def gone() -> None:
        raise LeadershipLost("the election node is gone")

    with pytest.raises(LeadershipLost):
        lateness.check(feed(store), gone)
    assert events(store) == [] and store.db["lateness"].count_documents({}) == 0


def test_no_query_when_no_task_sets_a_field(store, monkeypatch):
    task(store, "plain", T0)
    lateness = Lateness(store, clock=Clock(T0))
    asked = []
    for name in ("running_runs_brief", "successes_fired_since", "save_lateness_states"):
        original = getattr(store, name)
        monkeypatch.setattr(
            store, name, lambda *a, _o=original, _n=name: asked.append(_n) or _o(*a)
        )
    check(lateness, store)
    assert asked == [] and lateness.due_in() is None


# --- the task page, the form and the API --------------------------------------------------


@pytest.fixture
def app(store):
    from helpers import make_web_app

    return make_web_app(store)


@pytest.fixture
def csrf_page():
    return "/tasks/new"


def test_the_task_page_shows_the_late_alerts(client, store, viewer):
    zone = {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}
    t = task(store, "nightly-report", T0, schedule=zone, deadline="06:00 mon-fri")
    t2 = task(
        store,
        "sync",
        T0,
        warn_after="30m",
        expect_every="6h",
        deadline={"at": "07:30", "timezone": "Asia/Tokyo"},
    )
    page = client.get(f"/tasks/{t['_id']}").get_data(as_text=True)
    late = page.split('id="lateness">', 1)[1].split("</dd>", 1)[0]
    assert "no success by" in late and "06:00 Europe/Berlin, mon-fri" in late
    page = client.get(f"/tasks/{t2['_id']}").get_data(as_text=True)
    late = " ".join(page.split('id="lateness">', 1)[1].split("</dd>", 1)[0].split())
    assert 'a run still going after <span class="mono">30m</span>' in late
    assert "07:30 Asia/Tokyo" in late
    assert 'no success for <span class="mono">6h</span>' in late
    plain = task(store, "plain", T0)
    assert 'id="lateness"' not in client.get(f"/tasks/{plain['_id']}").get_data(as_text=True)


def test_the_task_page_says_what_is_late_now(client, store, viewer):
    zone = {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}
    t = task(store, "ledger", utc(2026, 12, 1), schedule=zone, deadline="06:00", expect_every="6h")
    page = client.get(f"/tasks/{t['_id']}").get_data(as_text=True)
    assert 'id="lateness-now"' not in page  # not checked yet: nothing to say
    clock = Clock(utc(2026, 12, 4, 5, 1))  # 06:01 in Berlin, nothing ever succeeded
    lateness = Lateness(store, clock=clock)
    check(lateness, store)

    def now_text() -> str:
        page = client.get(f"/tasks/{t['_id']}").get_data(as_text=True)
        return " ".join(page.split('id="lateness-now">', 1)[1].split("</dd>", 1)[0].split())

    text = now_text()
    assert 'data-late="overdue"' in text and "no success since 2026-12-01 00:00:00 UTC" in text
    assert 'data-late="deadline">late</span> missed the deadline of 2026-12-04' in text
    success(store, t, utc(2026, 12, 4, 5, 10), took=60)
    clock.now = utc(2026, 12, 4, 5, 20)
    check(lateness, store)
    check(lateness, store)
    text = now_text()
    assert 'data-late="overdue"' not in text
    assert 'deadline of 2026-12-04: <span class="badge warn" data-late="deadline">done late' in text


def test_the_form_sets_the_fields_and_says_what_is_wrong(client, store, operator):
    form = {
        "csrf_token": operator,
        "editor": "fields",
        "name": "from-form",
        "schedule_kind": "cron",
        "cron": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "run_kind": "command",
        "command": "true",
        "retries": "0",
        "concurrency": "forbid",
        "misfire": "run_once",
        "misfire_grace": "1h",
        "on_lost": "record",
        "mode": "one",
        "enabled": "on",
        "warn_after": "25:00",
        "deadline": "6:30 mon-fri",
        "expect_every": "1d",
    }
    answer = client.post("/tasks/new", data=form)
    assert answer.status_code == 422  # shown again, with the problem at its field
    page = answer.get_data(as_text=True)
    assert 'class="field has-error" data-field="warn_after"' in page
    assert "&#39;25:00&#39; is not a duration" in page or "'25:00' is not a duration" in page
    assert store.tasks.count_documents({"name": "from-form"}) == 0
    answer = client.post("/tasks/new", data={**form, "warn_after": "20m"})
    assert answer.status_code in (302, 303), answer.get_data(as_text=True)[:500]
    spec = store.tasks.find_one({"name": "from-form"})["spec"]
    assert (spec["warn_after"], spec["deadline"], spec["expect_every"]) == (
        "20m",
        "06:30 mon-fri",
        "1d",
    )
    edit = client.get(f"/tasks/{store.tasks.find_one({'name': 'from-form'})['_id']}/edit")
    page = edit.get_data(as_text=True)
    assert 'name="deadline" value="06:30 mon-fri"' in page
    assert 'name="expect_every" value="1d"' in page


def test_the_api_takes_and_shows_the_fields(client, store, operator):
    headers = {"X-CSRF-Token": operator}
    body = {
        "name": "api-task",
        "schedule": {"every": "1h"},
        "command": "true",
        "deadline": {"at": "06:00", "timezone": "Europe/Berlin", "days": "sat-sun"},
        "expect_every": "2h",
    }
    answer = client.post("/api/v1/tasks", json=body, headers=headers)
    assert answer.status_code == 201, answer.get_json()
    spec = answer.get_json()["spec"]
    assert spec["deadline"] == {"at": "06:00", "timezone": "Europe/Berlin", "days": "sat,sun"}
    assert spec["expect_every"] == "2h" and spec["warn_after"] is None
    bad = client.post(
        "/api/v1/tasks", json={**body, "name": "bad", "deadline": "noon"}, headers=headers
    )
    assert bad.status_code == 422
    problems = bad.get_json()["details"]
    assert [p["path"] for p in problems] == ["deadline"]
    assert "HH:MM" in problems[0]["message"]
    schema = client.get("/api/v1/openapi.json").get_json()
    properties = schema["components"]["schemas"]["TaskSpec"]["properties"]
    assert {"warn_after", "deadline", "expect_every"} <= set(properties)


def test_the_alerts_are_on_the_events_page_and_in_the_api(client, store, viewer):
    t = task(store, "hourly-sync", T0 - timedelta(hours=3), expect_every="1h")
    check(Lateness(store, clock=Clock(T0)), store)
    page = client.get("/events?kind=task.overdue").get_data(as_text=True)
    assert "task hourly-sync has not succeeded for 3h" in page
    answer = client.get("/api/v1/events?kind=task.")
    assert answer.status_code == 200
    items = answer.get_json()["items"]
    assert [(e["kind"], e["task_id"], e["severity"]) for e in items] == [
        ("task.overdue", t["_id"], "warning")
    ]
