"""Fan-in: tasks that run after their parents (``"schedule": {"after": ["A", "B"]}``).

The leader's upkeep calls :meth:`FanIn.fire` every few seconds. For each task whose schedule
is ``after``, it reads the runs of its parents (by name, among every task) of the last
days and groups them by **logical date**: the date of each run's fire time
(``scheduled_for``) in the child's time zone, so a parent that fired on the 4th and finished
after midnight still counts for the 4th. A date for which every parent has a succeeded run
gets one fire of the child: a run ``queued`` with no agent, ``scheduled_for`` at that date's
midnight there (trigger ``after``), which the child's owner takes like a released claim and
runs at once. Its claim key (task, time, slot, attempt) makes the fire for a date exist once
whoever writes it, a leader that took over included. With ``within``, the parents' successes
for a date must come within that long of the first: otherwise, or once that long has passed
since the first with parents still missing, the date is recorded ``missed`` with the reason.

A date counts only when its last parent success (for a miss: its first) finished after the
child's last change: a task created or edited today does not run for the dates its parents
finished before. What a child waits for (``waiting for B``, ``held: B failed``) is
:func:`cloudtask.dependencies.dependency_status`, for the pages and the API.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Any

from ..clock import stored_time, utcnow
from ..dependencies import LOOKBACK, after_schedule
from ..schedules import AfterSchedule
from ..store import Store
from .tasks import TaskRecord

log = logging.getLogger(__name__)

FANIN_INTERVAL = 2.0  # seconds between two looks of the leader


def after_of(record: TaskRecord) -> AfterSchedule | None:
    """The after schedule of a task's stored spec, or None."""
    return after_schedule(record.spec)


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return stored_time(value)


class FanIn:
    """The leader's firing of fan-in tasks (see the module notes)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._looked = 0.0
        self._done: dict[str, set[date]] = defaultdict(set)  # child -> dates written

    def due(self) -> bool:
        return time.monotonic() - self._looked >= FANIN_INTERVAL

    def fire(self, tasks: dict[str, TaskRecord], now: datetime | None = None) -> int:
        """One look: the fires (and misses) due. Returns how many fires were queued."""
        self._looked = time.monotonic()
        now = now or utcnow()
        children = [(r, a) for r in tasks.values() if (a := after_of(r)) is not None]
        if not children:
            return 0
        # parents by name among every task (a paused or finished one-shot parent's runs
        # count as much as a live one's)
        found = self.store.tasks_by_names(sorted({p for _, a in children for p in a.parents}))
        queued = 0
        for record, after in children:
            if any(name not in found for name in after.parents):
                continue  # a parent is gone: the child waits (its status says so)
            parent_ids = {name: found[name]["_id"] for name in after.parents}
            queued += self._fire_child(record, after, parent_ids, now)
        return queued

    def _fire_child(
        self, record: TaskRecord, after: AfterSchedule, parents: dict[str, str], now: datetime
    ) -> int:
        since = now - LOOKBACK - timedelta(seconds=after.within or 0)
        runs = self.store.parent_runs(list(parents.values()), since, now)
        name_of = {tid: name for name, tid in parents.items()}
        # date -> parent name -> the first success that day (finished_at, run id)
        successes: dict[date, dict[str, tuple[datetime, str]]] = defaultdict(dict)
        for run in runs:
            if run.get("status") != "succeeded" or run.get("finished_at") is None:
                continue
            day = after.logical_date(stored_time(run["scheduled_for"]))
            finished = stored_time(run["finished_at"])
            name = name_of[run["task_id"]]
            have = successes[day].get(name)
            if have is None or finished < have[0]:
                successes[day][name] = (finished, run["_id"])
        changed = _when(record.updated_at)
        queued = 0
        for day, done in sorted(successes.items()):
            if day in self._done[record.task_id]:
                continue
            first = min(f for f, _ in done.values())
            last = max(f for f, _ in done.values())
            complete = len(done) == len(parents)
            if complete and changed is not None and last <= changed:
                continue  # all before the child's last change: not for it
            if not complete and (changed is not None and first <= changed):
                continue
            reason = None
            if after.within is not None:
                if complete and (last - first).total_seconds() > after.within:
                    reason = (
                        f"its parents succeeded {_span(last - first)} apart for {day}, more "
                        f"than within {_span(timedelta(seconds=after.within))}"
                    )
                elif not complete and (now - first).total_seconds() > after.within:
                    missing = ", ".join(p for p in parents if p not in done)
                    reason = (
                        f"waited {_span(timedelta(seconds=after.within))} for {missing} "
                        f"to succeed for {day}"
                    )
            if not complete and reason is None:
                continue
            wrote = self.store.record_after_fire(
                record.task_id,
                record.spec.get("name", ""),
                record.group,
                record.revision,
                after.date_start(day),
                day.isoformat(),
                {name: run_id for name, (_, run_id) in done.items()},
                missed=reason,
                now=now,
            )
            self._done[record.task_id].add(day)
            if wrote and reason is None:
                queued += 1
                log.info("task %s runs for %s: its parents succeeded", record.task_id, day)
            elif wrote:
                log.warning("task %s missed %s: %s", record.task_id, day, reason)
        return queued


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"
