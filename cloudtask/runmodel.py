"""The run model: a run's statuses and triggers, its document, and what a finished run means.

A run document is written first as a claim (see :func:`new_run_document` and
:meth:`cloudtask.store.Store.claim_runs`), then by its agent as it starts and ends. The pure
rules here are the one place the statuses are defined and the one place that says what a
finished run does to its task's history: how many failures in a row, which events it makes.
The store applies them; the pages, the API and the alerts read the same names.

>>> from datetime import datetime, timezone
>>> end = datetime(2026, 1, 1, tzinfo=timezone.utc)
>>> summary = last_run_summary([{"_id": "r1", "status": "failed", "finished_at": end,
...                              "duration": 1.5, "trigger": "schedule"}])
>>> summary["status"], summary["duration"]
('failed', 1.5)
>>> count_failures({"status": "failed", "failures": 2, "id": "r0"},
...                [{"_id": "r1", "status": "lost"}])[0]
3
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypedDict

from bson import ObjectId

from . import events as ev
from .clock import stored_time, to_bson_time

SCHEMA_VERSION = 1

# seconds between an agent's heartbeats of its unfinished runs (see Store.beat_runs)
BEAT_INTERVAL = 2.0
# how much of a run's output its document keeps (the end of it)
OUTPUT_TAIL_BYTES = 64 * 1024

# Statuses. ``queued``: a claimed fire waiting for a free slot (max_parallel), a manual run
# or a released claim waiting for an agent; ``claimed``: a fire claimed ahead of its due time
# by the agent that starts it then, unless it cannot (agent/armed.py); ``running``: its process
# or request started.
RUNNING_STATUSES = ("queued", "claimed", "running")
# of those, the runs going or waiting to go now (not a claim ahead, which its agent records
# ``skipped`` when its task is deleted or paused before it is due)
GOING_STATUSES = ("queued", "running")
FINISHED_STATUSES = (
    "succeeded",
    "failed",
    "timed_out",
    "killed",
    "skipped",
    "missed",
    "lost",
)
STATUSES = RUNNING_STATUSES + FINISHED_STATUSES
# the statuses a later success recovers from, and the ones a run with retries left is retried
# after: not "missed" (a fire nobody ran says nothing about the task itself), not "killed"
# (someone or something meant to stop it)
FAILING_STATUSES = ev.FAILING_STATUSES
RETRY_STATUSES = FAILING_STATUSES
# what the service of an http task may report as its result (a callback)
RESULT_STATUSES = ("succeeded", "failed")

# Triggers: why a run exists
TRIGGERS = ("schedule", "catch-up", "retry", "manual")


class RunDoc(TypedDict, total=False):
    """A run document as stored (``runs`` collection). Times are aware UTC datetimes at
    milliseconds; ``ts`` is ``scheduled_for`` in epoch seconds."""

    _id: str
    version: int
    task_id: str
    task_name: str
    group: str
    revision: int
    scheduled_for: datetime
    ts: float
    slot: str
    attempt: int
    trigger: str
    agent: str | None
    session: str | None
    status: str
    claimed_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None
    exit_code: int | None
    output_tail: str
    error: str | None
    token_hash: str | None
    beat: float
    requested_by: str
    released_by: str | None


def new_id() -> str:
    return str(ObjectId())


def new_run_document(
    *,
    task_id: str,
    task_name: str,
    group: str,
    revision: int,
    scheduled_for: datetime,
    slot: str,
    attempt: int,
    trigger: str,
    agent: str | None,
    status: str,
    now: datetime,
    token_hash: str | None = None,
    session: str | None = None,
) -> dict[str, Any]:
    """A run document as an agent inserts it to claim a fire (see :meth:`Store.claim_runs`).

    A fire recorded without running (``skipped``, ``missed``) is finished at once, so it
    expires with the other finished runs.
    """
    claimed_at = to_bson_time(now)
    scheduled_for = to_bson_time(scheduled_for)
    done = status in FINISHED_STATUSES
    return {
        "_id": new_id(),
        "version": SCHEMA_VERSION,
        "task_id": task_id,
        "task_name": task_name,
        "group": group,
        "revision": revision,
        "scheduled_for": scheduled_for,
        # the same instant in epoch seconds: ranges over numbers are fast on every server
        # (the dashboard's and the lists' counts use it)
        "ts": scheduled_for.timestamp(),
        "slot": slot,
        "attempt": attempt,
        "trigger": trigger,
        "agent": agent,
        "session": session,
        "status": status,
        "claimed_at": claimed_at,
        "started_at": None,
        "finished_at": claimed_at if done else None,
        "duration": 0.0 if done else None,
        "exit_code": None,
        "output_tail": "",
        "error": None,
        "token_hash": token_hash,
    }


def next_attempt_document(doc: dict[str, Any], trigger: str, now: datetime) -> dict[str, Any]:
    """The next attempt of the fire of run ``doc``: ``queued`` with no agent, its own claim
    (same task, fire time and slot, ``attempt`` + 1), for any agent that may take it."""
    return new_run_document(
        task_id=doc["task_id"],
        task_name=doc.get("task_name", ""),
        group=doc.get("group", "default"),
        revision=doc.get("revision", 0),
        scheduled_for=stored_time(doc["scheduled_for"]),
        slot=doc.get("slot", "one"),
        attempt=doc.get("attempt", 0) + 1,
        trigger=trigger,
        agent=None,
        status="queued",
        now=now,
    )


def released_fields(by: str | None, reason: str) -> dict[str, Any]:
    """What a claim handed back unstarted carries: still ``queued``, with no agent, for the
    task's owner to take over (see :meth:`Store.take_pending_run`)."""
    return {
        "status": "queued",
        "agent": None,
        "session": None,
        "token_hash": None,
        "released_by": by,
        "error": f"released: {reason}; not started there",
    }


