"""The leader's lateness alerts: slow runs, missed deadlines and overdue tasks.

Three fields of a task ask for them (cloudtask/task.py), and one round of the leader's upkeep
(cloudtask/center/housekeeping.py) checks them every ``CHECK_INTERVAL`` seconds:

* ``warn_after``: a run still ``running`` that long after it started is ``run.slow`` (it is not
  killed); when it ends, in whatever status, ``run.slow_ended``.
* ``deadline`` (cloudtask/deadlines.py): when the deadline of a day passes and no run of the
  task that fired in the 24 hours before it has succeeded by it, ``task.deadline_missed`` for
  that day; the first success after, ``task.deadline_recovered``. A task that is paused when its
  deadline passes is not checked that day, and a task is held to a day only if its schedule
  had a fire that runs between the day's opening (or its creation or resume, if later) and
  the deadline: not on a date its calendar rule skips, nor for fires that all fell in its
  group's blackout windows (it had no chance; see :func:`had_chance`).
* ``expect_every``: no success for that long is ``task.overdue``, counted from its last
  success, or from when it was created or resumed (never from the epoch); its next success is
  ``task.overdue_recovered``. A paused task is not checked. Only the time the task could run
  counts: not the local dates its calendar rule leaves out, nor its group's blackout windows
  (a workday task expecting a success every 25 hours is not overdue on a Saturday; see
  :func:`cloudtask.calendars.open_time_reached`).

Each alert is recorded once, and so is its end. **Once across leaders**: what each task has
been alerted about is kept in MongoDB (collection ``lateness``, one small document per task,
written whole), and every event's id names what it is about (the run; the task and the
deadline's local date; the task and the moment its silence is counted from). A round records
its events first, through the events collection that the notifier sends from (record, then
notify: the notifier plans the mail and webhooks of an event recorded "new", see
cloudtask/notify/notifier.py), and only then writes the states: a leader that dies between the
two leaves an event recorded and its state unwritten, and the next leader records the same id
again, which is a duplicate and records nothing. A round whose writes fail changes nothing in
memory and is done again.

**Cheap for many tasks.** Only the tasks that set one of the fields are looked at; the checks
are arithmetic on what is known, and MongoDB is asked only: the running runs (one query on the
``status_agent`` index, when a task sets ``warn_after``), and the successes of the tasks whose
deadline has just passed or that look overdue (one query each, by task and the fire's epoch
seconds: index ``task_ts``; at most ``BATCH`` tasks a query). A task that succeeds regularly
costs one look per deadline and one per ``expect_every``; 10,000 watched tasks cost about
40 ms a round (docs/architecture.md).

The clock is the center's (a test moves it with ``CLOUDTASK_TEST_CLOCK_OFFSET_FILE``, see
cloudtask/testing/clock.py). Runs' times are their agents'.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pymongo

from .. import events as ev
from ..calendars import CalendarBook, next_fire, open_time_reached
from ..clock import from_epoch, stored_time, utcnow
from ..deadlines import (
    DayWindow,
    DeadlineSpec,
    last_window,
    next_deadline,
    parse_deadline,
    task_timezone,
)
from ..durations import parse_duration
from ..exceptions import CloudTaskError, ValidationError
from ..runmodel import FINISHED_STATUSES
from ..schedules import parse_schedule
from ..store import Store
from .tasks import TaskRecord
from .writer import LeadershipLost

log = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0  # seconds between two rounds of checks
CHANCE_FIRES = 2000  # fires of a day looked at for one outside a blackout
CALL_BUDGET = 5.0  # seconds any one MongoDB call may take
SWEEP_INTERVAL = 3600.0  # seconds between deletions of the states of deleted tasks
# a success that ends a task's silence may have fired this long before the silence began
# (a long run that was still going)
LOOKBACK = 86400.0
LATENESS_KEYS = ("warn_after", "deadline", "expect_every")
BATCH = 500  # tasks whose successes one query reads
RECHECK_OPEN = 5.0  # seconds between two looks for the end of an open alert


@dataclass(frozen=True)
class Watch:
    """What the checks need of one task that sets a lateness field."""

    task_id: str
    name: str
    group: str
    revision: int
    warn_after: float | None
    expect_every: float | None
    deadline: DeadlineSpec | None
    zone: str  # the task's time zone, for a deadline that names none
    updated: datetime | None  # the revision's time: when it was created, changed or resumed
    schedule: Any  # the spec's schedule, for the first day's chance

    @property
    def task(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "name": self.name, "group": self.group}

    def deadline_text(self) -> str:
        """``06:00 Europe/Berlin``."""
        assert self.deadline is not None
        return f"{self.deadline.at.strftime('%H:%M')} {self.deadline.timezone or self.zone}"


def watch_of(record: TaskRecord) -> Watch | None:
    """The lateness fields of a cached task, or None when it sets none (or cannot be read:
    the spec was validated when stored)."""
    spec = record.spec
    if not any(spec.get(key) is not None for key in LATENESS_KEYS):
        return None
    try:
        warn_after = parse_duration(spec["warn_after"]) if spec.get("warn_after") else None
        every = parse_duration(spec["expect_every"]) if spec.get("expect_every") else None
        deadline = parse_deadline(spec["deadline"]) if spec.get("deadline") else None
    except ValueError as e:
        log.error("task %s: its lateness fields cannot be read: %s", record.task_id, e)
        return None
    return Watch(
        task_id=record.task_id,
        name=str(spec.get("name") or record.task_id),
        group=record.group,
        revision=record.revision,
        warn_after=warn_after or None,
        expect_every=every or None,
        deadline=deadline,
        zone=task_timezone(spec.get("schedule")),
        updated=stored_time(record.updated_at),
        schedule=spec.get("schedule"),
    )


def had_chance(
    schedule: Any,
    since: datetime,
    closes: datetime,
    book: CalendarBook | None = None,
    group: str = "",
) -> bool:
    """Whether a schedule fires at or after ``since`` and by ``closes`` with a fire that runs:
    on a date its calendar rule lets through, outside ``group``'s blackouts (``book``: the
    calendars and blackouts; None: not judged). A task is held to a deadline's day only then:
    a holiday its calendar skips, a day all of whose fires fall in a maintenance window, the
    rest of a day after the task was created or resumed without a fire left, ask nothing of
    it. A schedule with no fire times of its own (``after``, ``keepalive``) always had one."""
    try:
        parsed, problems = parse_schedule(schedule, "schedule")
        if problems or parsed is None or parsed.after is not None or parsed.keepalive:
            return True
        t = since - timedelta(milliseconds=1)
        for _ in range(CHANCE_FIRES):
            fire = next_fire(parsed, t, book)
            if fire is None or fire > closes:
                return False
            if book is None or book.blackout_at(group, fire) is None:
                return True
            t = fire
    except (ValueError, ValidationError, OverflowError):
        return True
    return True  # more fires in the day than are looked at: assume one ran


def new_state(task_id: str) -> dict[str, Any]:
    return {
        "_id": task_id,
        "task_name": None,
        "active": False,
        "warns": False,  # it sets warn_after (as last seen placed)
        "since_ts": None,  # counted from: created, resumed, or watched first
        "known_success_ts": None,  # the end of its latest success seen
        "slow": [],  # [{run_id, alerted_ts}]: runs alerted as slow, not ended yet
        "overdue": None,  # {since_ts, alerted_ts}: an open task.overdue
        "deadline": None,  # {day, status: met | missed | recovered | skipped, opens_ts, closes_ts}
    }


class Lateness:
    """The checks of one center (see the module docstring). :meth:`take_over` when a
    leadership begins; :meth:`check` on each round of upkeep; :meth:`due_in` says when the
    next round is due."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime] | None = None,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.store = store
        if clock is None:
            from ..testing.clock import clock_from_environment

            clock = clock_from_environment() or utcnow
        self.clock = clock
        self.interval = interval
        self._states: dict[str, dict[str, Any]] | None = None  # as stored, read once
        self._watches: dict[str, tuple[int, Watch | None]] = {}  # task id -> (revision, watch)
        self._windows: dict[str, tuple[int, DayWindow | None, float]] = {}  # see _window
        self._limits: dict[str, tuple[Any, float | None]] = {}  # see _warn_limits
        self._looked: dict[str, float] = {}  # task id -> when its successes were read (_pick)
        self._due: dict[str, tuple[tuple[Any, ...], float]] = {}  # see _overdue_at
        self._checked_at = -CHECK_INTERVAL  # monotonic
        self._swept_at = time.monotonic()
        self._busy = False  # watching something: rounds are due every interval
        self._deferred = False  # a round was asked for before the interval ended
        self.rounds = 0

    def _calendar_book(self) -> CalendarBook | None:
        """Every calendar and blackout window (None when MongoDB does not answer: the day is
        then judged without them, as before they existed)."""
        try:
            return self.store.calendar_book()
        except CloudTaskError as e:
            log.warning("deadlines judged without calendars and blackouts: %s", e)
            return None

    def take_over(self) -> None:
        """A new leadership: the states are read again (another leader may have written)."""
        self._states = None
        self._checked_at = -self.interval

    def due_in(self) -> float | None:
        """Seconds until the next round is due: while some task is watched, or when a round
        was asked for too soon after the last (a new view: it may hold a task to watch)."""
        if not self._busy and not self._deferred:
            return None
        return max(0.05, self._checked_at + self.interval - time.monotonic())

    # --- a round ----------------------------------------------------------------------------

    def check(self, tasks: dict[str, TaskRecord], fence: Callable[[], None]) -> None:
        """One round, at most every ``interval`` seconds: events recorded, then states written
        (``fence()`` first: LeadershipLost when this center no longer leads). MongoDB trouble is
        logged, and the next round does it again."""
        if time.monotonic() - self._checked_at < self.interval:
            self._deferred = True  # done when due_in says so
            return
        self._checked_at = time.monotonic()
        self._deferred = False
        try:
            with pymongo.timeout(CALL_BUDGET):
                self._round(tasks, fence)
        except LeadershipLost:
            raise  # the upkeep steps down
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot check the tasks' lateness (the next round tries again): %s", e)

    def _round(self, tasks: dict[str, TaskRecord], fence: Callable[[], None]) -> None:
        if self._states is None:
            self._states = {d["_id"]: d for d in self.store.lateness_states()}
        watches = self._watched(tasks)
        self._busy = bool(watches) or any(self._open(s) for s in self._states.values())
        if not self._busy and not any(s.get("active") for s in self._states.values()):
            return  # (a task that left the placement while its run goes on: see _warn_limits)
        round_ = _Round(
            self._states, self.clock(), self._calendar_book, self.store.calendar_version
        )
        round_.activate(watches)
        self._slow(round_, watches)
        self._overdue(round_, watches)
        self._deadlines(round_, watches)
        if round_.events or round_.changed:
            fence()
            if round_.events:
                self.store.record_events(round_.events)
                for event in round_.events:
                    log.info("lateness: %s", event["message"])
            self.store.save_lateness_states(list(round_.changed.values()))
            self._states.update(round_.changed)
        self.rounds += 1
        self._sweep(tasks)

    @staticmethod
    def _open(state: dict[str, Any]) -> bool:
        """Whether a state keeps the checks going: an alert open, or a task with warn_after
        (its run may go on after the task left the placement)."""
        return bool(state.get("slow") or state.get("overdue") or state.get("warns"))

    def _watched(self, tasks: dict[str, TaskRecord]) -> dict[str, Watch]:
        """The tasks that set a lateness field (parsed once per revision)."""
        out = {}
        for task_id, record in tasks.items():
            known = self._watches.get(task_id)
            if known is None or known[0] != record.revision:
                known = (record.revision, watch_of(record))
                self._watches[task_id] = known
            if known[1] is not None:
                out[task_id] = known[1]
        if len(self._watches) > len(tasks):
            self._watches = {t: w for t, w in self._watches.items() if t in tasks}
        return out

    # --- warn_after ---------------------------------------------------------------------------

    def _slow(self, r: _Round, watches: dict[str, Watch]) -> None:
        open_runs = {
            entry["run_id"]: task_id
            for task_id, state in r.states.items()
            for entry in state.get("slow") or []
        }
        warns = any(w.warn_after for w in watches.values())
        if not open_runs and not warns and not any(s.get("warns") for s in r.states.values()):
            return
        running = {d["_id"]: d for d in self.store.running_runs_brief()}
        ended = [run_id for run_id in open_runs if run_id not in running]
        found = {d["_id"]: d for d in self.store.runs_brief(ended)} if ended else {}
        for run_id in ended:
            run = found.get(run_id)
            if run is not None and run.get("status") not in FINISHED_STATUSES:
                continue  # not running, not finished: a moment between two writes
            if run is not None:
                r.events.append(ev.slow_ended_event(run, r.now))
            # (a run not found was deleted with its task, or purged: nothing to tell)
            state = r.edit(open_runs[run_id])
            state["slow"] = [e for e in state["slow"] if e["run_id"] != run_id]
        fresh = [d for d in running.values() if d["_id"] not in open_runs]
        limits = self._warn_limits(fresh, watches)
        for run in fresh:
            warn_after = limits.get(run.get("task_id"))
            started = stored_time(run.get("started_at"))
            if not warn_after or started is None:
                continue
            if (r.now - started).total_seconds() < warn_after:
                continue
            r.events.append(ev.slow_event(run, warn_after, r.now))
            r.edit(run["task_id"])["slow"].append({"run_id": run["_id"], "alerted_ts": r.ts})

    def _warn_limits(
        self, runs: list[dict[str, Any]], watches: dict[str, Watch]
    ) -> dict[str, float | None]:
        """The ``warn_after`` of the tasks of these runs: a run goes on when its task has
        left the placement (a one-shot task that fired, a task paused meanwhile), so a task
        not watched is read (once per revision: most running tasks set no warn_after)."""
        out: dict[str, float | None] = {}
        missing = set()
        for run in runs:
            task_id = run.get("task_id")
            if task_id in watches:
                out[task_id] = watches[task_id].warn_after
            elif task_id in self._limits and self._limits[task_id][0] == run.get("revision"):
                out[task_id] = self._limits[task_id][1]
            else:
                missing.add(task_id)
        for doc in self.store.get_tasks(sorted(missing)) if missing else []:
            spec = doc.get("spec") or {}
            try:
                limit = parse_duration(spec["warn_after"]) if spec.get("warn_after") else None
            except ValueError:
                limit = None
            self._limits[doc["_id"]] = (doc.get("revision"), limit)
            out[doc["_id"]] = limit
        if len(self._limits) > 10_000:
            self._limits = {}
        return out

    # --- expect_every -------------------------------------------------------------------------

    def _overdue(self, r: _Round, watches: dict[str, Watch]) -> None:
        due: dict[str, float] = {}  # task id -> what its silence is counted from
        for task_id, watch in watches.items():
            if not watch.expect_every:
                continue
            state = r.state(task_id)
            since = _counted_from(state)
            if state.get("overdue") or self._is_overdue(r, watch, since):
                due[task_id] = since
        picked = self._pick(due, {t for t in due if r.state(t).get("overdue")})
        if not picked:
            return
        lo = min(due[t] for t in picked) - LOOKBACK
        latest = _latest_ends(self.store.successes_fired_since(picked, lo))
        for task_id in picked:
            watch, state = watches[task_id], r.state(task_id)
            found = latest.get(task_id)
            end = _end_ts(found)
            if end is not None and end > (state.get("known_success_ts") or 0):
                state = r.edit(task_id)
                state["known_success_ts"] = end
            alert = state.get("overdue")
            if alert:
                if found is not None and end is not None and end > alert["since_ts"]:
                    since = from_epoch(alert["since_ts"])
                    r.events.append(ev.overdue_recovered_event(watch.task, since, found, r.now))
                    r.edit(task_id)["overdue"] = None
                continue
            since_ts = _counted_from(state)
            if self._is_overdue(r, watch, since_ts):
                succeeded = since_ts == state.get("known_success_ts")
                since = from_epoch(since_ts)
                r.events.append(
                    ev.overdue_event(watch.task, watch.expect_every or 0, since, succeeded, r.now)
                )
                r.edit(task_id)["overdue"] = {"since_ts": since_ts, "alerted_ts": r.ts}

    def _is_overdue(self, r: _Round, watch: Watch, since: float) -> bool:
        """Whether ``expect_every`` of the time the task could run has passed since ``since``
        (wall time first: the calendars are read only for a task past that)."""
        every = watch.expect_every or 0
        return r.ts >= since + every and r.ts >= self._overdue_at(r, watch, since)

    def _overdue_at(self, r: _Round, watch: Watch, since: float) -> float:
        """When ``expect_every`` of open time (outside the dates its calendar skips and its
        group's blackouts) has passed since ``since``; kept per revision, start and calendar
        version (read once a round, and only for a task past its wall-time limit)."""
        every = watch.expect_every or 0
        version = r.calendar_version()
        if version is None:
            return since + every  # (judged with the calendars once they can be read)
        key = (watch.revision, since, version)
        known = self._due.get(watch.task_id)
        if known is not None and known[0] == key:
            return known[1]
        book = r.book()
        try:
            parsed, problems = parse_schedule(watch.schedule, "schedule")
        except (ValueError, ValidationError, OverflowError):
            parsed, problems = None, []
        if parsed is None or problems or book is None:
            return since + every  # (not kept: judged with the calendars when they are read)
        reached = open_time_reached(parsed, from_epoch(since), every, book, watch.group)
        due = reached.timestamp() if reached is not None else math.inf
        if len(self._due) > 2 * len(self._watches) + 1000:
            self._due = {t: v for t, v in self._due.items() if t in self._watches}
        self._due[watch.task_id] = (key, due)
        return due

    # --- deadline -----------------------------------------------------------------------------

    def _window(self, watch: Watch, now: datetime) -> DayWindow | None:
        """The window of the task's latest deadline, recomputed only once the next deadline
        has passed (kept per revision)."""
        known = self._windows.get(watch.task_id)
        if known is not None and known[0] == watch.revision and now.timestamp() < known[2]:
            return known[1]
        assert watch.deadline is not None
        window = last_window(watch.deadline, watch.zone, now)
        upcoming = next_deadline(watch.deadline, watch.zone, now)
        recheck = upcoming.timestamp() if upcoming else now.timestamp() + 3600
        self._windows[watch.task_id] = (watch.revision, window, recheck)
        return window

    def _deadlines(self, r: _Round, watches: dict[str, Watch]) -> None:
        due: dict[str, tuple[DayWindow, bool]] = {}  # task id -> (window, deciding the day)
        for task_id, watch in watches.items():
            if watch.deadline is None:
                continue
            window = self._window(watch, r.now)
            if window is None:
                continue
            day = window.day.isoformat()
            state = r.state(task_id)
            known = state.get("deadline") or {}
            if known.get("day") == day:
                if known.get("status") == "missed":
                    due[task_id] = (window, False)
                continue
            if known.get("day") and known["day"] > day:
                continue  # the deadline moved earlier: that later day was decided already
            since = max(state.get("since_ts") or 0, window.opens.timestamp())
            if not had_chance(
                watch.schedule, from_epoch(since), window.closes, r.book(), watch.group
            ):
                r.edit(task_id)["deadline"] = _day_state(window, "skipped")
                continue
            due[task_id] = (window, True)
        picked = self._pick(due, {t for t, (_, deciding) in due.items() if not deciding})
        if not picked:
            return
        lo = min(due[t][0].opens for t in picked).timestamp()
        found = self.store.successes_fired_since(picked, lo)
        first = _first_ends(found, {t: due[t][0].opens for t in picked})
        for task_id in picked:
            window, deciding = due[task_id]
            watch = watches[task_id]
            success = first.get(task_id)
            end = _end_ts(success)
            day = window.day.isoformat()
            text = watch.deadline_text()
            times = {"opens": window.opens.isoformat(), "closes": window.closes.isoformat()}
            if deciding and end is not None and end <= window.closes.timestamp():
                r.edit(task_id)["deadline"] = _day_state(window, "met")
                continue
            status = "missed"
            if deciding:
                r.events.append(ev.deadline_missed_event(watch.task, day, text, times, r.now))
            if success is not None:
                r.events.append(
                    ev.deadline_recovered_event(watch.task, day, text, times, success, r.now)
                )
                status = "recovered"
            if deciding or status != "missed":
                r.edit(task_id)["deadline"] = _day_state(window, status)

    def _pick(self, due: dict[str, Any], waiting: set[str]) -> list[str]:
        """The tasks of ``due`` to look up this round: at most ``BATCH``, those looked at
        longest ago first (10,000 deadlines passing at 06:00 take a few rounds, not one query
        too large to answer in time); of ``waiting`` (an alert open, waiting for its end) only
        those not looked at in the last ``RECHECK_OPEN`` seconds."""
        now = time.monotonic()
        order = sorted(
            (self._looked.get(t, 0.0), t)
            for t in due
            if t not in waiting or now - self._looked.get(t, 0.0) >= RECHECK_OPEN
        )
        picked = [t for _, t in order[:BATCH]]
        for task_id in picked:
            self._looked[task_id] = now
        if len(self._looked) > 4 * len(due) + 10_000:
            self._looked = {t: at for t, at in self._looked.items() if t in due}
        return picked

    # --- upkeep of the states -------------------------------------------------------------------

    def _sweep(self, tasks: dict[str, TaskRecord]) -> None:
        """Hourly: forget the states of tasks deleted (not merely paused)."""
        if time.monotonic() - self._swept_at < SWEEP_INTERVAL or self._states is None:
            return
        self._swept_at = time.monotonic()
        idle = [t for t, s in self._states.items() if t not in tasks and not s.get("active")]
        if not idle:
            return
        gone = sorted(set(idle) - self.store.existing_task_ids(idle))
        if gone:
            self.store.delete_lateness_states(gone)
            for task_id in gone:
                self._states.pop(task_id, None)


