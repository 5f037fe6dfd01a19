"""Events: what happened in the cluster that people may need to know, as MongoDB documents.

An event is written once, whole, into the ``events`` collection (see docs of the contract:
``_id``, ``version``, ``kind``, ``severity``, ``at``, ``ts``, ``message``, ``task_id``,
``task_name``, ``group``, ``run_id``, ``agent``, ``details``, ``delivery``). This module only
builds documents; :class:`cloudtask.store.Store` writes them, from the places where things
happen: a run reaching a final status (``Store.note_last_runs``, ``Store.claim_runs`` for
missed fires), the leader's view of the agents (``Store.record_agents``; an agent that stops
cleanly records its own departure, :func:`agent_stopped`), an audited change of a task
(``Store.add_audit``), and the leading center (leadership, unassigned tasks).

Where the same event could be recorded twice (a repeated run write, two leaders in a row),
its ``_id`` is deterministic, so the second insert is a duplicate key: already recorded.

Example::

    doc = event_document("run.failed", "task nightly failed on agent a1 (exit 2)",
                         event_id="run.failed:6b0f...", task_id="6b0e...", run_id="6b0f...")
    store.record_event(doc)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId

from .clock import bson_time
from .durations import format_duration

EVENT_VERSION = 1

# kind -> severity
SEVERITIES: dict[str, str] = {
    "run.failed": "error",
    "run.timed_out": "error",
    "run.missed": "warning",
    "run.lost": "error",
    "run.recovered": "info",
    "run.succeeded": "info",
    "agent.joined": "info",
    "agent.left": "error",
    "agent.returned": "info",
    "center.leader": "info",
    "task.unassigned": "error",
    "task.created": "info",
    "task.changed": "info",
    "task.deleted": "info",
    # lateness (cloudtask/center/lateness.py): each once, then its end
    "run.slow": "warning",
    "run.slow_ended": "info",
    "task.deadline_missed": "warning",
    "task.deadline_recovered": "info",
    "task.overdue": "warning",
    "task.overdue_recovered": "info",
}
KINDS = tuple(SEVERITIES)
# what the global operators (alerts.operators) are mailed: what went wrong, and its end;
# the other kinds (a task changed, an agent joined, a new leader) only to whom
# alerts.operators_by_kind names for them
# the alerts of a task's warn_after, deadline and expect_every, and their ends
LATENESS_KINDS = frozenset(
    {
        "run.slow",
        "run.slow_ended",
        "task.deadline_missed",
        "task.deadline_recovered",
        "task.overdue",
        "task.overdue_recovered",
    }
)
OPERATOR_KINDS = frozenset(
    {k for k, severity in SEVERITIES.items() if severity != "info"}
    | {"run.recovered", "agent.returned"}
    | {"run.slow_ended", "task.deadline_recovered", "task.overdue_recovered"}
)

# final run statuses that are alerts (killed and skipped runs were wanted: no event)
RUN_EVENT_KINDS = {
    "failed": "run.failed",
    "timed_out": "run.timed_out",
    "missed": "run.missed",
    "lost": "run.lost",
}
# a success is an event only for a task whose notify.on asks for it ("success"): recorded
# for every success, it would be most of the events collection and mean nothing to anyone
SUCCESS_KIND = "run.succeeded"
# statuses a later success recovers from. Not "missed": a fire nobody ran (the cluster was
# down or restarting, the agent overloaded) says nothing about the task itself, so it neither
# starts nor extends a failing streak (it is still an event, mailed to whoever asks for it)
FAILING_STATUSES = ("failed", "timed_out", "lost")

# audit actions on tasks -> event kind
AUDIT_KINDS = {
    "task.create": "task.created",
    "task.clone": "task.created",
    "task.update": "task.changed",
    "task.pause": "task.changed",
    "task.resume": "task.changed",
    "task.delete": "task.deleted",
}

OUTPUT_LINES = 20  # lines of the output tail an event carries
OUTPUT_MAX_CHARS = 8192  # ... and no more characters than this (a few very long lines)


def event_document(
    kind: str,
    message: str,
    *,
    at: datetime | None = None,
    event_id: str | None = None,
    severity: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An event document in the shape of the contract; ``fields`` sets ``task_id``,
    ``task_name``, ``group``, ``run_id``, ``agent`` and ``details``. The severity follows the
    kind unless given (an agent's clean stop is an ``agent.left`` of severity info); an
    unknown kind or severity is a ValueError (a programming error, not input)."""
    if kind not in SEVERITIES:
        raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(KINDS)}")
    if severity is not None and severity not in SEVERITIES.values():
        raise ValueError(f"unknown severity {severity!r}")
    when = bson_time(at)
    doc: dict[str, Any] = {
        "_id": event_id or str(ObjectId()),
        "version": EVENT_VERSION,
        "kind": kind,
        "severity": severity or SEVERITIES[kind],
        "at": when,
        "ts": when.timestamp(),
        "message": message,
        "task_id": None,
        "task_name": None,
        "group": None,
        "run_id": None,
        "agent": None,
        "details": {},
    }
    doc.update(fields)
    doc["delivery"] = "new"  # the notifier moves it on; always "new" when recorded
    return doc


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def tail_lines(text: str | None, lines: int = OUTPUT_LINES) -> str:
    """The last ``lines`` lines of an output tail (at most ``OUTPUT_MAX_CHARS`` characters)."""
    if not text:
        return ""
    out = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return out[-OUTPUT_MAX_CHARS:]


