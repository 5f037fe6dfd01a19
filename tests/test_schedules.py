"""Schedules: cron (with DST), every, at, keepalive, windows, lists, parsing and round trips.

Longer than the other files on purpose: it is the table of cases of one pure module
(``cloudtask/schedules.py``), most of them the daylight-saving transitions of two zones, each
a few lines; split, the cases of one rule would sit in two files."""

from __future__ import annotations

import time as clock
from datetime import datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from cloudtask import schedules
from cloudtask.schedules import (
    KEEPALIVE_MAX_BACKOFF,
    KEEPALIVE_RESET_AFTER,
    AtSchedule,
    CronSchedule,
    EverySchedule,
    KeepaliveSchedule,
    ScheduleSet,
    Window,
    keepalive_backoff,
    next_fires,
    parse_schedule,
)

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(text: str) -> datetime:
    """'2026-03-29T00:00' (or with an offset) as aware UTC; without an offset it means UTC."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def local(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def one(value: object) -> ScheduleSet:
    schedules, problems = parse_schedule(value)
    assert problems == [], problems
    assert schedules is not None
    return schedules


@pytest.fixture
def cron_steps(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Every candidate croniter hands to the schedule code, to check it does not crawl."""
    steps: list[datetime] = []

    class CountingCroniter(croniter):  # type: ignore[misc]
        def get_next(self, *args: Any, **kwargs: Any) -> Any:
            result = super().get_next(*args, **kwargs)
            steps.append(result)
            return result

    monkeypatch.setattr(schedules, "croniter", CountingCroniter)
    return steps


def problems_of(value: object, now: datetime | None = None) -> dict[str, str]:
    schedules, problems = parse_schedule(value, now=now)
    assert schedules is None
    assert problems, "expected problems"
    return {p.path: p.message for p in problems}


# --- cron --------------------------------------------------------------------------------


def test_cron_five_fields_fires_at_matching_minutes() -> None:
    schedule = CronSchedule("*/20 3 * * *")
    fires = next_fires(schedule, utc("2026-05-01T02:59:59"), 4)
    assert fires == [
        utc("2026-05-01T03:00"),
        utc("2026-05-01T03:20"),
        utc("2026-05-01T03:40"),
        utc("2026-05-02T03:00"),
    ]
    assert all(f.tzinfo == UTC for f in fires)


def test_cron_next_after_is_strictly_after() -> None:
    schedule = CronSchedule("0 3 * * *")
    assert schedule.next_after(utc("2026-05-01T03:00")) == utc("2026-05-02T03:00")
    assert schedule.next_after(utc("2026-05-01T02:59:59.999")) == utc("2026-05-01T03:00")


def test_cron_six_fields_has_seconds_first() -> None:
    fires = next_fires(CronSchedule("*/15 * * * * *"), utc("2026-05-01T10:00:00"), 5)
    assert [f.strftime("%M:%S") for f in fires] == ["00:15", "00:30", "00:45", "01:00", "01:15"]
    # "30 5 * * * *" is second 30 of minute 5 of every hour, not minute 30 of hour 5.
    fires = next_fires(CronSchedule("30 5 * * * *"), utc("2026-05-01T10:00"), 2)
    assert fires == [utc("2026-05-01T10:05:30"), utc("2026-05-01T11:05:30")]


def test_cron_in_a_timezone() -> None:
    fires = next_fires(CronSchedule("0 3 * * *", "Europe/Berlin"), utc("2026-07-01T00:00"), 2)
    assert fires == [utc("2026-07-01T01:00"), utc("2026-07-02T01:00")]  # CEST is UTC+2


def test_next_fires_stops_when_the_schedule_ends() -> None:
    schedule = CronSchedule("0 * * * *", window=Window(end=utc("2026-05-01T03:00")))
    assert next_fires(schedule, utc("2026-05-01T00:30"), 10) == [
        utc("2026-05-01T01:00"),
        utc("2026-05-01T02:00"),
        utc("2026-05-01T03:00"),
    ]
    assert next_fires(schedule, utc("2026-05-01T00:30"), 0) == []


