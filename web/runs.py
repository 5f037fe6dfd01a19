"""Run pages: the list with filters, the detail with its output (live while the run goes),
and kill.

The list takes the filters of :func:`web.queries.run_filters`; its ``task`` may also be a task
*name* as a user types it (resolved to the task's id). A bad filter is shown next to its field
and the page answers 422 with the other filters still applied. The list never reads a run's
output (``RUN_LIST_FIELDS``).

The detail page shows every fact of a run, its output tail and, for http tasks, what the
service reported. While the run is queued or running, ``static/runs.js`` polls ``live.json``
about once a second (the agent writes a running run's output at most once a second) and
updates the page in place until the run has finished.
"""

from __future__ import annotations

import zlib
from datetime import datetime
from typing import Any

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for

from cloudtask.clock import stored_time, utcnow
from cloudtask.exceptions import CloudTaskError, Conflict, NotFound, Problem
from cloudtask.runmodel import OUTPUT_TAIL_BYTES, RUNNING_STATUSES

from .auth import requires
from .context import actor, ops, store
from .filters import datetime_local, seconds, status_class, when
from .queries import RUN_STATUSES, lenient, run_filters

bp = Blueprint("runs", __name__, url_prefix="/runs")

FILTER_FIELDS = ("task", "status", "agent", "since", "until")
LIVE_INTERVAL_MS = 1000  # the agent writes a running run's output at most once a second
MAX_AGENT_CHOICES = 500  # the agent filter's suggestions (a datalist), bounded


# --- helpers ----------------------------------------------------------------------------------


def _aware(value: Any) -> datetime | None:
    return stored_time(value) if isinstance(value, datetime) else None


def elapsed(run: dict[str, Any], now: datetime | None = None) -> float | None:
    """How long the run took, or for a running run how long it has been running (s)."""
    if run.get("status") not in RUNNING_STATUSES:
        duration = run.get("duration")
        return float(duration) if isinstance(duration, (int, float)) else None
    started = _aware(run.get("started_at"))
    if started is None:
        return None
    return max(0.0, ((now or utcnow()) - started).total_seconds())


def duration_text(run: dict[str, Any]) -> str:
    value = elapsed(run)
    if value is None:
        return "–"
    text = seconds(value)
    return f"{text} so far" if run.get("status") in RUNNING_STATUSES else text


def result_code(run: dict[str, Any]) -> str:
    """The exit code of a process run, the HTTP status of an http run, or a dash."""
    if run.get("exit_code") is not None:
        return str(run["exit_code"])
    if run.get("http_status") is not None:
        return f"HTTP {run['http_status']}"
    return "–"


def output_truncated(text: str) -> bool:
    """Whether an output tail is (about) full, so older output was cut off."""
    return len(text.encode("utf-8", "surrogatepass")) >= OUTPUT_TAIL_BYTES - 1024


def output_digest(text: str) -> str:
    """A short fingerprint of an output tail: the page sends back the one it shows, and
    ``live.json`` leaves the output out while it has not changed (up to 64 KiB a second)."""
    data = text.encode("utf-8", "surrogatepass")
    return f"{len(data):x}-{zlib.crc32(data):08x}"


def _get_run(run_id: str) -> dict[str, Any]:
    try:
        return store().get_run(run_id)
    except NotFound:
        abort(
            404,
            description=f"no run with id {run_id!r}: it never existed, "
            "or it was deleted after the run retention period",
        )


def _task_of(run: dict[str, Any]) -> dict[str, Any] | None:
    """The run's task (name and spec), or None if it was deleted since."""
    return store().task_fields(run.get("task_id"), {"name": 1, "spec": 1})


def _is_http(run: dict[str, Any], task: dict[str, Any] | None, report: Any) -> bool:
    if report is not None or run.get("http_status") is not None:
        return True
    return bool(task and isinstance(task.get("spec"), dict) and task["spec"].get("http"))