def run_details(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": run.get("status"),
        "trigger": run.get("trigger"),
        "attempt": run.get("attempt"),
        "scheduled_for": _iso(run.get("scheduled_for")),
        "started_at": _iso(run.get("started_at")),
        "finished_at": _iso(run.get("finished_at")),
        "duration": run.get("duration"),
        "exit_code": run.get("exit_code"),
        "http_status": run.get("http_status"),
        "error": run.get("error"),
        "output_tail_lines": tail_lines(run.get("output_tail")),
    }


def _run_fields(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_id": run.get("task_id"),
        "task_name": run.get("task_name"),
        "group": run.get("group"),
        "run_id": run["_id"],
        "agent": run.get("agent"),
    }


def _when(run: dict[str, Any]) -> datetime | None:
    at = run.get("finished_at")
    return at if isinstance(at, datetime) else None


def _seconds(value: Any) -> str:
    return f"{value:g}s" if isinstance(value, (int, float)) else "?"


def run_message(run: dict[str, Any]) -> str:
    """One line for a person: what happened to the run, where, and the one figure that says why."""
    name = run.get("task_name") or run.get("task_id")
    where = f" on agent {run['agent']}" if run.get("agent") else ""
    status = run.get("status")
    if status == "failed":
        if run.get("exit_code") is not None:
            why = f"exit {run['exit_code']}"
        elif run.get("http_status") is not None:
            why = f"HTTP {run['http_status']}"
        else:
            why = run.get("error") or "no exit code"
        return f"task {name} failed{where} ({_one_line(why)})"
    if status == "timed_out":
        return f"task {name} timed out{where} after {_seconds(run.get('duration'))}"
    if status == "missed":
        fire = _iso(run.get("scheduled_for"))
        return f"task {name} missed its fire of {fire}{where}"
    if status == "lost":
        why = f": {_one_line(run['error'])}" if run.get("error") else ""
        return f"task {name}: run lost{where}{why}"
    if status == "succeeded":
        return f"task {name} succeeded{where} in {_seconds(run.get('duration'))}"
    return f"task {name} {status}{where}"


