"""The dashboard: the blackout windows open now or opening within a day, tasks by state,
runs and success rate in the last 24 h, failing tasks, agents online and offline, unassigned
tasks, recent runs.

Every figure is one indexed read, chosen by measuring the MongoDB wire server used on one
machine (nx-27017, SQLite underneath) with 10,000 tasks and 100,000 runs:

- tasks by state: ``$match enabled`` + ``$group`` by group reads only the ``group_enabled``
  index (about 2 ms, where a count of ``enabled`` alone scans every task); done tasks have no
  index of their own and take one scan (about 25 ms);
- runs in the last 24 h: one ``$match`` on the numeric ``ts`` + ``$group`` by status, run as
  one SQL query over the ``ts`` index (about 40 ms for 10,000 runs a day). The range is
  bounded on both sides: with only a lower bound SQLite walks the status index instead, six
  times slower;
- failing tasks: one indexed read per failing status (``last_run.status``), merged here.

These figures are read at most once per ``DASHBOARD_CACHE_SECONDS`` (app config, 5 s) and
shared by every viewer; the recent runs are read on every view. The cluster parts (agents,
unassigned tasks) come from the cached cluster view; without ZooKeeper they say "cluster not
connected" and the rest of the page still works.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, current_app, render_template
from pymongo.errors import PyMongoError

from cloudtask.clock import from_epoch, utcnow
from cloudtask.exceptions import CloudTaskError, StoreError
from cloudtask.runmodel import FAILING_STATUSES
from cloudtask.store import Store

from .auth import requires
from .calendar_pages import blackout_rows
from .context import agents, cluster, extension, store
from .queries import RUN_STATUSES
from .tasks import run_link

bp = Blueprint("dashboard", __name__)

DAY_SECONDS = 86_400
# the runs that count for the success rate: finished runs that ran (or should have) to an end;
# skipped and missed fires never started, so they neither help nor hurt
RATE_STATUSES = ("succeeded", *FAILING_STATUSES, "killed")
FAILING_SHOWN = 20
UNASSIGNED_SHOWN = 20
RECENT_RUNS = 15
OFFLINE_SHOWN = 10
CACHE_SECONDS = 5.0
BLACKOUT_AHEAD = timedelta(hours=24)  # blackouts shown before they open


@dataclass
class TaskStates:
    """Counts that match the task list's ``state`` filter (Store.task_page)."""

    enabled: int = 0  # enabled and not done
    paused: int = 0  # enabled false (done or not)
    done: int = 0
    total: int = 0


@dataclass
class RunStats:
    by_status: dict[str, int] = field(default_factory=dict)
    total: int = 0
    succeeded: int = 0
    counted: int = 0  # succeeded + failed + timed_out + lost + killed
    since: datetime | None = None

    @property
    def success_rate(self) -> float | None:
        """Percent of counted runs that succeeded; None when no run counts."""
        return 100.0 * self.succeeded / self.counted if self.counted else None


def task_states(db: Store) -> TaskStates:
    enabled, paused, done = db.task_flag_counts()
    done_enabled = sum(n for flag, n in done.items() if flag)  # stored true, or 1 after $set
    return TaskStates(
        enabled=max(0, enabled - done_enabled),
        paused=paused,
        done=sum(done.values()),
        total=enabled + paused,
    )


def run_stats(db: Store, now: float | None = None) -> RunStats:
    """Runs scheduled in the last 24 h, by status (``ts`` is scheduled_for in epoch seconds)."""
    now = time.time() if now is None else now
    since = now - DAY_SECONDS
    # the upper bound only steers SQLite's planner to the ts index (see the module's notes);
    # it is a day ahead so that no run is left out by a clock a little ahead
    counts = db.run_status_counts(since, now + DAY_SECONDS)
    by_status = {s: counts.get(s, 0) for s in RUN_STATUSES}
    by_status.update({str(s): n for s, n in counts.items() if s not in by_status})  # unknown
    return RunStats(
        by_status=by_status,
        total=sum(counts.values()),
        succeeded=by_status["succeeded"],
        counted=sum(by_status[s] for s in RATE_STATUSES),
        since=from_epoch(since),
    )