# --- DST ---------------------------------------------------------------------------------
#
# Vixie cron's rules (crontab(5)): a cron naming fixed hours runs a fire time the clock skips
# right after the jump, once, and a repeated fire time once, at its first occurrence; a cron
# whose hour field is a wildcard fires at every real instant that shows a matching local time.

SYDNEY = ZoneInfo("Australia/Sydney")
# zone, the instant the clock jumps forward, the hour it skips, the instant it falls back, the
# hour it repeats (all in 2026; Sydney is southern: it falls back in April, springs in October)
DST_ZONES = [
    pytest.param(BERLIN, "2026-03-29T01:00", 2, "2026-10-25T01:00", 2, id="Berlin"),
    pytest.param(NEW_YORK, "2026-03-08T07:00", 2, "2026-11-01T06:00", 1, id="New_York"),
    pytest.param(SYDNEY, "2026-10-03T16:00", 2, "2026-04-04T16:00", 2, id="Sydney"),
]
HOUR = timedelta(hours=1)


def walk(schedule: CronSchedule, start: datetime, end: datetime) -> list[datetime]:
    """Every fire in (start, end], checking each is strictly later and found from just before."""
    fires: list[datetime] = []
    t = start
    while (fire := schedule.next_after(t)) is not None and fire <= end:
        assert fire > t
        assert schedule.next_after(fire - timedelta(microseconds=1)) == fire
        fires.append(fire)
        t = fire
    return fires


@pytest.mark.parametrize(
    ("expr", "wildcard"),
    [
        ("* * * * *", True),
        ("0 */1 * * *", True),
        ("0 0-23 * * *", True),
        ("*/5 * * * * *", True),
        ("0 0 */1 * * *", True),
        ("30 2 * * *", False),
        ("0 */2 * * *", False),
        ("* 1-23 * * *", False),
        ("* 2 * * * *", True),  # every second of minute 2 of every hour: the hour is third
        ("0 0 2 * * *", False),
    ],
)
def test_wildcard_hour_is_an_hour_field_naming_every_hour(expr: str, wildcard: bool) -> None:
    assert CronSchedule(expr).wildcard_hour is wildcard


@pytest.mark.parametrize(("zone", "jump", "skipped", "back", "repeated"), DST_ZONES)
@pytest.mark.parametrize("expr", ["30 {h} * * *", "0 30 {h} * * *"])
def test_fixed_time_in_the_skipped_hour_runs_right_after_the_jump(
    zone: ZoneInfo, jump: str, skipped: int, back: str, repeated: int, expr: str
) -> None:
    schedule = CronSchedule(expr.format(h=skipped), zone.key)
    fires = next_fires(schedule, utc(jump) - 25 * HOUR, 3)
    assert [local(f, zone)[11:] for f in fires] == [f"0{skipped}:30:00", "03:00:00", "02:30:00"]
    assert fires[1] == utc(jump)  # the first instant after the gap, not a day late
    assert [f.date() for f in fires] == sorted({f.date() for f in fires})  # one a day


@pytest.mark.parametrize(("zone", "jump", "skipped", "back", "repeated"), DST_ZONES)
@pytest.mark.parametrize(
    ("expr", "fires_at_three"),
    [
        ("0,30 {h} * * *", False),  # two fire times in the gap
        ("* {h} * * *", False),  # sixty
        ("0 {h},3 * * *", True),  # one in the gap and one at the first instant after it
        ("*/15 * {h},3 * * *", True),  # 6 fields: every 15 s of two hours
    ],
)
def test_fire_times_in_the_skipped_hour_run_once(
    zone: ZoneInfo,
    jump: str,
    skipped: int,
    back: str,
    repeated: int,
    expr: str,
    fires_at_three: bool,
) -> None:
    schedule = CronSchedule(expr.format(h=skipped), zone.key)
    before = utc(jump) - HOUR - timedelta(minutes=1)  # 00:59 or 01:59 local, before the jump
    fires = walk(schedule, before, utc(jump) + timedelta(seconds=59))
    assert fires[0] == utc(jump)  # 03:00, the first instant after the gap
    if fires_at_three:  # 03:00 also matches: still one fire then, and the rest of 03:00 after
        assert fires == [utc(jump) + timedelta(seconds=s) for s in range(0, 60, 15)][: len(fires)]
    else:
        assert fires == [utc(jump)]
        assert schedule.next_after(utc(jump)) == utc(jump) + 23 * HOUR  # tomorrow, 02:00


