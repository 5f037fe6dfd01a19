"""The events page: what happened in the cluster (runs that failed, timed out, were missed or
lost, and recovered; agents that joined, left and came back; leader changes; tasks without an
agent; task changes), newest first, filtered by kind, severity, task, agent, group and time.

Events are recorded where they happen (see :mod:`cloudtask.events`); this page only reads
them, by their numeric ``ts`` (indexed). The task filter takes a task's name or its id
(:func:`task_filter_id`, which the API's events and runs use too); a deleted task's events
are still found by either. A name no task ever had is answered 404 with the reason at the
field, not an empty list.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request

from cloudtask.exceptions import NotFound
from cloudtask.operations import find_task
from cloudtask.store import Page

from .auth import requires
from .context import store
from .filters import datetime_local
from .queries import EVENT_KINDS, EVENT_SEVERITIES, event_filters, lenient

bp = Blueprint("events", __name__, url_prefix="/events")

FILTER_FIELDS = ("kind", "severity", "task", "agent", "group", "since", "until")
SEVERITY_CLASS = {"error": "bad", "warning": "warn", "info": "muted"}


def task_filter_id(value: str) -> str | None:
    """The id of the task a ``task`` filter names: a task's name or id; else a deleted task's
    id whose events or runs are still stored, or the id its events recorded under that
    name. None when no task ever had that name or id."""
    try:
        return find_task(store(), value)["_id"]
    except NotFound:
        pass
    return store().task_id_in_history(value)


def unknown_task(value: str) -> str:
    return f"no task named {value!r} (nor with that id), now or before"


@bp.get("")
@requires("viewer")
def index() -> Any:
    filters, problems = lenient(event_filters, request.args)
    errors = {p.path: p.message for p in problems}
    status = 422 if problems else 200
    task_id = task_filter_id(filters["task"]) if filters.get("task") else ""
    if task_id is None:  # no task ever had it: say so, list nothing
        errors["task"] = unknown_task(filters["task"])
        page = Page([], filters["page"], filters["per_page"], 0, False, filters)
        status = 404
    else:
        page = store().event_page({**filters, "task": task_id or None})
    return render_template(
        "events/list.html",
        page=page,
        args=request.args,
        errors=errors,
        kinds=EVENT_KINDS,
        prefixes=sorted({k.split(".")[0] + "." for k in EVENT_KINDS}),
        severities=EVENT_SEVERITIES,
        severity_class=SEVERITY_CLASS,
        # what the fields show: as typed when wrong, else the checked value
        times={
            k: request.args.get(k, "") if k in errors else datetime_local(filters.get(k))
            for k in ("since", "until")
        },
        fields=FILTER_FIELDS,
    ), status
