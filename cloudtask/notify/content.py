"""What alerts say: mail subjects and plain-text bodies, and the JSON body of a webhook.

Subjects start with ``[CloudTask]`` and a word in capitals, then the task or agent, then the
time in UTC, so a mailbox sorted by subject groups them::

    [CloudTask] FAILED nightly-cleanup (exit 2) 2026-12-01 03:00 UTC
    [CloudTask] DIGEST nightly-cleanup failed 9 more times
    [CloudTask] DIGEST nightly-cleanup missed 3 more fires
    [CloudTask] RECOVERED nightly-cleanup 2026-12-01 05:00 UTC
    [CloudTask] AGENT OFFLINE a1 2026-12-01 03:12 UTC

Everything here is pure: events, tasks and alert state in, text out.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..clock import stored_time
from ..durations import format_duration
from ..events import LATENESS_KINDS
from ..schedules import schedule_summary

SUBJECT_PREFIX = "[CloudTask]"
DIGEST_ITEMS_SHOWN = 50  # a digest lists this many failures, then counts the rest
OUTPUT_LINES = 20

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # keeps \t and \n

# kind -> the capital word of the subject
_WORDS = {
    "run.failed": "FAILED",
    "run.timed_out": "TIMED OUT",
    "run.missed": "MISSED",
    "run.lost": "LOST",
    "run.recovered": "RECOVERED",
    "run.succeeded": "SUCCEEDED",
    "agent.joined": "AGENT JOINED",
    "agent.left": "AGENT OFFLINE",
    "agent.returned": "AGENT BACK",
    "center.leader": "LEADER",
    "task.unassigned": "UNASSIGNED",
    "task.created": "TASK CREATED",
    "task.changed": "TASK CHANGED",
    "task.deleted": "TASK DELETED",
    "run.slow": "SLOW",
    "run.slow_ended": "SLOW RUN ENDED",
    "task.deadline_missed": "LATE",
    "task.deadline_recovered": "DONE LATE",
    "task.overdue": "OVERDUE",
    "task.overdue_recovered": "RECOVERED",
}


def when(value: Any, seconds: bool = True) -> str:
    """``2026-12-01 03:00:05 UTC`` (or without seconds), '–' when unknown."""
    moment = stored_time(value)
    if moment is None:
        return "–"
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def one_line(text: Any, limit: int = 200) -> str:
    """Text fit for a subject or a table cell: one line, no control characters, bounded."""
    flat = " ".join(_CONTROL.sub(" ", str(text or "")).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def clean_text(text: Any) -> str:
    return _CONTROL.sub("", str(text or "")).replace("\r\n", "\n")


def _details(event: dict[str, Any]) -> dict[str, Any]:
    details = event.get("details")
    return details if isinstance(details, dict) else {}


def _name(event: dict[str, Any]) -> str:
    return one_line(event.get("task_name") or event.get("task_id") or "?", 128)


def _outcome(event: dict[str, Any]) -> str:
    """``(exit 2)``, ``(HTTP 500)``, ``(after 10m)`` or ''."""
    d = _details(event)
    if event.get("kind") == "run.timed_out" and isinstance(d.get("duration"), (int, float)):
        return f" (after {format_duration(round(d['duration'], 1))})"
    if d.get("http_status") is not None:
        return f" (HTTP {d['http_status']})"
    if d.get("exit_code") is not None:
        return f" (exit {d['exit_code']})"
    return ""


def event_subject(event: dict[str, Any]) -> str:
    kind = str(event.get("kind", "event"))
    word = _WORDS.get(kind, kind.upper())
    d = _details(event)
    at = when(d.get("scheduled_for") or event.get("at") or event.get("ts"), seconds=False)
    if kind in LATENESS_KINDS:
        return f"{SUBJECT_PREFIX} {word} {lateness_subject(event)}".replace("  ", " ")
    if kind == "run.recovered":
        what = _name(event)
    elif kind.startswith("run."):
        what = f"{_name(event)}{_outcome(event)}"
    elif kind.startswith("agent."):
        what = one_line(event.get("agent") or "?", 128)
        if event.get("group"):
            what += f" (group {one_line(event['group'], 128)})"
    elif kind == "center.leader":
        what = one_line(d.get("center_id") or event.get("message") or "", 128)
    elif kind == "task.unassigned":
        what = f"{_name(event)} (no live agent in group {one_line(event.get('group'), 128)})"
    elif kind.startswith("task."):
        what = _name(event) + (f" by {one_line(d['actor'], 64)}" if d.get("actor") else "")
    else:
        what = one_line(event.get("message"), 120)
    return f"{SUBJECT_PREFIX} {word} {what} {at}".replace("  ", " ")


def _span(value: Any) -> str:
    return format_duration(round(value)) if isinstance(value, (int, float)) else "?"


def _deadline_words(d: dict[str, Any]) -> str:
    """``06:00 deadline (Europe/Berlin) of 2026-12-05``."""
    clock, _, zone = str(d.get("deadline") or "?").partition(" ")
    zone = f" ({one_line(zone, 64)})" if zone and zone != "UTC" else " (UTC)"
    return f"{one_line(clock, 16)} deadline{zone} of {one_line(d.get('day'), 16)}"


def lateness_subject(event: dict[str, Any]) -> str:
    """What follows the word of a lateness alert's subject: the task, then what is late."""
    kind = str(event.get("kind"))
    d = _details(event)
    name = _name(event)
    if kind == "run.slow":
        at = when(d.get("scheduled_for") or event.get("at"), seconds=False)
        return (
            f"{name} still running after {_span(d.get('running_for'))} "
            f"(warn after {_span(d.get('warn_after'))}) {at}"
        )
    if kind == "run.slow_ended":
        took = f" after {_span(d['duration'])}" if d.get("duration") is not None else ""
        at = when(d.get("scheduled_for") or event.get("at"), seconds=False)
        return f"{name} {one_line(d.get('status') or 'ended', 16)}{took} {at}"
    if kind == "task.deadline_missed":
        return f"{name} missed its {_deadline_words(d)}"
    if kind == "task.deadline_recovered":
        return f"{name} succeeded after its {_deadline_words(d)}"
    since = stored_time(d.get("since"))
    now = stored_time(event.get("at"))
    if kind == "task.overdue":
        quiet = (now - since).total_seconds() if since and now else None
        return (
            f"{name} has not succeeded for {_span(quiet)} "
            f"(expected every {_span(d.get('expect_every'))})"
        )
    end = stored_time(d.get("succeeded_at"))
    gap = f" after {_span((end - since).total_seconds())}" if since and end else ""
    return f"{name} succeeded again{gap}"