@pytest.mark.parametrize(("zone", "jump", "skipped", "back", "repeated"), DST_ZONES)
@pytest.mark.parametrize("expr", ["* * * * *", "*/30 * * * * *", "30 * * * *"])
def test_wildcard_hour_fires_at_real_times_across_the_jump(
    zone: ZoneInfo, jump: str, skipped: int, back: str, repeated: int, expr: str
) -> None:
    schedule = CronSchedule(expr, zone.key)
    fires = walk(schedule, utc(jump) - 2 * HOUR, utc(jump) + 2 * HOUR)
    step = {"* * * * *": 60, "*/30 * * * * *": 30, "30 * * * *": 3600}[expr]
    assert {(b - a).total_seconds() for a, b in zip(fires, fires[1:])} == {step}
    assert len(fires) == 4 * 3600 // step  # the skipped local times are not made up for
    if expr == "30 * * * *":
        assert [local(f, zone)[11:16] for f in fires] == ["00:30", "01:30", "03:30", "04:30"]


@pytest.mark.parametrize(("zone", "jump", "skipped", "back", "repeated"), DST_ZONES)
@pytest.mark.parametrize("expr", ["* * * * *", "*/30 * * * * *", "0 * * * *", "0 */1 * * *"])
def test_wildcard_hour_fires_in_both_passes_of_the_repeated_hour(
    zone: ZoneInfo, jump: str, skipped: int, back: str, repeated: int, expr: str
) -> None:
    schedule = CronSchedule(expr, zone.key)
    fires = walk(schedule, utc(back) - 2 * HOUR, utc(back) + 2 * HOUR)
    step = {"*/30 * * * * *": 30, "* * * * *": 60}.get(expr, 3600)
    assert {(b - a).total_seconds() for a, b in zip(fires, fires[1:])} == {step}  # no gap
    assert len(fires) == 4 * 3600 // step
    repeat = f"{repeated:02d}:00:00"
    assert [f for f in fires if local(f, zone)[11:] == repeat] == [utc(back) - HOUR, utc(back)]


@pytest.mark.parametrize(("zone", "jump", "skipped", "back", "repeated"), DST_ZONES)
@pytest.mark.parametrize("expr", ["30 {h} * * *", "0 30 {h} * * *", "*/20 {h} * * *"])
def test_fixed_time_in_the_repeated_hour_fires_at_its_first_occurrence(
    zone: ZoneInfo, jump: str, skipped: int, back: str, repeated: int, expr: str
) -> None:
    schedule = CronSchedule(expr.format(h=repeated), zone.key)
    fires = walk(schedule, utc(back) - 2 * HOUR, utc(back) + 2 * HOUR)
    assert fires and all(utc(back) - HOUR <= f < utc(back) for f in fires)  # first pass only
    # From inside the second pass it resumes after the repetition, without refiring.
    assert (
        schedule.next_after(utc(back) + timedelta(minutes=10)) == fires[0] + 25 * HOUR
    )  # tomorrow


def test_fixed_hours_every_other_hour_across_both_changes() -> None:
    schedule = CronSchedule("0 */2 * * *", "Europe/Berlin")  # fixed: hours 0, 2, 4, ...
    spring = walk(schedule, utc("2026-03-28T22:00"), utc("2026-03-29T04:00"))
    assert [local(f, BERLIN)[11:13] for f in spring] == ["00", "03", "04", "06"]
    fall = walk(schedule, utc("2026-10-24T21:00"), utc("2026-10-25T05:00"))
    assert [local(f, BERLIN)[11:13] for f in fall] == ["00", "02", "04", "06"]
    assert utc("2026-10-25T00:00") in fall and utc("2026-10-25T01:00") not in fall


