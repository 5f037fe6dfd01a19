"""The API's calendars and blackout windows: list, show, put, delete, and a calendar's
import from an iCalendar file. Viewers read; operators and admins change (as for pools)."""

from __future__ import annotations

import re
from typing import Any

from flask import jsonify, request

from cloudtask.calendars import MAX_ICS_BYTES, describe_blackout
from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError

from ..auth import requires
from ..context import actor, jsonable, ops, store
from ..openapi import JSON, Reply, path_param, query, ref
from .hardening import ApiError, json_body, too_large
from .table import api

CALENDAR_PARAM = path_param("name", "The calendar's name")
BLACKOUT_PARAM = path_param("name", "The blackout's name")


def _calendar_json(name: str) -> dict[str, Any]:
    try:
        calendar = store().get_calendar(name)
    except NotFound:
        raise ApiError(404, f"no calendar named {name[:100]!r}") from None
    calendar["tasks"] = [t["name"] for t in store().tasks_using_calendar(name)]
    return jsonable(calendar)


@api.route(
    "GET",
    "/calendars",
    summary="Calendars",
    description="Every calendar by name: its weekdays and how many dates it holds "
    "(`date_count`); a schedule names them in `calendar` (`only`, `skip`).",
    replies={200: Reply("The calendars, by name", "CalendarList")},
)
@requires("viewer")
def list_calendars() -> Any:
    return jsonify(items=jsonable(store().list_calendars()))


@api.route(
    "GET",
    "/calendars/<name>",
    summary="One calendar",
    description="Its dates, weekdays, where it came from, and the tasks naming it.",
    params=(CALENDAR_PARAM,),
    replies={200: Reply("The calendar", "Calendar")},
    errors=(404,),
)
@requires("viewer")
def get_calendar(name: str) -> Any:
    return jsonify(_calendar_json(name))


@api.route(
    "PUT",
    "/calendars/<name>",
    summary="Create or replace a calendar",
    description='`{"dates": ["2026-12-24", "2026-12-27..2026-12-31"], "weekdays": ["sat", '
    '"sun"], "description": "..."}`: dates (a range `A..B` holds both ends) and/or weekdays. '
    "Tasks naming it follow the new dates within their agents' poll interval.",
    params=(CALENDAR_PARAM,),
    body={JSON: ref("CalendarPut")},
    replies={200: Reply("The calendar", "Calendar"), 201: Reply("The new calendar", "Calendar")},
    errors=(409, 422),
)
@requires("operator")
def put_calendar(name: str) -> Any:
    body = json_body()
    if "source" in body:  # set by an import only
        problem = Problem("source", "unknown key; expected dates, weekdays or description")
        raise ApiError(422, "the calendar is invalid", [problem])
    try:
        _, created = ops().set_calendar(actor(), name, body)
    except ValidationError as e:
        raise ApiError(422, "the calendar is invalid", e.problems) from None
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    return jsonify(_calendar_json(name)), 201 if created else 200


@api.route(
    "POST",
    "/calendars/<name>/import",
    summary="Create or replace a calendar from an iCalendar file",
    description="The raw body (`text/calendar`) or the multipart field `file`: its events' "
    "dates from a year ago to three years ahead, recurrences expanded (RRULE, RDATE, less "
    f"EXDATE); at most {MAX_ICS_BYTES // 1024} KiB. `timezone` is where a timed event's date "
    "is read; `weekdays` (comma-separated) are added. A file that cannot be read is refused "
    "(422) with the line and what is wrong; the stored calendar is then unchanged.",
    params=(
        CALENDAR_PARAM,
        query("timezone", {"type": "string"}, "IANA time zone of timed events' dates (UTC)"),
        query("weekdays", {"type": "string"}, "Weekdays to add, such as sat,sun"),
        query("description", {"type": "string", "maxLength": 1000}, "The calendar's description"),
    ),
    body={
        "text/calendar": {"type": "string"},
        "multipart/form-data": ref("Upload"),
    },
    replies={200: Reply("The calendar", "Calendar"), 201: Reply("The new calendar", "Calendar")},
    errors=(409, 413, 422),
)
@requires("operator")
def import_calendar(name: str) -> Any:
    if request.content_length is not None and request.content_length > MAX_ICS_BYTES + 64 * 1024:
        raise too_large(MAX_ICS_BYTES)
    filename = ""
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        upload = request.files.get("file")
        if upload is None:
            raise ApiError(
                422, "the import is invalid", [Problem("file", "required: the iCalendar file")]
            )
        filename = re.split(r"[/\\]", upload.filename or "")[-1]
        data = upload.read(MAX_ICS_BYTES + 1)
    else:
        data = request.get_data(cache=False)
    if len(data) > MAX_ICS_BYTES:
        raise too_large(MAX_ICS_BYTES)
    weekdays = [w.strip() for w in (request.args.get("weekdays") or "").split(",") if w.strip()]
    try:
        _, created = ops().import_calendar(
            actor(),
            name,
            data,
            filename=filename,
            timezone=request.args.get("timezone") or "UTC",
            weekdays=weekdays,
            description=request.args.get("description"),
        )
    except ValidationError as e:
        raise ApiError(422, f"{e.source or 'the calendar'} is refused", e.problems) from None
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    return jsonify(_calendar_json(name)), 201 if created else 200


