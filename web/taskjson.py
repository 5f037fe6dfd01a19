"""The JSON the task pages' scripts fetch: ``preview`` (the next fire times of a schedule
typed in the form) and ``trend`` (duration and status per run, for the detail page's chart);
and how the pages show a schedule's fire times (its zone, a time in it), which the detail
page's list of next fires shares.

The two views are routes of the ``tasks`` blueprint: :mod:`web.tasks` declares them (it
imports this module, never the other way round), so their endpoints are ``tasks.preview``
and ``tasks.trend``. Both need a viewer. Bad arguments are answered as
``{"error": ..., "details": [{"path": ..., "message": ...}]}`` with 422 (404 for an unknown
task).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from flask import current_app, jsonify, request

from cloudtask import jsonlimits
from cloudtask.calendars import preview as calendar_preview
from cloudtask.calendars import rule_names
from cloudtask.clock import utcnow
from cloudtask.exceptions import CloudTaskError, NotFound, Problem
from cloudtask.runmodel import RUNNING_STATUSES
from cloudtask.schedules import parse_schedule
from cloudtask.task import MAX_SCHEDULES

from .auth import requires
from .context import store
from .queries import parse_time
from .taskform import duration_value, instant_value, name_list

PREVIEW_FIRES = 5
TREND_DEFAULT = 500
TREND_MAX = 5000


# --- how the pages show fire times ------------------------------------------------------------


def schedule_zone(schedule: Any) -> str:
    """The time zone a task's fire times are shown in: its first cron/every schedule's."""
    items = schedule if isinstance(schedule, list) else [schedule]
    for item in items:
        if isinstance(item, dict) and ("cron" in item or "every" in item):
            return str(item.get("timezone") or "UTC")
    return "UTC"


def fmt_local(moment: datetime, zone: ZoneInfo) -> str:
    local = moment.astimezone(zone)
    name = local.strftime("%Z")
    offset = local.strftime("%z")
    offset = f"UTC{offset[:3]}:{offset[3:]}"
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (name if name[:1].isalpha() else offset)


def _json_error(message: str, problems: list[Problem], code: int) -> Any:
    return jsonify(error=message, details=[p.to_dict() for p in problems]), code


# --- trend (JSON for the chart) ---------------------------------------------------------------


def _trend_args(args: Any) -> tuple[dict[str, Any], list[Problem]]:
    problems: list[Problem] = []
    out: dict[str, Any] = {}
    for name in ("since", "until"):
        raw = args.get(name)
        if raw in (None, ""):
            continue
        try:
            out[name] = parse_time(raw)
        except ValueError as e:
            problems.append(Problem(name, str(e)))
    raw = args.get("limit")
    out["limit"] = TREND_DEFAULT
    if raw not in (None, ""):
        try:
            limit = int(raw)
            if not 1 <= limit <= TREND_MAX:
                raise ValueError
            out["limit"] = limit
        except ValueError:
            problems.append(Problem("limit", f"expected a number from 1 to {TREND_MAX}"))
    if not problems and out.get("since") and out.get("until") and out["since"] >= out["until"]:
        problems.append(Problem("until", "must be after since"))
    return out, problems


def _epoch_ms(value: Any) -> int | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


@requires("viewer")
def trend(task_id: str) -> Any:
    """{"points": [{"t": epoch ms of scheduled_for, "d": seconds or null, "s": status,
    "id": run id}]}, oldest first: the newest ``limit`` (500) runs, within since/until."""
    args, problems = _trend_args(request.args)
    if problems:
        return _json_error("the chart's arguments are invalid", problems, 422)
    try:
        task = store().get_task(task_id)
    except NotFound as e:
        return _json_error(str(e), [], 404)
    fields = {"scheduled_for": 1, "duration": 1, "status": 1}
    docs = store().task_runs(
        task["_id"], fields, args["limit"], since=args.get("since"), until=args.get("until")
    )
    points = []
    for doc in reversed(docs):
        t = _epoch_ms(doc.get("scheduled_for"))
        if t is None:
            continue
        duration = doc.get("duration")
        duration = float(duration) if isinstance(duration, (int, float)) else None
        if doc.get("status") in RUNNING_STATUSES:
            duration = None
        points.append({"t": t, "d": duration, "s": doc.get("status"), "id": doc["_id"]})
    return jsonify(points=points, task=task["name"])


# --- preview (JSON for the form's schedule fields) --------------------------------------------


@requires("viewer")
def preview() -> Any:
    """The next fire times of a schedule typed in the form: ``cron`` (+ ``timezone``) or
    ``every`` (+ ``timezone``, ``start``, ``end``, ``between_*``, ``calendar_only``,
    ``calendar_skip``), or ``schedule`` (a JSON schedule); ``n`` fires (5). As its agent will
    see them: dates the calendar rule leaves out are not fires, and each fire names the
    blackout of the task's ``group`` that will record it skipped (``blackout``, else null).
    Answers 200 with ``fires`` or 422 with ``details`` naming the field; never 500. The JSON
    is read with a bound on its nesting (:func:`cloudtask.jsonlimits.loads`), and a list of
    more than ``MAX_SCHEDULES`` schedules is refused before any is parsed, as the model
    refuses it."""
    args = request.args
    try:
        n = int(args.get("n") or PREVIEW_FIRES)
        if not 1 <= n <= 50:
            raise ValueError
    except ValueError:
        return _json_error("n is invalid", [Problem("n", "expected a number from 1 to 50")], 422)
    tz = (args.get("timezone") or "").strip() or "UTC"
    value: Any
    if args.get("schedule"):
        try:
            value = jsonlimits.loads(args["schedule"])
        except ValueError as e:  # not JSON, or nested too deeply: never a RecursionError
            return _json_error(
                "the schedule is invalid", [Problem("schedule", f"not valid JSON: {e}")], 422
            )
        if isinstance(value, list) and len(value) > MAX_SCHEDULES:
            problem = f"{len(value):,} schedules; at most {MAX_SCHEDULES} are taken per task"
            return _json_error("the schedule is invalid", [Problem("schedule", problem)], 422)
    elif (args.get("cron") or "").strip():
        value = {"cron": args["cron"].strip(), "timezone": tz}
    elif (args.get("every") or "").strip():
        value = {"every": duration_value(args["every"]), "timezone": tz}
    else:  # nothing typed yet: nothing to show
        return jsonify(timezone=tz, keepalive=False, fires=[], message="no schedule given")
    if isinstance(value, dict) and "at" not in value and "keepalive" not in value:
        for key in ("start", "end"):
            if (args.get(key) or "").strip():
                value[key] = instant_value(args[key], tz)
        between = [(args.get(k) or "").strip() for k in ("between_start", "between_end")]
        if any(between):
            value["between"] = between
        calendar = {
            side: name_list(args.get(f"calendar_{side}") or "")
            for side in ("only", "skip")
            if (args.get(f"calendar_{side}") or "").strip()
        }
        if calendar:
            value["calendar"] = calendar
    group = (args.get("group") or "").strip() or "default"
    try:
        parsed, problems = parse_schedule(value, "schedule")
        if problems or parsed is None:
            return _json_error("the schedule is invalid", problems, 422)
        zone_name = schedule_zone(value) if isinstance(value, (dict, list)) else "UTC"
        zone = ZoneInfo(zone_name)
        names = rule_names(parsed)
        try:  # the calendars it names and the group's blackouts, as its agent will judge them
            book = store().calendar_book(names, group)
        except CloudTaskError as e:
            current_app.logger.warning("schedule preview without calendars: %s", e)
            book = None
        missing = sorted(names - set(book.calendars)) if book is not None else []
        if missing:
            problems = [
                Problem("schedule.calendar", f"no calendar named {name!r}") for name in missing
            ]
            return _json_error("the schedule is invalid", problems, 422)
        fires = calendar_preview(parsed, group, utcnow(), n, book)
    except Exception as e:  # never a 500 for what a user types
        current_app.logger.warning("schedule preview failed for %r: %s", value, e)
        return _json_error(
            "the schedule is invalid", [Problem("schedule", f"cannot compute it: {e}")], 422
        )
    return jsonify(
        timezone=zone_name,
        keepalive=parsed.keepalive,
        fires=[
            {"utc": f.isoformat(), "local": fmt_local(f, zone), "blackout": blackout}
            for f, blackout in fires
        ],
    )