def test_berlin_spring_forward_catches_up_once(cron_steps: list[datetime]) -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    fires = next_fires(CronSchedule("30 2 * * *", "Europe/Berlin"), utc("2026-03-27T12:00"), 3)
    assert [local(f, BERLIN) for f in fires] == [
        "2026-03-28 02:30:00",
        "2026-03-29 03:00:00",
        "2026-03-30 02:30:00",
    ]
    assert fires[1] == utc("2026-03-29T01:00") and fires[2] == utc("2026-03-30T00:30")
    every_second = CronSchedule("* * 2 * * *", "Europe/Berlin")  # each second of 02:00-03:00
    cron_steps.clear()
    assert next_fires(every_second, utc("2026-03-29T00:59:58"), 2) == [
        utc("2026-03-29T01:00"),
        utc("2026-03-30T00:00"),
    ]
    assert len(cron_steps) < 10  # the 3,600 skipped seconds are not walked


def test_berlin_fall_back_fires_a_repeated_time_once_at_its_first_occurrence() -> None:
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice.
    fires = next_fires(CronSchedule("30 2 * * *", "Europe/Berlin"), utc("2026-10-24T12:00"), 2)
    assert fires == [utc("2026-10-25T00:30"), utc("2026-10-26T01:30")]


def test_berlin_hourly_across_fall_back_fires_every_real_hour() -> None:
    fires = next_fires(CronSchedule("0 * * * *", "Europe/Berlin"), utc("2026-10-24T22:30"), 6)
    assert [local(f, BERLIN)[11:] for f in fires] == [
        "01:00:00",
        "02:00:00",
        "02:00:00",
        "03:00:00",
        "04:00:00",
        "05:00:00",
    ]
    # 02:00 CEST (00:00Z) and the second 02:00 (CET, 01:00Z) both fire.
    assert fires[1:3] == [utc("2026-10-25T00:00"), utc("2026-10-25T01:00")]


def test_times_inside_the_repeated_hour(cron_steps: list[datetime]) -> None:
    first_pass = utc("2026-10-25T00:45")  # 02:45 CEST, the first 02:45 of the night
    second_pass = utc("2026-10-25T01:10")  # 02:10 CET, the second 02:10
    assert first_pass.astimezone(BERLIN).fold == 0 and second_pass.astimezone(BERLIN).fold == 1
    # A fixed time is not refired in the second pass, and the repetition is not walked.
    schedule = CronSchedule("30 2 * * *", "Europe/Berlin")
    assert schedule.next_after(second_pass) == utc("2026-10-26T01:30")
    fixed_seconds = CronSchedule("* * 2 * * *", "Europe/Berlin")
    cron_steps.clear()
    assert fixed_seconds.next_after(second_pass) == utc("2026-10-26T01:00")
    assert len(cron_steps) < 5
    # A wildcard hour goes on from the end of the first pass into the start of the second.
    minutely = CronSchedule("*/20 * * * *", "Europe/Berlin")
    assert next_fires(minutely, first_pass, 2) == [utc("2026-10-25T01:00"), utc("2026-10-25T01:20")]
    assert next_fires(minutely, second_pass, 3) == [
        utc("2026-10-25T01:20"),
        utc("2026-10-25T01:40"),
        utc("2026-10-25T02:00"),
    ]
    every_second = CronSchedule("* * * * * *", "Europe/Berlin")
    cron_steps.clear()
    assert every_second.next_after(second_pass) == second_pass + timedelta(seconds=1)
    assert every_second.next_after(utc("2026-10-25T00:59:59")) == utc("2026-10-25T01:00")
    assert len(cron_steps) < 5


def test_new_york_dst() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT. 2026-11-01: 02:00 EDT falls back to 01:00 EST.
    spring = next_fires(CronSchedule("30 2 * * *", "America/New_York"), utc("2026-03-07T00:00"), 3)
    assert spring == [utc("2026-03-07T07:30"), utc("2026-03-08T07:00"), utc("2026-03-09T06:30")]
    fall = next_fires(CronSchedule("30 1 * * *", "America/New_York"), utc("2026-10-31T12:00"), 2)
    assert fall == [utc("2026-11-01T05:30"), utc("2026-11-02T06:30")]
    assert [local(f, NEW_YORK)[11:] for f in fall] == ["01:30:00", "01:30:00"]
    every_minute = CronSchedule("* * * * *", "America/New_York")
    assert utc("2026-11-01T06:30") in walk(
        every_minute, utc("2026-11-01T06:00"), utc("2026-11-01T07:00")
    )  # the second 01:30