def lost_fields(doc: dict[str, Any], reason: str, now: datetime) -> dict[str, Any]:
    """What a run whose agent went silent while it ran carries: ``lost``, finished ``now``."""
    now = to_bson_time(now)
    started = doc.get("started_at") or doc.get("claimed_at") or now
    return {
        "status": "lost",
        "error": reason,
        "finished_at": now,
        "duration": round(max(0.0, (now - started).total_seconds()), 3),
    }


def is_finished(doc: dict[str, Any]) -> bool:
    """Whether the run has its final status (and its time): its history may record it."""
    return doc.get("status") in FINISHED_STATUSES and bool(doc.get("finished_at"))


def last_run_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a task keeps of its latest finished run among ``runs`` (all finished, of one
    task): its id, status, end (epoch seconds: ``$set`` keeps numbers as numbers on every
    server), duration and trigger."""
    last = sorted(runs, key=lambda d: d["finished_at"])[-1]  # stable: the last of equals
    return {
        "id": last["_id"],
        "status": last["status"],
        "finished": last["finished_at"].timestamp(),
        "duration": last.get("duration"),
        "trigger": last.get("trigger"),
    }


def count_failures(
    last_run: dict[str, Any], runs: Sequence[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """Walk a task's newly finished ``runs`` (oldest first) from its stored ``last_run``: how
    many failing runs since the last success after them, and the ``run.recovered`` events
    (a success that ends failing runs). Killed, skipped and missed runs neither count nor end
    it: a fire recorded missed (the cluster was down or restarting) is no failure of the task,
    and is not the status a recovery comes after either."""
    status = last_run.get("status")
    failures = last_run.get("failures")
    if not isinstance(failures, int):  # noted by an older version: at least its last status
        failures = 1 if status in FAILING_STATUSES else 0
    events = []
    for d in runs:
        if d["_id"] == last_run.get("id"):
            continue  # the same final write again: counted when it was written first
        if d["status"] == "missed":
            continue
        if d["status"] in FAILING_STATUSES:
            failures += 1
        elif d["status"] == "succeeded":
            if failures:
                events.append(ev.recovered_event(d, failures, status))
            failures = 0
        status = d["status"]
    return failures, events


def wants_success(task: dict[str, Any] | None) -> bool:
    """Whether a task's ``notify.on`` asks for its successes (``success``): only then is a
    success an event."""
    notify = ((task or {}).get("spec") or {}).get("notify")
    on = notify.get("on") if isinstance(notify, dict) else None
    return isinstance(on, list) and "success" in on


def finished_run_events(
    previous: dict[str, Any] | None, runs: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a task's newly finished ``runs`` mean, given the task as stored before them
    (``previous``: its ``last_run`` and ``spec.notify.on``; None when it could not be read):
    the task's new ``last_run`` (with ``failures`` when ``previous`` is known) and the events
    to record (each run's own event, ``run.recovered`` after failing runs, a success only for
    a task that asks for it)."""
    runs = sorted(runs, key=lambda d: d["finished_at"])
    last_run = last_run_summary(runs)
    events: list[dict[str, Any]] = []
    if previous is not None:
        failures, recovered = count_failures(previous.get("last_run") or {}, runs)
        last_run["failures"] = failures
        events += recovered
    success = previous is not None and wants_success(previous)
    events += [e for d in runs if (e := ev.run_event(d, success=success))]
    return last_run, events