class _Round:
    """What one round changes: the states edited (copies: memory keeps the stored ones until
    they are written) and the events to record; the calendars and blackouts, read once a
    round and only when a deadline's day is decided (``book``)."""

    def __init__(
        self,
        states: dict[str, dict[str, Any]],
        now: datetime,
        read_book: Callable[[], CalendarBook | None] = lambda: None,
        read_version: Callable[[], int] = lambda: 0,
    ) -> None:
        self.states = states
        self.now = now
        self.ts = now.timestamp()
        self.changed: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._read_book = read_book
        self._book: list[CalendarBook | None] = []
        self._read_version = read_version
        self._version: list[int | None] = []

    def calendar_version(self) -> int | None:
        """The calendars' change counter, read once a round when asked (None when MongoDB
        does not answer it: the round goes on, judging wall time)."""
        if not self._version:
            try:
                self._version.append(self._read_version())
            except CloudTaskError as e:
                log.warning("overdue tasks judged without calendars and blackouts: %s", e)
                self._version.append(None)
        return self._version[0]

    def book(self) -> CalendarBook | None:
        if not self._book:
            self._book.append(self._read_book())
        return self._book[0]

    def state(self, task_id: str) -> dict[str, Any]:
        return self.changed.get(task_id) or self.states.get(task_id) or new_state(task_id)

    def edit(self, task_id: str) -> dict[str, Any]:
        if task_id not in self.changed:
            self.changed[task_id] = copy.deepcopy(self.state(task_id))
        return self.changed[task_id]

    def activate(self, watches: dict[str, Watch]) -> None:
        """Tasks newly watched (created, given a field, resumed) are counted from their
        revision's time; those no longer watched (paused, deleted, the fields removed) are
        marked inactive (their open alerts stay open)."""
        for task_id, watch in watches.items():
            state = self.state(task_id)
            warns = bool(watch.warn_after)
            if not state.get("active"):
                since = watch.updated.timestamp() if watch.updated else self.ts
                edited = self.edit(task_id)
                edited.update(active=True, since_ts=min(since, self.ts), task_name=watch.name)
                edited["warns"] = warns
            elif state.get("task_name") != watch.name or bool(state.get("warns")) != warns:
                self.edit(task_id).update(task_name=watch.name, warns=warns)
        for task_id, state in list(self.states.items()):
            if state.get("active") and task_id not in watches:
                self.edit(task_id)["active"] = False


def _counted_from(state: dict[str, Any]) -> float:
    return max(state.get("known_success_ts") or 0.0, state.get("since_ts") or 0.0)


def _end_ts(run: dict[str, Any] | None) -> float | None:
    end = stored_time((run or {}).get("finished_at"))
    return end.timestamp() if end is not None else None


def _latest_ends(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each task's success that ended last."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        end = _end_ts(run)
        known = _end_ts(out.get(run["task_id"]))
        if end is not None and (known is None or end > known):
            out[run["task_id"]] = run
    return out


def _first_ends(runs: list[dict[str, Any]], opens: dict[str, datetime]) -> dict[str, dict]:
    """Each task's success that ended first among those fired in its window."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        task_id = run["task_id"]
        fired = stored_time(run.get("scheduled_for"))
        if task_id not in opens or fired is None or fired < opens[task_id]:
            continue
        end = _end_ts(run)
        known = _end_ts(out.get(task_id))
        if end is not None and (known is None or end < known):
            out[task_id] = run
    return out


def _day_state(window: DayWindow, status: str) -> dict[str, Any]:
    return {
        "day": window.day.isoformat(),
        "status": status,
        "opens_ts": window.opens.timestamp(),
        "closes_ts": window.closes.timestamp(),
    }