def test_per_second_cron_jumps_over_the_spring_forward_gap(cron_steps: list[datetime]) -> None:
    schedule = CronSchedule("* * * * * *", "Europe/Berlin")
    fires = next_fires(schedule, utc("2026-03-29T00:59:58"), 3)
    assert len(cron_steps) < 10  # the missing hour is jumped, not walked
    assert fires == [
        utc("2026-03-29T00:59:59"),
        utc("2026-03-29T01:00"),
        utc("2026-03-29T01:00:01"),
    ]
    assert local(fires[1], BERLIN) == "2026-03-29 03:00:00"


def test_dst_with_between_start_and_end() -> None:
    # `between` judges the cron's own local time: the skipped 02:30 is inside 02:00-02:45.
    window = Window(between=(time(2), time(2, 45)))
    fixed = CronSchedule("30 2 * * *", "Europe/Berlin", window)
    assert fixed.next_after(utc("2026-03-29T00:00")) == utc("2026-03-29T01:00")
    wildcard = CronSchedule("*/20 * * * *", "Europe/Berlin", Window(between=(time(2), time(3))))
    fall = walk(wildcard, utc("2026-10-24T22:00"), utc("2026-10-25T04:00"))
    assert [local(f, BERLIN)[11:16] for f in fall] == ["02:00", "02:20", "02:40"] * 2
    assert walk(wildcard, utc("2026-03-28T22:00"), utc("2026-03-29T04:00")) == []
    # A window starting inside the second pass, and one ending inside the gap.
    starts = Window(start=utc("2026-10-25T01:05"))
    assert CronSchedule("*/20 * * * *", "Europe/Berlin", starts).next_after(
        utc("2026-10-24T00:00")
    ) == utc("2026-10-25T01:20")
    ends = Window(end=utc("2026-03-29T00:59:59"))
    assert (
        CronSchedule("30 2 * * *", "Europe/Berlin", ends).next_after(utc("2026-03-28T12:00"))
        is None
    )


# --- cron validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("0 0 31 2 *", "never fires"),
        ("0 0 30 2 *", "never fires"),
        ("* * * *", "5 fields"),
        ("0 0 * * * * 2026", "got 7"),
        ("@daily", "0 0 * * *"),
        ("61 * * * *", "not a valid cron expression"),
        ("a b c d e", "not a valid cron expression"),
        ("R 0 * * *", "random"),
        ("H 0 * * *", "hashed"),
        (5, "expected a cron expression"),
    ],
)
def test_bad_cron_is_refused(expr: object, words: str) -> None:
    found = problems_of({"cron": expr})
    assert list(found) == ["schedule.cron"]
    assert words in found["schedule.cron"]
    if isinstance(expr, str):
        with pytest.raises(ValueError, match=words.split()[0]):
            CronSchedule(expr)


def test_leap_day_cron_is_accepted() -> None:
    fires = next_fires(one({"cron": "0 0 29 2 *"}), utc("2026-01-01T00:00"), 2)
    assert fires == [utc("2028-02-29T00:00"), utc("2032-02-29T00:00")]


def test_unknown_timezone_is_refused_by_name() -> None:
    found = problems_of({"cron": "0 3 * * *", "timezone": "Mars/Olympus"})
    assert "Mars/Olympus" in found["schedule.timezone"]
    with pytest.raises(ValueError, match="Mars/Olympus"):
        CronSchedule("0 3 * * *", "Mars/Olympus")
    assert "schedule.timezone" in problems_of({"every": "1h", "timezone": 3})


# --- every -------------------------------------------------------------------------------


