"""The agent's local scheduler: pure logic, no I/O, time passed in.

``tick(now)`` returns the fires that are due and how long to sleep until the next one, so the
engine is tested with fixed times and nothing sleeps (Celery beat's ``tick`` and APScheduler's
``get_due_jobs(now)`` are the models).

Late fires: when a tick finds several fires of one task due (the process was paused, the host
was overloaded), the latest one is the fire to run and every earlier one is reported as
``missed``, each with its own scheduled time, so history shows exactly what did not run. The
latest one runs with trigger ``schedule`` if it is at most ``on_time_tolerance`` late; later
than that it follows the task's ``misfire`` policy within ``misfire_grace``: ``run_once`` runs
it as a ``catch-up``, ``skip`` records it ``missed``. Beyond the grace it is ``missed`` too.

Claims ahead of the due time: with ``claim_ahead`` (seconds, L) the fires of a task's
schedule come out of a tick between L and 1.5 L before they are due (the agent claims them
then and starts them at their time, agent.py), in batches: a tick that finds one fire within L
also gives every fire due within 1.5 L. Fires already due, retries and keepalive starts come
out at their due time as before, and the rule of a late tick is about due fires only: a fire
given ahead is on time by definition.

Calendars and blackouts (cloudtask/calendars.py), from the book of ``calendars`` (an object
whose ``book`` is the latest :class:`~cloudtask.calendars.CalendarBook`, or None): a fire on
a local date its schedule's calendar rule does not let through does not exist (the fires are
computed past it); a fire that falls in a blackout of its task's group comes out
``skipped`` with the note ``blackout NAME``, as does a retry due in one; a keepalive start
due in one waits for its end. :meth:`Scheduler.refresh` plans the next fires again after the
book changed.

Example::

    sched = Scheduler()
    sched.upsert("t1", spec, revision=1, now=now)
    fires, delay = sched.tick(now + timedelta(seconds=10))
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..calendars import next_fire
from ..clock import to_bson_time
from ..schedules import KEEPALIVE_RESET_AFTER, keepalive_backoff
from ..task import TaskSpec

MAX_MISSED_PER_TICK = 1000  # a long pause with a 1 s schedule must not flood the store
_EPSILON = timedelta(microseconds=1)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fire:
    """One thing the agent should do now for one task.

    ``status`` is None for a fire to run, or ``"missed"`` for a fire to record only.
    """

    task_id: str
    scheduled_for: datetime
    trigger: str
    revision: int
    attempt: int = 0
    status: str | None = None
    note: str | None = None  # why it is recorded, when there is more to say


@dataclass
class _Entry:
    spec: TaskSpec
    revision: int
    generation: int
    next_fire: datetime | None = None
    keepalive_restarts: int = 0
    keepalive_running: bool = False
    given: datetime | None = None  # the latest fire given out (refresh plans from after it)


@dataclass(order=True)
class _Due:
    wake: datetime  # when a tick should see it: ``at``, or ``at`` less the lead for a schedule
    seq: int
    at: datetime = field(compare=False)
    task_id: str = field(compare=False)
    generation: int = field(compare=False)
    kind: str = field(compare=False)  # "schedule" | "retry"
    scheduled_for: datetime | None = field(compare=False, default=None)
    attempt: int = field(compare=False, default=0)


def has_fire(spec: TaskSpec, at: datetime, book: Any = None) -> bool:
    """Whether the schedule of ``spec`` fires at ``at`` (a time as stored: to the
    millisecond), its calendar rule judged by ``book``. A claim made ahead under an earlier
    revision starts only then."""
    if spec.schedule.keepalive:
        return False
    nxt = next_fire(spec.schedule, at - timedelta(milliseconds=1), book)
    return nxt is not None and to_bson_time(nxt) == to_bson_time(at)


class Scheduler:
    """Which of the agent's tasks fire when. Thread-safe; every method takes ``now``."""

    def __init__(
        self,
        on_time_tolerance: float = 2.0,
        max_sleep: float = 1.0,
        claim_ahead: float = 0.0,
        calendars: Any = None,
    ) -> None:
        self.on_time_tolerance = timedelta(seconds=on_time_tolerance)
        self.max_sleep = max_sleep
        self.ahead = timedelta(seconds=claim_ahead)  # see the module docstring
        self.batch = self.ahead / 2
        self._tasks: dict[str, _Entry] = {}
        self._heap: list[_Due] = []
        self._seq = itertools.count()
        self._generations = itertools.count(1)
        self._lock = threading.Lock()
        self.calendars = calendars  # see the module docstring

    def _next(self, spec: TaskSpec, t: datetime) -> datetime | None:
        """The next fire of ``spec`` after ``t``, its calendar rule judged."""
        book = self.calendars.book if self.calendars is not None else None
        return next_fire(spec.schedule, t, book)

    def _blackout(self, spec: TaskSpec, at: datetime) -> Any:
        """The blackout of the task's group holding ``at``, or None."""
        book = self.calendars.book if self.calendars is not None else None
        return book.blackout_at(spec.group, at) if book is not None else None

    def refresh(self, now: datetime) -> None:
        """The calendars changed: the tasks whose schedule names one plan their next fire
        again, from after the latest fire they gave out (or ``now``)."""
        with self._lock:
            for task_id, entry in self._tasks.items():
                spec = entry.spec
                if spec.schedule.keepalive or not any(
                    item.window.calendar is not None for item in spec.schedule.items
                ):
                    continue
                if entry.next_fire is not None and entry.next_fire <= now:
                    continue  # due: the next tick gives it
                after = max(now, entry.given) if entry.given is not None else now
                entry.generation = next(self._generations)
                entry.next_fire = self._next(spec, after)
                self._push(entry, task_id, "schedule")

    # --- task set ---------------------------------------------------------------------------

    def upsert(
        self,
        task_id: str,
        spec: TaskSpec,
        revision: int,
        now: datetime,
        since: datetime | None = None,
    ) -> bool:
        """Add a task or take a new revision of it. Returns True if anything changed.

        A changed task is rescheduled from ``now``: its next fire follows the new schedule.
        ``since``, for a task new to this scheduler, is when its fires were last looked after
        (its latest recorded run, or when it was created or changed): fires after it that are
        already due come out of the next tick as missed or caught up, per the task's policy.
        """
        with self._lock:
            current = self._tasks.get(task_id)
            if current is not None and current.revision == revision:
                return False
            entry = _Entry(spec=spec, revision=revision, generation=next(self._generations))
            if spec.schedule.keepalive:
                if current is not None and current.keepalive_running:
                    entry.keepalive_running = True  # the running process keeps its slot
                    entry.keepalive_restarts = current.keepalive_restarts
                else:
                    entry.next_fire = to_bson_time(now)
            elif (
                current is not None
                and current.next_fire is not None
                and current.next_fire <= now
                and not current.spec.schedule.keepalive
            ):
                entry.next_fire = current.next_fire  # due, not yet ticked: it still fires
            elif current is None and since is not None and since < now:
                # every fire since then is accounted for: the newest per the misfire policy,
                # the older ones recorded missed (see _due_fires)
                entry.next_fire = self._next(spec, since)
            else:
                entry.next_fire = self._next(spec, now)
            self._tasks[task_id] = entry
            self._push(entry, task_id, "schedule")
            return True

    def remove(self, task_id: str) -> bool:
        with self._lock:
            return self._tasks.pop(task_id, None) is not None

    def task_ids(self) -> set[str]:
        with self._lock:
            return set(self._tasks)

    def revision(self, task_id: str) -> int | None:
        with self._lock:
            entry = self._tasks.get(task_id)
            return entry.revision if entry else None

    def next_fire(self, task_id: str) -> datetime | None:
        with self._lock:
            entry = self._tasks.get(task_id)
            return entry.next_fire if entry else None

    # --- feedback from the executor ---------------------------------------------------------

    def retry(self, task_id: str, scheduled_for: datetime, attempt: int, due: datetime) -> None:
        """Schedule attempt ``attempt`` of the fire ``scheduled_for`` at ``due``."""
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None:
                return
            heapq.heappush(
                self._heap,
                _Due(
                    due,
                    next(self._seq),
                    due,
                    task_id,
                    entry.generation,
                    "retry",
                    scheduled_for,
                    attempt,
                ),
            )

    def keepalive_exited(
        self, task_id: str, started_at: datetime, finished_at: datetime
    ) -> datetime | None:
        """A keepalive run ended: plan its restart with exponential backoff. Returns the restart time."""
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None or not entry.spec.schedule.keepalive:
                return None
            entry.keepalive_running = False
            if (finished_at - started_at).total_seconds() >= KEEPALIVE_RESET_AFTER:
                entry.keepalive_restarts = 0
            entry.keepalive_restarts += 1
            delay = keepalive_backoff(entry.keepalive_restarts)
            entry.next_fire = to_bson_time(finished_at + timedelta(seconds=delay))
            self._push(entry, task_id, "schedule")
            return entry.next_fire

    def keepalive_not_started(self, task_id: str, now: datetime) -> None:
        """The keepalive fire was not started (claim lost or failed): try again after a backoff."""
        self.keepalive_exited(task_id, now, now)

    def keepalive_retry_at(self, task_id: str, when: datetime) -> None:
        """Try to start the keepalive again at ``when``, without counting a restart (another
        process holds it for now)."""
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None or not entry.spec.schedule.keepalive:
                return
            entry.keepalive_running = False
            entry.next_fire = to_bson_time(when)
            self._push(entry, task_id, "schedule")

    # --- the engine -------------------------------------------------------------------------

    def tick(self, now: datetime) -> tuple[list[Fire], float]:
        """Return every fire due at ``now`` (in due order), and with ``claim_ahead`` the fires
        of schedules due soon (see the module docstring), and the seconds until the next tick
        has something to give."""
        fires: list[Fire] = []
        until = now + self.ahead + self.batch  # schedule fires up to then are given now
        early: list[_Due] = []  # seen with the batch, not due yet: a retry or keepalive start
        with self._lock:
            while self._heap and self._heap[0].wake <= now + self.batch:
                due = heapq.heappop(self._heap)
                if due.at > now and due.wake == due.at:
                    early.append(due)  # given at its due time only
                    continue
                entry = self._tasks.get(due.task_id)
                if entry is None:
                    continue  # removed since this was planned
                if due.kind != "retry" and entry.generation != due.generation:
                    continue  # changed since: the new revision planned its own next fire
                if due.kind == "retry":
                    blackout = self._blackout(entry.spec, now)
                    fires.append(
                        Fire(
                            due.task_id,
                            due.scheduled_for or due.at,
                            "retry",
                            entry.revision,
                            due.attempt,
                            status="skipped" if blackout is not None else None,
                            note=f"blackout {blackout.name}" if blackout is not None else None,
                        )
                    )
                elif entry.spec.schedule.keepalive:
                    if entry.next_fire is None or entry.keepalive_running:
                        continue
                    book = self.calendars.book if self.calendars is not None else None
                    end = book.blackout_end(entry.spec.group, now) if book is not None else None
                    if end is not None:  # started when the blackout is over
                        entry.next_fire = to_bson_time(max(end, now))
                        self._push(entry, due.task_id, "schedule")
                        continue
                    trigger = "schedule" if entry.keepalive_restarts == 0 else "restart"
                    fires.append(Fire(due.task_id, entry.next_fire, trigger, entry.revision))
                    entry.keepalive_running = True
                    entry.next_fire = None
                else:
                    fires.extend(self._due_fires(due.task_id, entry, now, until))
                    self._push(entry, due.task_id, "schedule")
            for due in early:
                heapq.heappush(self._heap, due)
            delay = self.max_sleep
            if self._heap:
                delay = min(delay, max(0.0, (self._heap[0].wake - now).total_seconds()))
        return fires, delay

    def _due_fires(self, task_id: str, entry: _Entry, now: datetime, until: datetime) -> list[Fire]:
        """The task's fires up to ``until``: the due ones (up to ``now``) by the rule of a late
        tick, then the ones given ahead, each to run at its time."""
        spec = entry.spec
        first = t = entry.next_fire
        # The newest MAX_MISSED_PER_TICK due fires are reported (a 1 s task paused for a day
        # would otherwise write 86,400 documents); older ones are only logged.
        due: deque[datetime] = deque(maxlen=MAX_MISSED_PER_TICK)
        steps = 0
        while t is not None and t <= now:
            due.append(t)
            t = self._next(spec, t)
            steps += 1
            if steps > 20 * MAX_MISSED_PER_TICK:  # far too many: start again closer to now
                span = (now - due[0]) / 2
                t = self._next(spec, now - span - _EPSILON)
                due.clear()
                steps = 0
        ahead: list[datetime] = []
        while t is not None and t <= until:  # not due yet: given ahead (see the docstring)
            ahead.append(t)
            t = self._next(spec, t)
        entry.next_fire = t
        if ahead or due:
            entry.given = ahead[-1] if ahead else due[-1]
        given = [Fire(task_id, to_bson_time(a), "schedule", entry.revision) for a in ahead]
        if not due:
            return self._blacked_out(spec, given)
        *earlier, latest = due
        out = [
            Fire(task_id, to_bson_time(t), "schedule", entry.revision, status="missed")
            for t in earlier
        ]
        if out and first is not None and due[0] != first:
            log.warning("task %s: fires from %s to %s were missed", task_id, first, due[0])
            out[0] = Fire(
                task_id,
                out[0].scheduled_for,
                "schedule",
                entry.revision,
                status="missed",
                note=f"earlier fires from {first.isoformat()} on were missed too "
                f"(more than {MAX_MISSED_PER_TICK}: not recorded one by one)",
            )
        verdict = self.late_verdict(entry.spec, latest, now)
        if verdict == "run":
            out.append(Fire(task_id, to_bson_time(latest), "schedule", entry.revision))
        elif verdict == "catch-up":
            out.append(Fire(task_id, to_bson_time(latest), "catch-up", entry.revision))
        else:
            out.append(
                Fire(task_id, to_bson_time(latest), "schedule", entry.revision, status="missed")
            )
        return self._blacked_out(spec, out + given)

    def _blacked_out(self, spec: TaskSpec, fires: list[Fire]) -> list[Fire]:
        """``fires`` with each one that falls in a blackout of the task's group recorded
        ``skipped`` with the note ``blackout NAME`` (the fire exists, and is not run)."""
        if self.calendars is None or not fires:
            return fires
        out = []
        for fire in fires:
            blackout = self._blackout(spec, fire.scheduled_for)
            if blackout is not None:
                fire = Fire(
                    fire.task_id,
                    fire.scheduled_for,
                    fire.trigger,
                    fire.revision,
                    fire.attempt,
                    status="skipped",
                    note=f"blackout {blackout.name}",
                )
            out.append(fire)
        return out

    def late_verdict(self, spec: TaskSpec, scheduled_for: datetime, now: datetime) -> str:
        """The rule of a late tick for one fire: ``run`` (at most ``on_time_tolerance`` late),
        ``catch-up`` (later, within ``misfire_grace``, with ``run_once``) or ``missed``. The
        agent applies it to fires that waited to be claimed and to claims left by others."""
        late = now - scheduled_for
        if late <= self.on_time_tolerance:
            return "run"
        if late <= timedelta(seconds=spec.misfire_grace) and spec.misfire == "run_once":
            return "catch-up"
        return "missed"

    def _push(self, entry: _Entry, task_id: str, kind: str) -> None:
        if entry.next_fire is not None:
            at = entry.next_fire
            wake = at if entry.spec.schedule.keepalive else at - self.ahead
            heapq.heappush(
                self._heap, _Due(wake, next(self._seq), at, task_id, entry.generation, kind)
            )