def _one_line(text: Any, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def run_event(run: dict[str, Any], success: bool = False) -> dict[str, Any] | None:
    """The event of a run in a final status that is an alert (or, with ``success``, a
    succeeded run: for the tasks that asked to hear of them), else None."""
    kind = RUN_EVENT_KINDS.get(run.get("status") or "")
    if kind is None and success and run.get("status") == "succeeded":
        kind = SUCCESS_KIND
    if kind is None:
        return None
    return event_document(
        kind,
        run_message(run),
        at=_when(run),
        event_id=f"{kind}:{run['_id']}",
        details=run_details(run),
        **_run_fields(run),
    )


def recovered_event(run: dict[str, Any], failures: int, previous_status: str | None) -> dict:
    """The first success of a task after ``failures`` failing runs (``previous_status`` is the
    status of its last run before this one)."""
    name = run.get("task_name") or run.get("task_id")
    where = f" on agent {run['agent']}" if run.get("agent") else ""
    plural = "s" if failures != 1 else ""
    details = run_details(run)
    details.update(failures=failures, previous_status=previous_status)
    return event_document(
        "run.recovered",
        f"task {name} succeeded again{where} after {failures} failing run{plural}",
        at=_when(run),
        event_id=f"run.recovered:{run['_id']}",
        details=details,
        **_run_fields(run),
    )


# --- lateness (cloudtask/center/lateness.py) ---------------------------------------------------
# Each alert's id names what it is about (the run; the task and the deadline's local date; the
# task and the moment its silence is counted from), so a leader that recorded it and died
# before noting so, and the next leader that records it again, record it once.


def _span(seconds: Any) -> str:
    """``1h30m``: a figure of seconds as people write it (``?`` when unknown)."""
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "?"
    return format_duration(round(seconds, 1))


def _moment(t: datetime) -> str:
    return bson_time(t).strftime("%Y-%m-%d %H:%M:%S UTC")


def slow_event(run: dict[str, Any], warn_after: float, now: datetime) -> dict[str, Any]:
    """A run still going ``warn_after`` seconds after it started (it is not killed)."""
    name = run.get("task_name") or run.get("task_id")
    where = f" on agent {run['agent']}" if run.get("agent") else ""
    started = run.get("started_at")
    running = (now - started).total_seconds() if isinstance(started, datetime) else warn_after
    details = run_details(run)
    details.update(warn_after=warn_after, running_for=round(running, 1))
    return event_document(
        "run.slow",
        f"task {name} is still running{where} after {_span(round(running))} "
        f"(warn_after {_span(warn_after)}); it is not killed",
        at=now,
        event_id=f"run.slow:{run['_id']}",
        details=details,
        **_run_fields(run),
    )


def slow_ended_event(run: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A run alerted as slow has ended (in whatever status: ``details.status``)."""
    name = run.get("task_name") or run.get("task_id")
    status = run.get("status") or "ended"
    took = f" after {_span(run['duration'])}" if run.get("duration") is not None else ""
    return event_document(
        "run.slow_ended",
        f"the slow run of task {name} ended {status}{took}",
        at=_when(run) or now,
        event_id=f"run.slow_ended:{run['_id']}",
        details=run_details(run),
        **_run_fields(run),
    )


def deadline_missed_event(
    task: dict[str, Any], day: str, deadline: str, window: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """``task`` (its id, name and group) has no success by its deadline of local date
    ``day`` (``deadline``: ``06:00 Europe/Berlin``; ``window``: the day's opening and the
    deadline, ISO 8601)."""
    return event_document(
        "task.deadline_missed",
        f"task {task['name']} missed its {deadline} deadline of {day}: no run fired in the "
        "24 h before it has succeeded",
        at=now,
        event_id=f"task.deadline_missed:{task['task_id']}:{day}",
        task_id=task["task_id"],
        task_name=task["name"],
        group=task.get("group"),
        details={"day": day, "deadline": deadline, **window},
    )


def deadline_recovered_event(
    task: dict[str, Any],
    day: str,
    deadline: str,
    window: dict[str, Any],
    success: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """The success that came after a missed deadline (``success``: its run id, fire and end)."""
    late = ""
    end = success.get("finished_at")
    if isinstance(end, datetime):
        closes = datetime.fromisoformat(window["closes"])
        late = f", {_span(round((end - closes).total_seconds()))} after the deadline"
    return event_document(
        "task.deadline_recovered",
        f"task {task['name']} succeeded{late} (its {deadline} deadline of {day})",
        at=now,
        event_id=f"task.deadline_recovered:{task['task_id']}:{day}",
        task_id=task["task_id"],
        task_name=task["name"],
        group=task.get("group"),
        run_id=success.get("_id"),
        details={
            "day": day,
            "deadline": deadline,
            **window,
            "succeeded_at": _iso(end),
            "scheduled_for": _iso(success.get("scheduled_for")),
        },
    )


def overdue_event(
    task: dict[str, Any], expect_every: float, since: datetime, succeeded: bool, now: datetime
) -> dict[str, Any]:
    """``task`` has not succeeded for ``expect_every`` seconds, counted from ``since``: its
    last success (``succeeded``), or when it was created or resumed."""
    what = "its last success" if succeeded else "it was created or resumed"
    quiet = round((now - since).total_seconds())
    return event_document(
        "task.overdue",
        f"task {task['name']} has not succeeded for {_span(quiet)} (since {what}, "
        f"{_moment(since)}; expect_every {_span(expect_every)})",
        at=now,
        event_id=f"task.overdue:{task['task_id']}:{_ms(since)}",
        task_id=task["task_id"],
        task_name=task["name"],
        group=task.get("group"),
        details={
            "expect_every": expect_every,
            "since": _iso(since),
            "since_success": succeeded,
        },
    )


def overdue_recovered_event(
    task: dict[str, Any], since: datetime, success: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """The first success of an overdue task (``since``: what its overdue alert counted from;
    ``success``: the run's id, fire and end)."""
    end = success.get("finished_at")
    gap = ""
    if isinstance(end, datetime):
        gap = f", {_span(round((end - since).total_seconds()))} after {_moment(since)}"
    return event_document(
        "task.overdue_recovered",
        f"task {task['name']} succeeded again{gap}",
        at=now,
        event_id=f"task.overdue_recovered:{task['task_id']}:{_ms(since)}",
        task_id=task["task_id"],
        task_name=task["name"],
        group=task.get("group"),
        run_id=success.get("_id"),
        details={
            "since": _iso(since),
            "succeeded_at": _iso(end),
            "scheduled_for": _iso(success.get("scheduled_for")),
        },
    )


# --- agents ---------------------------------------------------------------------------------


def _ms(t: Any) -> str:
    """A time as epoch milliseconds (the part of an event id that names one transition)."""
    if isinstance(t, datetime):
        return str(int(bson_time(t).timestamp() * 1000))
    if isinstance(t, str):  # a date nx-27017 handed back as text
        try:
            return _ms(datetime.fromisoformat(t))
        except ValueError:
            return t
    return "0"


def _agent_details(agent_id: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "host": info.get("host"),
        "pid": info.get("pid"),
        "group": info.get("group"),
        "version": info.get("version"),
        "czxid": info.get("czxid"),
        "agent_id": agent_id,
    }


def _where(info: dict[str, Any]) -> str:
    parts = [f"group {info.get('group') or '?'}"]
    if info.get("host"):
        parts.append(f"host {info['host']}")
    return ", ".join(parts)


def agent_joined(agent_id: str, info: dict[str, Any], now: datetime) -> dict[str, Any]:
    """An agent seen for the first time ever (its id names its registration, if known)."""
    registration = info.get("czxid") or "first"
    return event_document(
        "agent.joined",
        f"agent {agent_id} joined ({_where(info)})",
        at=now,
        event_id=f"agent.joined:{agent_id}:{registration}",
        group=info.get("group"),
        agent=agent_id,
        details=_agent_details(agent_id, info),
    )


# why an agent left: it stopped cleanly (marked its registration ``leaving`` first, or said
# so itself: see agent_stopped), or its ZooKeeper session ended without that
STOPPED, SESSION_ENDED = "stopped", "session ended"


def left_event_id(agent_id: str, stored: dict[str, Any]) -> str:
    """The id of the departure of the registration an agents document (or an agent's own
    view of itself) names: its czxid and the agent process's start, which the leader and
    the agent read alike; without a czxid (recorded by an older version), the last time it
    was seen online."""
    info = stored.get("info") or {}
    czxid = stored.get("czxid") or info.get("czxid")
    if not czxid:
        return f"agent.left:{agent_id}:{_ms(stored.get('last_seen'))}"
    started = info.get("started_at")
    return f"agent.left:{agent_id}:{czxid}" + (f":{_ms(started)}" if started else "")


def agent_left(stored: dict[str, Any], now: datetime) -> dict[str, Any]:
    """An agent stored online that is no longer registered (``stored``: its agents document).
    A clean stop (its registration said ``leaving``) is reason "stopped", severity info and
    mailed to nobody; otherwise its session ended (killed, crashed or cut off): an error."""
    agent_id = stored["_id"]
    info = {**(stored.get("info") or {}), "group": stored.get("group")}
    stopped = bool(info.get("leaving"))
    how = (
        "it stopped cleanly"
        if stopped
        else "its ZooKeeper session ended: killed, crashed or cut off"
    )
    details = _agent_details(agent_id, info)
    details.update(
        reason=STOPPED if stopped else SESSION_ENDED,
        leaving=stopped,
        last_seen=_iso(stored.get("last_seen")),
    )
    return event_document(
        "agent.left",
        f"agent {agent_id} left the cluster ({_where(info)}): {how}",
        at=now,
        event_id=left_event_id(agent_id, stored),
        severity="info" if stopped else None,
        group=info.get("group"),
        agent=agent_id,
        details=details,
    )


def agent_stopped(agent_id: str, info: dict[str, Any], czxid: int, now: datetime) -> dict[str, Any]:
    """The ``agent.left`` an agent records itself as it stops cleanly, before it deletes its
    registration (``info``: what it registered; ``czxid``: its registration). Its id is the
    one the leader gives that departure, so a leader that never saw it ``leaving`` (slow, or
    stopped at the same moment) finds it recorded and does not take the stop for a crash."""
    stored = {
        "_id": agent_id,
        "group": info.get("group"),
        "czxid": czxid,
        "info": {**info, "czxid": czxid, "leaving": True},
        "last_seen": now,
    }
    return agent_left(stored, now)


def clean_stop(event: dict[str, Any]) -> bool:
    """An agent's clean stop, or its return after one: recorded (and posted to the webhooks
    that ask for the kind) but no alert, so mailed to nobody."""
    details = event.get("details") if isinstance(event.get("details"), dict) else {}
    if event.get("kind") == "agent.left":
        return details.get("reason") == STOPPED
    if event.get("kind") == "agent.returned":
        return details.get("left_reason") == STOPPED
    return False


def agent_returned(
    agent_id: str, info: dict[str, Any], stored: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """An agent seen again after it had left (``stored``: its agents document as it was;
    its ``left_reason`` says why it left: back after a clean stop is no alert)."""
    since = stored.get("last_seen")
    after_stop = stored.get("left_reason") == STOPPED
    details = _agent_details(agent_id, info)
    details.update(offline_since=_iso(since), left_reason=stored.get("left_reason"))
    again = "is back after a clean stop" if after_stop else "is back"
    return event_document(
        "agent.returned",
        f"agent {agent_id} {again} ({_where(info)})",
        at=now,
        event_id=f"agent.returned:{agent_id}:{_ms(since)}",
        group=info.get("group"),
        agent=agent_id,
        details=details,
    )


# --- the leading center ---------------------------------------------------------------------


def leader_event(
    center_id: str, node: str, previous: str | None, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A center became the leader (``node``: its election node; ``previous``: the leader
    named in ``/status``, if any)."""
    took_over = f", taking over from {previous}" if previous and previous != center_id else ""
    return event_document(
        "center.leader",
        f"center {center_id} leads{took_over}",
        event_id=f"center.leader:{center_id}:{node}",
        details={"center_id": center_id, "previous": previous, "node": node, **(info or {})},
    )


def unassigned_event(
    task_id: str, task_name: str | None, group: str, requires: dict[str, str] | None = None
) -> dict[str, Any]:
    """A task no live agent runs: its group has none (reason ``no_live_agent``), or, given
    ``requires``, none with the labels the task requires (reason ``no_agent_matches``)."""
    if requires is not None:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(requires.items()))
        return event_document(
            "task.unassigned",
            f"task {task_name or task_id} does not run: no live agent of group {group} has "
            f"the labels it requires ({wanted})",
            task_id=task_id,
            task_name=task_name,
            group=group,
            details={"group": group, "reason": "no_agent_matches", "requires": dict(requires)},
        )
    return event_document(
        "task.unassigned",
        f"task {task_name or task_id} does not run: group {group} has no live agent",
        task_id=task_id,
        task_name=task_name,
        group=group,
        details={"group": group, "reason": "no_live_agent"},
    )


# --- audited task changes -------------------------------------------------------------------


def changed_keys(before: Any, after: Any) -> list[str]:
    """The top-level keys of a task definition that differ between two versions."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return []
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def audit_event(entry: dict[str, Any], task_id: str | None) -> dict[str, Any] | None:
    """The event of an audit entry about a task (see ``AUDIT_KINDS``), else None."""
    action = entry.get("action")
    kind = AUDIT_KINDS.get(action or "")
    if kind is None:
        return None
    before, after = entry.get("before"), entry.get("after")
    spec = after if isinstance(after, dict) else before if isinstance(before, dict) else {}
    target = entry.get("target") or ""
    name = spec.get("name") or (target[5:] if target.startswith("task:") else target) or None
    actor = entry.get("actor")
    details: dict[str, Any] = {"actor": actor, "audit_id": entry["_id"], "action": action}
    if action == "task.clone" and isinstance(before, dict):
        details["cloned_from"] = before.get("from")
        what = f"created by {actor} (a copy of {before.get('from')})"
    elif action == "task.create":
        what = f"created by {actor}"
    elif action == "task.delete":
        what = f"deleted by {actor}"
    elif action == "task.pause":
        what = f"paused by {actor}"
    elif action == "task.resume":
        what = f"resumed by {actor}"
    else:
        keys = changed_keys(before, after)
        details["changed"] = keys
        what = f"changed by {actor}" + (f" ({', '.join(keys)})" if keys else "")
    return event_document(
        kind,
        f"task {name} {what}",
        at=entry.get("at"),
        task_id=task_id,
        task_name=name,
        group=spec.get("group"),
        details=details,
    )