@pytest.mark.parametrize(("every", "seconds"), [("1s", 1.0), (1, 1.0), ("30d", 2592000.0)])
def test_every_limits_accepted(every: object, seconds: float) -> None:
    (item,) = one({"every": every}).items
    assert isinstance(item, EverySchedule) and item.every == seconds


@pytest.mark.parametrize(
    ("every", "words"),
    [
        ("500ms", "at least 1s"),
        ("31d", "at most 30d"),
        (0.5, "at least 1s"),
        ("abc", "not a duration"),
    ],
)
def test_every_limits_refused(every: object, words: str) -> None:
    assert words in problems_of({"every": every})["schedule.every"]


def test_every_is_anchored_at_the_epoch() -> None:
    hourly = EverySchedule(3600)
    assert hourly.next_after(utc("2026-05-01T10:17:33")) == utc("2026-05-01T11:00")
    assert hourly.next_after(utc("2026-05-01T11:00")) == utc("2026-05-01T12:00")
    # 7 minutes: multiples of 420 s since 1970, the same on every machine and after restarts.
    fire = EverySchedule(420).next_after(utc("2026-05-01T10:00"))
    assert fire is not None and fire.timestamp() % 420 == 0
    assert timedelta(0) < fire - utc("2026-05-01T10:00") <= timedelta(minutes=7)


def test_every_is_anchored_at_the_window_start() -> None:
    start = utc("2026-05-01T10:05:07")
    schedule = EverySchedule(600, window=Window(start=start))
    assert schedule.next_after(utc("2026-01-01T00:00")) == start  # the start itself fires
    assert next_fires(schedule, start, 2) == [
        utc("2026-05-01T10:15:07"),
        utc("2026-05-01T10:25:07"),
    ]
    assert schedule.next_after(utc("2026-05-01T10:16")) == utc("2026-05-01T10:25:07")


def test_every_fractional_interval_has_no_drift() -> None:
    schedule = EverySchedule(1.5)
    start = utc("2026-05-01T00:00")  # 1777593600 s since the epoch, a multiple of 1.5 s
    assert next_fires(schedule, start, 2) == [
        utc("2026-05-01T00:00:01.5"),
        utc("2026-05-01T00:00:03"),
    ]


def test_every_with_between_jumps_to_the_next_opening_quickly() -> None:
    schedule = EverySchedule(1, "Europe/Berlin", Window(between=(time(8), time(9))))
    started = clock.perf_counter()
    fire = schedule.next_after(utc("2026-06-01T08:00"))  # 10:00 in Berlin: the window closed
    assert clock.perf_counter() - started < 0.05  # not 22 hours of single seconds
    assert fire is not None and local(fire, BERLIN) == "2026-06-02 08:00:00"
    assert schedule.next_after(fire) == fire + timedelta(seconds=1)
    last = utc("2026-06-02T06:59:59")  # 08:59:59 local, the last second inside
    assert schedule.next_after(last) == utc("2026-06-03T06:00")


def test_every_with_an_overnight_window() -> None:
    schedule = one({"every": "1h", "timezone": "Europe/Berlin", "between": ["22:00", "02:00"]})
    fires = next_fires(schedule, utc("2026-06-01T12:00"), 5)
    assert [local(f, BERLIN)[5:16] for f in fires] == [
        "06-01 22:00",
        "06-01 23:00",
        "06-02 00:00",
        "06-02 01:00",
        "06-02 22:00",
    ]


def test_cron_with_between_skips_closed_hours_without_iterating_them(
    cron_steps: list[datetime],
) -> None:
    schedule = CronSchedule("* * * * * *", "Europe/Berlin", Window(between=(time(22), time(6))))
    fires = next_fires(schedule, utc("2026-06-01T03:59:58"), 3)  # 05:59:58 local
    assert len(cron_steps) < 10  # not 16 hours of closed seconds
    assert [local(f, BERLIN)[5:] for f in fires] == [
        "06-01 05:59:59",
        "06-01 22:00:00",
        "06-01 22:00:01",
    ]


def test_between_that_never_lets_a_fire_through_is_refused() -> None:
    found = problems_of({"cron": "0 0 * * *", "between": ["08:00", "09:00"]})
    assert "never fires" in found["schedule.between"]
    found = problems_of({"every": "1d", "between": ["08:00", "09:00"]})  # always 00:00 UTC
    assert "never fires" in found["schedule.between"]