def _lateness_lines(event: dict[str, Any]) -> list[str]:
    """The lines a lateness alert adds to its mail."""
    kind = str(event.get("kind"))
    d = _details(event)
    lines = []
    if kind == "run.slow":
        lines.append(_line("Warn after", _span(d.get("warn_after"))))
        lines.append(_line("Running for", _span(d.get("running_for"))))
    if kind.startswith("task.deadline"):
        lines.append(_line("Deadline", f"{one_line(d.get('deadline'), 80)} on {d.get('day')}"))
        lines.append(_line("Window", f"runs fired from {when(d.get('opens'))}"))
        lines.append(_line("Deadline at", when(d.get("closes"))))
    if kind == "task.overdue":
        lines.append(_line("Expected", "every " + _span(d.get("expect_every"))))
        why = "last success" if d.get("since_success") else "created or resumed"
        lines.append(_line("Quiet since", f"{when(d.get('since'))} ({why})"))
    if kind.endswith("_recovered"):
        lines.append(_line("Succeeded", when(d.get("succeeded_at"))))
        lines.append(_line("Its fire", when(d.get("scheduled_for"))))
    return lines


def digest_subject(task_name: str, count: int, missed: bool = False) -> str:
    """The subject of a digest of failures, or (``missed``) of missed fires."""
    if missed:
        fires = "fire" if count == 1 else "fires"
        return f"{SUBJECT_PREFIX} DIGEST {one_line(task_name, 128)} missed {count} more {fires}"
    times = "time" if count == 1 else "times"
    return f"{SUBJECT_PREFIX} DIGEST {one_line(task_name, 128)} failed {count} more {times}"


def _line(label: str, value: Any) -> str:
    return f"{label + ':':<13}{value}"


def _links(event: dict[str, Any], base_url: str) -> list[str]:
    out = []
    if event.get("run_id"):
        out.append(_line("Run", f"{base_url}/runs/{event['run_id']}"))
    if event.get("task_id") and event.get("kind") != "task.deleted":
        out.append(_line("Task", f"{base_url}/tasks/{event['task_id']}"))
    if event.get("kind", "").startswith("agent."):
        out.append(_line("Cluster", f"{base_url}/cluster"))
    return out