@api.route(
    "DELETE",
    "/calendars/<name>",
    summary="Delete a calendar",
    description="Refused (409) while a task names it.",
    params=(CALENDAR_PARAM,),
    replies={200: Reply("The deleted calendar's name", "CalendarDeleted")},
    errors=(404, 409),
)
@requires("operator")
def delete_calendar(name: str) -> Any:
    try:
        ops().delete_calendar(actor(), name)
    except NotFound:
        raise ApiError(404, f"no calendar named {name[:100]!r}") from None
    except Conflict as e:
        raise ApiError(409, f"{e}: change those tasks first") from None
    return jsonify(deleted=name)


# --- blackouts -----------------------------------------------------------------------------


def _blackout_json(doc: dict[str, Any]) -> dict[str, Any]:
    out = jsonable(doc)
    out["summary"] = describe_blackout(doc)
    return out


@api.route(
    "GET",
    "/blackouts",
    summary="Blackout windows",
    description="Every blackout by name (`group`: those of the group, and of every group "
    '`"*"`). Nothing of a group starts in its windows: each fire in one is recorded '
    "`skipped` with the reason `blackout NAME`.",
    params=(query("group", {"type": "string"}, "Only this agent group's"),),
    replies={200: Reply("The blackouts, by name", "BlackoutList")},
)
@requires("viewer")
def list_blackouts() -> Any:
    group = request.args.get("group") or None
    return jsonify(items=[_blackout_json(b) for b in store().list_blackouts(group)])


@api.route(
    "GET",
    "/blackouts/<name>",
    summary="One blackout window",
    params=(BLACKOUT_PARAM,),
    replies={200: Reply("The blackout", "Blackout")},
    errors=(404,),
)
@requires("viewer")
def get_blackout(name: str) -> Any:
    try:
        return jsonify(_blackout_json(store().get_blackout(name)))
    except NotFound:
        raise ApiError(404, f"no blackout named {name[:100]!r}") from None


@api.route(
    "PUT",
    "/blackouts/<name>",
    summary="Create or replace a blackout window",
    description='Weekly or on dates: `{"group": "default", "days": ["sun"], "from": "02:00", '
    '"to": "04:00", "timezone": "Europe/Berlin"}` (`to` at or before `from` closes the next '
    'day; `dates` instead of or with `days`); once: `{"group": "*", "start": '
    '"2026-12-24T18:00", "end": "2026-12-27T06:00", "timezone": "UTC"}` (local times). '
    "Agents honour a change within their poll interval.",
    params=(BLACKOUT_PARAM,),
    body={JSON: ref("BlackoutPut")},
    replies={200: Reply("The blackout", "Blackout"), 201: Reply("The new blackout", "Blackout")},
    errors=(409, 422),
)
@requires("operator")
def put_blackout(name: str) -> Any:
    body = json_body()
    try:
        blackout, created = ops().set_blackout(actor(), name, body)
    except ValidationError as e:
        raise ApiError(422, "the blackout is invalid", e.problems) from None
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    return jsonify(_blackout_json(blackout)), 201 if created else 200


@api.route(
    "DELETE",
    "/blackouts/<name>",
    summary="Delete a blackout window",
    params=(BLACKOUT_PARAM,),
    replies={200: Reply("The deleted blackout's name", "CalendarDeleted")},
    errors=(404,),
)
@requires("operator")
def delete_blackout(name: str) -> Any:
    try:
        ops().delete_blackout(actor(), name)
    except NotFound:
        raise ApiError(404, f"no blackout named {name[:100]!r}") from None
    return jsonify(deleted=name)