# --- windows, at, lists ------------------------------------------------------------------


def test_start_and_end_window_for_cron() -> None:
    schedule = one(
        {"cron": "0 12 * * *", "start": "2026-05-03T12:00:00Z", "end": "2026-05-05T12:00:00+00:00"}
    )
    assert next_fires(schedule, utc("2026-05-01T00:00"), 10) == [
        utc("2026-05-03T12:00"),
        utc("2026-05-04T12:00"),
        utc("2026-05-05T12:00"),
    ]
    assert schedule.next_after(utc("2026-05-05T12:00")) is None


def test_at_fires_once() -> None:
    schedule = one({"at": "2026-12-01T04:00:00+01:00"})
    assert schedule.is_once
    assert schedule.next_after(utc("2026-01-01T00:00")) == utc("2026-12-01T03:00")
    assert schedule.next_after(utc("2026-12-01T03:00")) is None
    assert next_fires(schedule, utc("2026-01-01T00:00"), 3) == [utc("2026-12-01T03:00")]


def test_at_in_the_past_is_refused_only_with_now() -> None:
    now = utc("2026-06-01T00:00")
    assert "in the past" in problems_of({"at": "2026-05-01T00:00:00Z"}, now=now)["schedule.at"]
    assert "in the past" in problems_of({"at": "2026-06-01T00:00:00Z"}, now=now)["schedule.at"]
    assert one({"at": "2026-05-01T00:00:00Z"}).is_once
    past_end = {"cron": "0 * * * *", "end": "2026-05-01T00:00:00Z"}
    assert "in the past" in problems_of(past_end, now=now)["schedule.end"]


def test_list_fires_at_the_earliest_item() -> None:
    schedule = one([{"cron": "0 12 * * *"}, {"at": "2026-05-01T09:00:00Z"}, {"every": "6h"}])
    assert not schedule.is_once and not schedule.keepalive
    assert next_fires(schedule, utc("2026-05-01T07:00"), 4) == [
        utc("2026-05-01T09:00"),
        utc("2026-05-01T12:00"),
        utc("2026-05-01T18:00"),
        utc("2026-05-02T00:00"),
    ]
    assert one([{"at": "2026-05-01T09:00:00Z"}, {"at": "2026-05-02T09:00:00Z"}]).is_once


# --- keepalive ---------------------------------------------------------------------------


def test_keepalive_has_no_fire_times() -> None:
    schedule = one({"keepalive": True})
    assert schedule.keepalive and not schedule.is_once
    assert schedule.next_after(utc("2026-05-01T00:00")) is None
    assert KeepaliveSchedule().to_dict() == {"keepalive": True}


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ({"keepalive": False}, "schedule.keepalive", "must be true"),
        ({"keepalive": 1}, "schedule.keepalive", "must be true"),
        ([{"keepalive": True}, {"every": "1h"}], "schedule[0].keepalive", "cannot be combined"),
        ({"keepalive": True, "start": "2026-05-01T00:00:00Z"}, "schedule.start", "keepalive"),
        ({"keepalive": True, "between": ["08:00", "09:00"]}, "schedule.between", "keepalive"),
        ({"keepalive": True, "timezone": "UTC"}, "schedule.timezone", "keepalive"),
    ],
)
def test_keepalive_rules(value: object, path: str, words: str) -> None:
    assert words in problems_of(value)[path]