def _footer(base_url: str, task: bool = True) -> list[str]:
    why = "one of the task's notify.emails or as " if task else ""
    return [
        "",
        "-- ",
        f"CloudTask, {base_url}",
        f"You get this mail as {why}an operator in the alert settings.",
    ]


def _local(details: dict[str, Any], spec: dict[str, Any]) -> str:
    """`` (04:00 Europe/Berlin)``: the fire in the task's own time zone, when it has one."""
    schedule = spec.get("schedule")
    first = schedule[0] if isinstance(schedule, list) and schedule else schedule
    zone = first.get("timezone") if isinstance(first, dict) else None
    moment = stored_time(details.get("scheduled_for"))
    if not zone or zone == "UTC" or moment is None:
        return ""
    try:
        local = moment.astimezone(ZoneInfo(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return ""
    return f" ({local.strftime('%Y-%m-%d %H:%M')} {zone})"


def _run_lines(event: dict[str, Any], task: dict[str, Any] | None) -> list[str]:
    d = _details(event)
    spec = (task or {}).get("spec") or {}
    group = event.get("group") or spec.get("group")
    lines = [_line("Task", _name(event) + (f" (group {group})" if group else ""))]
    if task is None and event.get("task_id"):
        lines.append(_line("Schedule", "– (the task no longer exists)"))
    else:
        lines.append(_line("Schedule", schedule_summary(spec.get("schedule"))))
    lines.append(_line("Agent", event.get("agent") or "–"))
    status = d.get("status") or str(event.get("kind", "")).removeprefix("run.")
    extra = []
    if d.get("trigger"):
        extra.append(f"trigger {d['trigger']}")
    if isinstance(d.get("attempt"), int):
        extra.append(f"attempt {d['attempt'] + 1}")
    lines.append(_line("Status", status + (f" ({', '.join(extra)})" if extra else "")))
    lines.append(_line("Scheduled", when(d.get("scheduled_for")) + _local(d, spec)))
    lines.append(_line("Started", when(d.get("started_at"))))
    lines.append(_line("Finished", when(d.get("finished_at"))))
    if isinstance(d.get("duration"), (int, float)):
        lines.append(_line("Duration", format_duration(round(d["duration"], 3))))
    if d.get("exit_code") is not None:
        lines.append(_line("Exit code", d["exit_code"]))
    if d.get("http_status") is not None:
        lines.append(_line("HTTP status", d["http_status"]))
    if d.get("error"):
        lines.append(_line("Error", one_line(d["error"], 2000)))
    return lines


def output_block(tail: Any) -> list[str]:
    text = clean_text(tail).rstrip("\n")
    if not text:
        return ["", "No output."]
    lines = text.split("\n")[-OUTPUT_LINES:]
    return ["", f"Last {len(lines)} line{'s' if len(lines) != 1 else ''} of output:"] + [
        f"  {line}" for line in lines
    ]


def event_body(event: dict[str, Any], task: dict[str, Any] | None, base_url: str) -> str:
    """The mail of one event (not a digest)."""
    kind = str(event.get("kind", ""))
    d = _details(event)
    lines = [one_line(event.get("message"), 2000), ""]
    if kind.startswith("run."):
        lines += _run_lines(event, task)
        lines += _lateness_lines(event)
        if kind not in ("run.recovered", "run.succeeded") or d.get("output_tail_lines"):
            lines += output_block(d.get("output_tail_lines"))
    else:
        lines.append(_line("Event", kind))
        lines.append(_line("When", when(event.get("at") or event.get("ts"))))
        if event.get("task_name") or event.get("task_id"):
            lines.append(_line("Task", _name(event)))
        if event.get("agent"):
            lines.append(_line("Agent", event["agent"]))
        if event.get("group"):
            lines.append(_line("Group", event["group"]))
        lines += _lateness_lines(event)
        for key in ("host", "pid", "center_id", "previous", "actor"):
            if d.get(key) not in (None, ""):
                label = {"center_id": "Center", "previous": "Previous", "pid": "PID"}.get(
                    key, key.capitalize()
                )
                lines.append(_line(label, one_line(d[key], 200)))
    task_mail = kind.startswith("run.") and kind not in LATENESS_KINDS  # (operators only)
    lines += ["", *_links(event, base_url), *_footer(base_url, task_mail)]
    return "\n".join(lines) + "\n"


def _held_lines(held: list[dict[str, Any]], count: int, base_url: str) -> list[str]:
    lines = []
    for item in held[:DIGEST_ITEMS_SHOWN]:
        kind = str(item.get("kind", "")).removeprefix("run.")
        outcome = ""
        if item.get("http_status") is not None:
            outcome = f" HTTP {item['http_status']}"
        elif item.get("exit_code") is not None:
            outcome = f" exit {item['exit_code']}"
        agent = f" on {item['agent']}" if item.get("agent") else ""
        link = f"  {base_url}/runs/{item['run_id']}" if item.get("run_id") else ""
        # a missed fire is listed by the time it was due (it is recorded when noticed)
        at = item.get("scheduled_for") if kind == "missed" else None
        lines.append(f"  {when(at or item.get('ts'))}  {kind}{outcome}{agent}{link}")
    if count > len(lines):
        lines.append(f"  ... and {count - len(lines)} more")
    return lines


def digest_body(
    state: dict[str, Any],
    last_alert_ts: float,
    count: int,
    held: list[dict[str, Any]],
    interval: float,
    base_url: str,
) -> str:
    """The digest of the failures held back for one recipient since their last alert, or of
    the missed fires (a state of ``kind`` "missed": no failures, so no "failing since")."""
    task_id = state.get("task_id") or state["_id"]
    name = state.get("task_name") or task_id
    since = when(last_alert_ts, seconds=False)
    if state.get("kind") == "missed":
        head = [
            f"Task {name} missed {count} more fire{'s' if count != 1 else ''} since the last "
            f"alert ({since}): fires no agent ran, because the cluster was down or "
            "restarting, or its agent was overloaded. Missed fires are not failures of the task.",
            "",
            f"You get at most one mail about its missed fires every {format_duration(interval)}.",
            "",
            "Missed since the last alert:",
        ]
    else:
        head = [
            f"Task {name} failed {count} more time{'s' if count != 1 else ''} since the last "
            f"alert ({since}). It has been failing since "
            f"{when(state.get('failing_since_ts'), seconds=False)}.",
            "",
            f"You get at most one mail about it every {format_duration(interval)} until it "
            "succeeds again; then one more says it recovered.",
            "",
            "Failures since the last alert:",
        ]
    lines = [
        *head,
        *_held_lines(held, count, base_url),
        "",
        _line("Task", f"{base_url}/tasks/{task_id}"),
        _line("Its runs", f"{base_url}/runs?task={task_id}"),
        *_footer(base_url),
    ]
    return "\n".join(lines) + "\n"


def recovery_body(
    event: dict[str, Any],
    task: dict[str, Any] | None,
    failing_since_ts: float | None,
    count: int,
    held: list[dict[str, Any]],
    base_url: str,
) -> str:
    """The mail of run.recovered, with the failures not mailed yet (held for a digest)."""
    body = event_body(event, task, base_url)
    parts = []
    if failing_since_ts is not None:
        parts.append(f"It had been failing since {when(failing_since_ts, seconds=False)}.")
    if count:
        parts += [
            "",
            f"Failures since the last alert ({count}):",
            *_held_lines(held, count, base_url),
        ]
    if not parts:
        return body
    head, _, rest = body.partition("\n\n")
    return head + "\n\n" + "\n".join(parts).strip("\n") + "\n\n" + rest


def test_body(base_url: str, sender: str) -> str:
    return (
        "This is a test mail from CloudTask's alert settings.\n\n"
        f"It was sent by {sender} through the configured SMTP server. Mail about failing\n"
        f"tasks will arrive the same way, with links to {base_url}.\n"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = stored_time(value)
        return moment.isoformat().replace("+00:00", "Z") if moment else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def webhook_body(event: dict[str, Any], delivery_id: str, base_url: str) -> str:
    """The JSON a webhook receives: the event (``id`` for ``_id``, times as ISO 8601 UTC),
    ``delivery_id`` (the same on every retry: receivers drop repeats by it) and links."""
    payload = {k: v for k, v in event.items() if k not in ("_id", "delivery")}
    payload = {"id": event.get("_id"), **_jsonable(payload), "delivery_id": delivery_id}
    if isinstance(payload.get("at"), str) and "T" not in payload["at"]:
        at = stored_time(payload["at"])  # text from nx-27017: normalise it
        payload["at"] = at.isoformat().replace("+00:00", "Z") if at else payload["at"]
    links = {}
    if event.get("run_id"):
        links["run"] = f"{base_url}/runs/{event['run_id']}"
    if event.get("task_id") and event.get("kind") != "task.deleted":
        links["task"] = f"{base_url}/tasks/{event['task_id']}"
    payload["links"] = links
    return json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
