"""The events page: what happened in the cluster (runs that failed, timed out, were missed or
lost, and recovered; agents that joined, left and came back; leader changes; tasks without an
agent; task changes), newest first, filtered by kind, severity, task, agent, group and time.

Events are recorded where they happen (see :mod:`cloudtask.events`); this page only reads
them, by their numeric ``ts`` (indexed).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request

from .auth import requires
from .context import store
from .filters import datetime_local
from .queries import EVENT_KINDS, EVENT_SEVERITIES, event_filters, lenient

bp = Blueprint("events", __name__, url_prefix="/events")

FILTER_FIELDS = ("kind", "severity", "task", "agent", "group", "since", "until")
SEVERITY_CLASS = {"error": "bad", "warning": "warn", "info": "muted"}


@bp.get("")
@requires("viewer")
def index() -> Any:
    filters, problems = lenient(event_filters, request.args)
    page = store().event_page(filters)
    errors = {p.path: p.message for p in problems}
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
    ), (422 if problems else 200)