def test_keepalive_backoff() -> None:
    assert [keepalive_backoff(n) for n in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert keepalive_backoff(1000) == KEEPALIVE_MAX_BACKOFF == 60.0
    assert KEEPALIVE_RESET_AFTER == 60.0


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ([], "schedule", "at least one"),
        ("0 3 * * *", "schedule", "expected an object"),
        ({}, "schedule", "exactly one of"),
        ({"cron": "0 3 * * *", "every": "1h"}, "schedule", "cron and every"),
        ({"cron": "0 3 * * *", "when": 1}, "schedule.when", "unknown key"),
        ([{"every": "1h"}, {"every": "1x"}], "schedule[1].every", "not a duration"),
        ({"at": "2026-12-01T03:00:00"}, "schedule.at", "add 'Z'"),
        ({"at": "tomorrow"}, "schedule.at", "ISO-8601"),
        ({"at": "2026-12-01T03:00:00Z", "between": ["08:00", "09:00"]}, "schedule.between", "at"),
        ({"at": "2026-12-01T03:00:00Z", "timezone": "UTC"}, "schedule.timezone", "at"),
        ({"every": "1h", "start": "2026-05-01T00:00:00"}, "schedule.start", "add 'Z'"),
        (
            {"every": "1h", "start": "2026-05-02T00:00:00Z", "end": "2026-05-01T00:00:00Z"},
            "schedule.end",
            "after start",
        ),
        ({"every": "1h", "between": ["08:00"]}, "schedule.between", "two times"),
        ({"every": "1h", "between": ["8am", "09:00"]}, "schedule.between[0]", "HH:MM"),
        ({"every": "1h", "between": ["08:00", "24:00"]}, "schedule.between[1]", "HH:MM"),
        ({"every": "1h", "between": ["08:00", "08:00"]}, "schedule.between", "same time"),
    ],
)
def test_parse_problems(value: object, path: str, words: str) -> None:
    found = problems_of(value)
    assert path in found, found
    assert words in found[path]


def test_parse_collects_all_problems() -> None:
    value = [
        {"cron": "0 0 31 2 *", "timezone": "Nowhere/Land"},
        {"every": "500ms", "between": ["x", "09:00"], "color": "red"},
        {"at": "2020-01-01T00:00:00Z"},
    ]
    found = problems_of(value, now=utc("2026-01-01T00:00"))
    assert set(found) == {
        "schedule[0].cron",
        "schedule[0].timezone",
        "schedule[1].every",
        "schedule[1].between[0]",
        "schedule[1].color",
        "schedule[2].at",
    }


@pytest.mark.parametrize(
    "value",
    [
        {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
        {"cron": "*/15 * * * * *", "timezone": "UTC", "between": ["22:00", "06:00"]},
        {"every": "1h30m", "timezone": "UTC", "start": "2026-05-01T00:00:00Z"},
        {"every": "1.5s", "timezone": "America/New_York", "between": ["08:00", "17:30"]},
        {"at": "2026-12-01T03:00:00Z"},
        {"at": "2026-12-01T03:00:00.250000Z", "start": "2026-01-01T00:00:00Z"},
        {"keepalive": True},
        [{"cron": "0 3 * * *", "timezone": "UTC"}, {"every": "10m", "timezone": "UTC"}],
    ],
)
def test_to_dict_round_trips(value: object) -> None:
    schedule = one(value)
    assert schedule.to_dict() == value  # these inputs are already canonical
    assert one(schedule.to_dict()) == schedule


def test_to_dict_is_canonical() -> None:
    schedule = one({"every": 5400})
    assert schedule.to_dict() == {"every": "1h30m", "timezone": "UTC"}
    at = one({"at": "2026-12-01T04:00:00+01:00", "end": "2027-01-01T01:00:00+01:00"})
    assert at.to_dict() == {"at": "2026-12-01T03:00:00Z", "end": "2027-01-01T00:00:00Z"}
    assert one({"every": "1h", "between": ["8:00", "9:05"]}).to_dict()["between"] == [
        "08:00",
        "09:05",
    ]


def test_constructors_validate_and_normalise() -> None:
    with pytest.raises(ValueError, match="at least 1s"):
        EverySchedule(0.5)
    with pytest.raises(ValueError, match="naive"):
        AtSchedule(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="between"):
        AtSchedule(utc("2026-01-01T00:00"), Window(between=(time(1), time(2))))
    berlin_start = datetime(2026, 5, 1, 12, tzinfo=BERLIN)
    assert Window(start=berlin_start).start == utc("2026-05-01T10:00")
    with pytest.raises(ValueError, match="naive"):
        CronSchedule("0 * * * *").next_after(datetime(2026, 1, 1))