def report_json(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What an http task's service reported, as the page and ``live.json`` show it."""
    if report is None:
        return None
    percent = report.get("percent")
    percent = float(percent) if isinstance(percent, (int, float)) else None
    result = report.get("result")
    return {
        "percent": percent,
        "message": report.get("message") or "",
        "updated_at": when(report.get("updated_at")),
        "result": {
            "status": result.get("status"),
            "message": result.get("message") or "",
            "at": when(result.get("at")),
        }
        if isinstance(result, dict)
        else None,
    }


@bp.context_processor
def _template_helpers() -> dict[str, Any]:
    return {"duration_text": duration_text, "result_code": result_code}


# --- list -------------------------------------------------------------------------------------


def _resolve_task(value: str) -> tuple[str | None, dict[str, Any] | None]:
    """(the task id to filter on, the task) for a task id or name as typed; the id alone
    for a deleted task that still has runs; (None, None) if nothing has that id or name."""
    task = store().task_fields(value, {"name": 1})
    if task is None:
        task = store().task_fields_by_name(value, {"name": 1})
    if task is not None:
        return task["_id"], task
    if store().task_has_runs(value):
        return value, None  # runs of a deleted task stay listed by its id
    return None, None


def _checked_filters(args: Any) -> tuple[dict[str, Any], list[Problem], dict[str, Any] | None]:
    """The filters to apply, the problems of the bad ones (each left out), the filtered task."""
    filters, problems = lenient(run_filters, args)
    task = None
    if filters.get("task"):
        task_id, task = _resolve_task(filters["task"])
        if task_id is None:
            problems.append(Problem("task", f"no task has the id or name {filters['task']!r}"))
        filters["task"] = task_id
    since, until = filters.get("since"), filters.get("until")
    if since and until and since >= until:
        problems.append(Problem("until", "must be later than since"))
        filters["until"] = None
    return filters, problems, task


@bp.get("")
@requires("viewer")
def index() -> Any:
    filters, problems, task = _checked_filters(request.args)
    page = store().run_page(filters)
    task_ids = {r["task_id"] for r in page.items if isinstance(r.get("task_id"), str)}
    existing = set(store().task_names(task_ids))
    errors = {p.path: p.message for p in problems}
    # what the fields show: as typed when wrong, else the checked value
    times = {
        name: request.args.get(name, "") if name in errors else datetime_local(filters.get(name))
        for name in ("since", "until")
    }
    try:
        agents = store().agent_ids(MAX_AGENT_CHOICES)
    except Exception:  # suggestions are a convenience: the page works without them
        agents = []
    return render_template(
        "runs/list.html",
        page=page,
        args=request.args,
        errors=errors,
        times=times,
        task=task,
        existing_tasks=existing,
        statuses=RUN_STATUSES,
        agents=agents,
    ), (422 if problems else 200)


# --- detail and live --------------------------------------------------------------------------


@bp.get("/<run_id>")
@requires("viewer")
def detail(run_id: str) -> Any:
    run = _get_run(run_id)
    task = _task_of(run)
    report = store().get_report(run["_id"])
    output = run.get("output_tail") or ""
    return render_template(
        "runs/detail.html",
        run=run,
        task=task,
        is_http=_is_http(run, task, report),
        report=report_json(report),
        output=output,
        output_digest=output_digest(output),
        output_truncated=output_truncated(output),
        going=run.get("status") in RUNNING_STATUSES,
        live_interval=LIVE_INTERVAL_MS,
    )


def live_json(run: dict[str, Any], report: dict[str, Any] | None, known: str) -> dict[str, Any]:
    """What the run page updates while the run goes; ``output`` is None when the page's
    ``known`` digest still matches."""
    output = run.get("output_tail") or ""
    digest = output_digest(output)
    status = run.get("status")
    value = elapsed(run)
    return {
        "id": run["_id"],
        "status": status,
        "status_class": status_class(status),
        "going": status in RUNNING_STATUSES,
        "agent": run.get("agent"),
        "started_at": when(run.get("started_at")),
        "finished_at": when(run.get("finished_at")),
        "duration": value,
        "duration_text": duration_text(run),
        "exit_code": run.get("exit_code"),
        "http_status": run.get("http_status"),
        "result_code": result_code(run),
        "error": run.get("error") or "",
        "output": None if digest == known else output,
        "output_digest": digest,
        "output_truncated": output_truncated(output),
        "report": report_json(report),
    }


@bp.get("/<run_id>/live.json")
@requires("viewer")
def live(run_id: str) -> Any:
    """The changing facts of a run as JSON, for the run page's script. ``output`` (the
    digest of the output the page shows) leaves the output out while it is unchanged."""
    try:
        run = store().get_run(run_id)
        report = store().get_report(run["_id"])
    except NotFound as e:
        return jsonify(error=str(e), details=[]), 404
    except CloudTaskError as e:  # MongoDB unreachable: the page says so and keeps trying
        return jsonify(error=str(e), details=[]), 503
    known = str(request.args.get("output", ""))[:64]
    answer = jsonify(live_json(run, report, known))
    answer.headers["Cache-Control"] = "no-store"
    return answer


# --- kill -------------------------------------------------------------------------------------


@bp.post("/<run_id>/kill")
@requires("operator")
def kill(run_id: str) -> Any:
    run = _get_run(run_id)
    try:
        ops().kill_run(actor(), run["_id"])
    except Conflict as e:
        flash(f"Cannot kill run {run['_id']}: {e}", "error")
    except NotFound:
        flash(f"Run {run['_id']} was deleted meanwhile.", "error")
        return redirect(url_for("runs.index"))
    else:
        after = store().run_fields(run["_id"], {"status": 1, "agent": 1}) or {}
        if after.get("status") == "killed" and not after.get("agent"):
            flash(
                f"Run {run['_id']} asked to stop: no agent had taken it, so it is cancelled.", "ok"
            )
        else:
            flash(
                f"Run {run['_id']} asked to stop: agent {after.get('agent') or run.get('agent')} "
                "stops it; this page shows when it has stopped.",
                "ok",
            )
    return redirect(url_for("runs.detail", run_id=run["_id"]))