def failing_tasks(db: Store) -> tuple[list[dict[str, Any]], int]:
    """Tasks whose last run failed, timed out or was lost, latest failure first (at most
    ``FAILING_SHOWN``), and how many there are."""
    return db.tasks_last_ended(FAILING_STATUSES, FAILING_SHOWN)


def unassigned_tasks(db: Store, unassigned: dict[str, str]) -> list[dict[str, Any]]:
    """The first ``UNASSIGNED_SHOWN`` tasks the leader could not place (no live agent in
    their group), by group and name. A task deleted meanwhile is shown by its id."""
    ids = sorted(unassigned, key=lambda t: (unassigned[t], t))[:UNASSIGNED_SHOWN]
    names = db.task_names(ids)
    rows = [{"id": t, "name": names.get(t), "group": unassigned[t]} for t in ids]
    rows.sort(key=lambda r: (r["group"], r["name"] or r["id"]))
    return rows


def recent_runs(db: Store) -> list[dict[str, Any]]:
    return db.recent_runs(RECENT_RUNS)


RECENT_EVENTS = 10


def recent_events(db: Store) -> list[dict[str, Any]]:
    """The newest events that need attention (errors and warnings)."""
    return db.recent_events(("error", "warning"), RECENT_EVENTS)


def agent_summary() -> dict[str, Any]:
    """Counts of online, leaving and offline agents, and the latest offline ones."""
    rows = agents()
    counts = {"online": 0, "leaving": 0, "offline": 0}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    offline = [r for r in rows if r["status"] == "offline"]
    offline.sort(key=lambda r: _aware(r.get("last_seen")), reverse=True)
    return {"counts": counts, "offline": offline[:OFFLINE_SHOWN], "total": len(rows)}


def _aware(value: Any) -> datetime:
    if not isinstance(value, datetime):
        return datetime.min.replace(tzinfo=timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass
class Figures:
    """What the dashboard reads from MongoDB, but for the recent runs (always fresh)."""

    states: TaskStates
    runs: RunStats
    failing: list[dict[str, Any]]
    failing_total: int
    read_at: datetime


def read_figures(db: Store) -> Figures:
    try:
        failing, failing_total = failing_tasks(db)
        return Figures(task_states(db), run_stats(db), failing, failing_total, utcnow())
    except PyMongoError as e:
        raise _store_error(e) from e


def figures() -> Figures:
    """The figures, read at most once per ``DASHBOARD_CACHE_SECONDS`` (5; 0 reads every time):
    a dashboard left open by many people costs one set of reads, not one per view."""
    ttl = float(current_app.config.get("DASHBOARD_CACHE_SECONDS", CACHE_SECONDS))
    return extension().cached("dashboard.figures", ttl, lambda: read_figures(store()))


def _store_error(e: PyMongoError) -> StoreError:
    return StoreError(
        f"MongoDB failed to read the dashboard's figures ({type(e).__name__}: {e}); "
        "check that it runs and that mongodb.uri points at it"
    )


def blackouts_now() -> list[dict[str, Any]]:
    """The blackout windows open now, then those opening within BLACKOUT_AHEAD (soonest
    first): nothing of their groups starts then."""
    try:
        rows = blackout_rows()
    except CloudTaskError:
        return []
    soon = utcnow() + BLACKOUT_AHEAD
    open_now = [b for b in rows if b["open_until"]]
    coming = [b for b in rows if b["next_opening"] and b["next_opening"] <= soon]
    return open_now + sorted(coming, key=lambda b: b["next_opening"])


@bp.get("/")
@requires("viewer")
def index() -> Any:
    db = store()
    view = cluster()
    data = figures()
    try:
        unassigned = unassigned_tasks(db, view.unassigned) if view.connected else []
        recent = recent_runs(db)
        events = recent_events(db)
    except PyMongoError as e:
        raise _store_error(e) from e
    return render_template(
        "dashboard.html",
        connected=view.connected,
        leader=view.leader,
        states=data.states,
        runs=data.runs,
        read_at=data.read_at,
        failing=data.failing,
        failing_total=data.failing_total,
        failing_statuses=FAILING_STATUSES,
        agents=agent_summary() if view.connected else None,
        unassigned=unassigned,
        unassigned_total=len(view.unassigned),
        recent=recent,
        events=events,
        run_link=run_link,
        blackouts=blackouts_now(),
    )
