"""The API's events: what happened, newest first, filtered like the events page."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from .. import queries
from ..auth import requires
from ..context import jsonable, store
from ..events import task_filter_id, unknown_task
from ..openapi import Reply, query
from .hardening import ApiError, checked
from .table import PAGE_PARAMS, TEXT_ARG, api, page_json


def event_json(doc: dict[str, Any]) -> dict[str, Any]:
    out = jsonable(doc)
    out["id"] = out.pop("_id")
    out.pop("delivery", None)  # the notifier's bookkeeping
    return out


@api.route(
    "GET",
    "/events",
    summary="List events",
    description="What happened, newest first: runs that failed, timed out, were missed or "
    "lost, and recoveries; agents that joined, left or came back; leader changes; tasks "
    "without a live agent; task changes.",
    params=(
        query(
            "kind",
            {"type": "string", "maxLength": 40},
            "One kind (" + ", ".join(queries.EVENT_KINDS) + ") or a prefix such as `run.`",
        ),
        query("severity", {"enum": list(queries.EVENT_SEVERITIES)}, "Only this severity"),
        query("task", TEXT_ARG, "Only events of this task (its name or id; 404 if none)"),
        query("agent", TEXT_ARG, "Only events of this agent"),
        query("group", TEXT_ARG, "Only events of this group"),
        query(
            "since",
            {"type": "string", "format": "date-time"},
            "At or after (ISO 8601; UTC without an offset)",
        ),
        query("until", {"type": "string", "format": "date-time"}, "Before"),
        *PAGE_PARAMS,
    ),
    replies={200: Reply("One page of events", "EventPage")},
    errors=(404, 422),
)
@requires("viewer")
def list_events() -> Any:
    filters = with_task_id(checked(queries.event_filters))
    page = store().event_page(filters)
    return jsonify(page_json(page, [event_json(e) for e in page.items]))


def with_task_id(filters: dict[str, Any]) -> dict[str, Any]:
    """``filters`` with their ``task`` (a name or an id) as the task's id; 404 when no task
    ever had that name or id (rather than an empty list that looks like no events)."""
    if not filters.get("task"):
        return filters
    task_id = task_filter_id(filters["task"])
    if task_id is None:
        raise ApiError(404, unknown_task(filters["task"]))
    return {**filters, "task": task_id}
