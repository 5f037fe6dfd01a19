"""Task pages: list, detail, create, edit, clone, pause, resume, run now, backfill, delete.

The form builds a task spec (the same JSON the API and ``cloudtask apply`` take) from its
fields, or takes the whole spec as JSON, and hands it to :class:`~cloudtask.operations.
Operations`, so it validates exactly like the model. Each problem's path (``schedule.cron``,
``timeout``, ``http.url``, ``env.X``) is mapped to the field that holds it; problems of no
field are shown at the top. What the user typed is always shown again as typed. The
translation between the fields and the spec is :mod:`web.taskform`; this module serves it.

The detail page's "Run now" also takes a run's parameters (``NAME=value`` lines: environment
values on top of the task's own, for a command task), and "Backfill…" queues a run for each
fire time of a past range (times without an offset read in the task's time zone); both are
checked by :class:`~cloudtask.operations.Operations`, whose problems are flashed with their
paths, the input kept.

Two JSON endpoints serve the pages' scripts: ``preview`` (the next fire times of a schedule
typed in the form) and ``trend`` (duration and status per run, for the chart). Their views
are in :mod:`web.taskjson`; they are routes of this blueprint, declared here.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from werkzeug.routing import BuildError

from cloudtask.clock import from_epoch, utcnow
from cloudtask.dependencies import dependency_status
from cloudtask.exceptions import CloudTaskError, Conflict, NotFound, Problem, ValidationError
from cloudtask.operations import task_warnings
from cloudtask.schedules import schedule_summary
from cloudtask.store import nest_dotted
from cloudtask.store.calendars import preview_fires
from cloudtask.store.queries import RUN_LIST_FIELDS
from cloudtask.task import (
    CONCURRENCY_POLICIES,
    HTTP_METHODS,
    LOST_POLICIES,
    MISFIRE_POLICIES,
    MODES,
    NOTIFY_EVENTS,
    parse_task,
    validate_task,
)

from . import taskjson
from .auth import requires, safe_path
from .context import actor, cluster, ops, store
from .queries import LAST_RESULTS, TASK_STATES, lenient, task_filters
from .taskform import (
    SCHEDULE_KINDS,
    default_form,
    form_spec,
    group_problems,
    instant_value,
    read_form,
    small_number,
    spec_form,
)
from .taskjson import fmt_local, schedule_zone

bp = Blueprint("tasks", __name__, url_prefix="/tasks")

DETAIL_RUNS = 20
DETAIL_FIRES = 10


# --- helpers shared by the views and templates -----------------------------------------------


def run_link(run_id: str) -> str:
    """The run page of ``run_id`` (``runs.detail``; a plain path while that page is missing)."""
    try:
        return url_for("runs.detail", run_id=run_id)
    except BuildError:
        return f"/runs/{run_id}"


def task_state(task: dict[str, Any]) -> str:
    if task.get("done_at"):
        return "done"
    return "enabled" if task.get("enabled", True) else "paused"


def _fmt_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fire_times(task: dict[str, Any], n: int = DETAIL_FIRES) -> dict[str, Any]:
    """What the detail page says about the next fires: ``kind`` is one of ok, keepalive, done,
    none (no fire left) or invalid; ``fires`` holds (local, UTC) texts; ``zone`` the zone."""
    schedule = task["spec"].get("schedule")
    zone_name = schedule_zone(schedule)
    out: dict[str, Any] = {"zone": zone_name, "fires": [], "kind": "ok", "message": ""}
    out["skipped"] = {}  # fire index -> the blackout that will record it skipped
    if task.get("done_at"):
        out["kind"] = "done"
        return out
    try:
        spec = parse_task(task["spec"])
        zone = ZoneInfo(zone_name)
    except (ValidationError, ValueError, LookupError) as e:
        out.update(kind="invalid", message=str(e))
        return out
    if spec.schedule.keepalive:
        out["kind"] = "keepalive"
        return out
    if spec.schedule.after is not None:
        out["kind"] = "after"
        return out
    try:
        previewed = preview_fires(store(), spec, utcnow(), n)  # calendars and blackouts
        fires = [f for f, _ in previewed]
        out["fires"] = [(fmt_local(f, zone), _fmt_utc(f)) for f in fires]
        out["skipped"] = {i: blackout for i, (_, blackout) in enumerate(previewed) if blackout}
    except (OverflowError, ValueError) as e:  # a time at the edge of the calendar
        out.update(kind="invalid", message=f"its fire times cannot be computed: {e}")
        return out
    if not fires:
        out["kind"] = "none"
    return out


_AFTER_GRAPH: dict[str, Any] = {"at": -1e9, "graph": {}}
AFTER_GRAPH_TTL = 5.0  # seconds the tasks' after schedules are read again at most


def _children(name: str) -> list[dict[str, Any]]:
    """The tasks that run after ``name`` (the graph read at most every few seconds: it is
    a scan of the tasks on the embedded store, and most pages have no children to show)."""
    now = time.monotonic()
    if now - _AFTER_GRAPH["at"] > AFTER_GRAPH_TTL:
        try:
            _AFTER_GRAPH.update(at=now, graph=store().after_graph())
        except CloudTaskError:
            return []
    names = sorted(c for c, parents in _AFTER_GRAPH["graph"].items() if name in parents)
    if not names:
        return []
    found = store().tasks_by_names(names)
    return [{"id": found[n]["_id"], "name": n} for n in names if n in found]


def owner_text(task: dict[str, Any]) -> tuple[str, str | None]:
    """(what to say about the task's owner agent, the agent id or None)."""
    view = cluster()
    if not view.connected:
        return "cluster not connected", None
    agent = view.owners.get(task["_id"])
    if agent:
        return agent, agent
    if task["_id"] in view.unassigned:
        group = view.unassigned[task["_id"]] or task.get("group")
        return f"unassigned: no live agent in group {group}", None
    if task.get("done_at"):
        return "none (done)", None
    if not task.get("enabled", True):
        return "none (paused)", None
    return "not assigned yet", None


def facets() -> dict[str, list[str]]:
    """The distinct groups and owners, for the list's filters (two indexed distinct reads)."""
    try:
        groups = store().task_values("group")
        owners = [o for o in store().task_values("spec.owner") if o]
    except Exception:  # a facet is a convenience: the page works without it
        groups, owners = [], []
    return {"groups": groups, "owners": owners}


def _get_task(task_id: str) -> dict[str, Any]:
    try:
        return store().get_task(task_id)
    except NotFound:
        abort(404, description=f"no task with id {task_id!r}; it may have been deleted")


@bp.context_processor
def _template_helpers() -> dict[str, Any]:
    return {
        "run_link": run_link,
        "schedule_summary": schedule_summary,
        "task_state": task_state,
    }


# --- list -------------------------------------------------------------------------------------


@bp.get("")
@requires("viewer")
def index() -> Any:
    filters, errors = lenient(task_filters, request.args)
    view = cluster()
    page = store().task_page(filters, view.owners if view.connected else None)
    for item in page.items:
        nest_dotted(item)
    status = 422 if errors else 200
    return render_template(
        "tasks/list.html",
        page=page,
        args=request.args,
        errors={p.path: p.message for p in errors},
        facets=facets(),
        states=TASK_STATES,
        last_results=LAST_RESULTS,
        connected=view.connected,
    ), status


# --- detail -----------------------------------------------------------------------------------


def run_forms(task: dict[str, Any]) -> dict[str, Any]:
    """Which run forms the detail page offers an operator: ``params`` (a manual run with
    parameters: a command task that is not a keepalive service), ``backfill`` (a task with
    fire times: not keepalive, not ``after``, not mode ``all``); ``zone`` is the time zone the
    backfill's times without an offset are read in."""
    zone = schedule_zone(task["spec"].get("schedule"))
    out = {"params": False, "backfill": False, "zone": zone}
    try:
        spec = parse_task(task["spec"])
    except (ValidationError, ValueError, LookupError):  # a stored spec that no longer reads
        return out
    keepalive = spec.schedule.keepalive
    out["params"] = not keepalive and spec.http is None
    out["backfill"] = not keepalive and spec.schedule.after is None and spec.mode != "all"
    return out


def lateness_now(task: dict[str, Any]) -> dict[str, Any] | None:
    """What the leader's lateness checks last found for a task that asks for them (its open
    alerts and its latest deadline's day: cloudtask/center/lateness.py), or None."""
    spec = task["spec"]
    if not (spec.get("warn_after") or spec.get("deadline") or spec.get("expect_every")):
        return None
    try:
        state = store().lateness_state(task["_id"])
    except CloudTaskError:
        return None  # the page shows the rest
    if not state:
        return None
    overdue = state.get("overdue") or None
    return {
        "slow": [entry["run_id"] for entry in state.get("slow") or [] if entry.get("run_id")],
        "overdue_since": from_epoch(overdue["since_ts"]) if overdue else None,
        "deadline": state.get("deadline") or None,
    }


def render_detail(
    task: dict[str, Any],
    *,
    status: int = 200,
    params: str | None = None,
    backfill: dict[str, str] | None = None,
) -> Any:
    """The task page; ``params`` / ``backfill``: a run form's input to show again (its
    disclosure open) after a refusal."""
    runs = store().task_runs(task["_id"], RUN_LIST_FIELDS, DETAIL_RUNS)
    owner, owner_agent = owner_text(task)
    late_now = lateness_now(task)
    schedule = task["spec"].get("schedule")
    keepalive = isinstance(schedule, dict) and "keepalive" in schedule
    return render_template(
        "tasks/detail.html",
        task=task,
        state=task_state(task),
        fires=fire_times(task),
        owner=owner,
        owner_agent=owner_agent,
        runs=runs,
        keepalive=keepalive,
        forms=run_forms(task),
        params_text=params,
        backfill_form=backfill,
        definition=json.dumps(task["spec"], indent=2, ensure_ascii=False),
        late_now=late_now,
        dependencies=dependency_status(store(), task["spec"]),
        children=_children(task["name"]),
    ), status


@bp.get("/<task_id>")
@requires("viewer")
def detail(task_id: str) -> Any:
    return render_detail(_get_task(task_id))


# --- trend and preview: the JSON the pages' scripts fetch (views in web/taskjson.py) ----------


bp.add_url_rule("/<task_id>/trend.json", "trend", taskjson.trend, methods=["GET"])
bp.add_url_rule("/preview", "preview", taskjson.preview, methods=["GET"])


# --- the form ---------------------------------------------------------------------------------


def file_choices(current: str) -> list[str]:
    try:
        names = [f["name"] for f in store().list_files()]
    except CloudTaskError:
        names = []
    if current and current not in names:
        names.append(current)
    return names


def file_versions(name: str) -> list[dict[str, Any]]:
    """The stored versions of one file, newest first (for the pin field's suggestions)."""
    if not name:
        return []
    try:
        return store().list_file_versions(name)
    except CloudTaskError:  # none stored (yet): the field says so when the task is run
        return []


def secret_names() -> list[str]:
    """The stored secrets' names, for the form's hint (never a value)."""
    try:
        return [s["name"] for s in store().list_secrets()]
    except CloudTaskError:
        return []


def calendar_names() -> list[str]:
    """The stored calendars' names, for the schedule's calendar fields."""
    try:
        return [c["name"] for c in store().list_calendars()]
    except CloudTaskError:
        return []


def render_form(
    form: dict[str, Any],
    *,
    task: dict[str, Any] | None = None,
    problems: list[Problem] | None = None,
    message: str = "",
    status: int = 200,
) -> Any:
    by_field, top = group_problems(problems or [], form["editor"])
    if message:
        top.insert(0, message)
    return render_template(
        "tasks/form.html",
        form=form,
        task=task,
        errors=by_field,
        top_errors=top,
        files=file_choices(form["file"]),
        versions=file_versions(form["file"]),
        conflict=status == 409,
        schedule_kinds=SCHEDULE_KINDS,
        methods=HTTP_METHODS,
        concurrency_policies=CONCURRENCY_POLICIES,
        misfire_policies=MISFIRE_POLICIES,
        lost_policies=LOST_POLICIES,
        modes=MODES,
        notify_events=NOTIFY_EVENTS,
        secret_names=secret_names(),
        calendar_names=calendar_names(),
    ), status


def _save(form: dict[str, Any], task: dict[str, Any] | None) -> Any:
    """Create (task None) or replace a task from the posted form; re-show it on any problem."""
    spec, problems = form_spec(form)
    if problems and spec is not None:
        problems += validate_task(spec, now=utcnow())
    if problems:
        return render_form(form, task=task, problems=problems, status=422)
    try:
        if task is None:
            doc = ops().create_task(actor(), spec)
            flash(f"Task {doc['name']} created.", "ok")
        else:
            revision = int(form["revision"]) if small_number(form["revision"]) else None
            doc = ops().replace_task(actor(), task["_id"], spec, expected_revision=revision)
            flash(f"Task {doc['name']} saved (revision {doc['revision']}).", "ok")
    except ValidationError as e:
        return render_form(form, task=task, problems=e.problems, status=422)
    except Conflict as e:
        if e.problems:
            return render_form(form, task=task, problems=e.problems, status=409)
        return render_form(form, task=task, message=str(e), status=409)
    except NotFound as e:
        return render_form(form, task=task, message=f"{e}: it was deleted meanwhile", status=404)
    for warning in task_warnings(doc["spec"]):  # stored, but every viewer sees it
        flash(f"Warning: {warning}", "warning")
    return redirect(url_for("tasks.detail", task_id=doc["_id"]))


# The form pages: anyone logged in may look (a viewer sees them read-only); saving, the POST,
# needs an operator, checked on the server by the POST handlers below.


@bp.route("/new", methods=["GET", "POST"])
@requires("viewer")
def new() -> Any:
    if request.method == "POST":
        return _create()
    return render_form(default_form())


@requires("operator")
def _create() -> Any:
    return _save(read_form(request.form), None)


@bp.route("/<task_id>/edit", methods=["GET", "POST"])
@requires("viewer")
def edit(task_id: str) -> Any:
    if request.method == "POST":
        return _replace(task_id)
    task = _get_task(task_id)
    form = spec_form(task["spec"])
    form["revision"] = str(task["revision"])
    if request.args.get("editor") == "json":
        form["editor"] = "json"
    return render_form(form, task=task)


@requires("operator")
def _replace(task_id: str) -> Any:
    return _save(read_form(request.form), _get_task(task_id))


@bp.route("/<task_id>/clone", methods=["GET", "POST"])
@requires("viewer")
def clone(task_id: str) -> Any:
    if request.method == "POST":
        return _clone(task_id)
    task = _get_task(task_id)
    name = f"{task['name']}-copy"[:128]
    return render_template("tasks/clone.html", task=task, name=name, error="", top_error="")


@requires("operator")
def _clone(task_id: str) -> Any:
    task = _get_task(task_id)
    name = request.form.get("name", "").strip()
    try:
        doc = ops().clone_task(actor(), task["_id"], name)
    except ValidationError as e:
        error = "; ".join(p.message for p in e.problems if p.path == "name")
        top = "; ".join(str(p) for p in e.problems if p.path != "name")
        status = 422
    except Conflict as e:
        error, top, status = str(e), "", 409
    else:
        flash(f"Task {doc['name']} created as a paused copy of {task['name']}.", "ok")
        return redirect(url_for("tasks.detail", task_id=doc["_id"]))
    page = render_template("tasks/clone.html", task=task, name=name, error=error, top_error=top)
    return page, status


# --- actions ----------------------------------------------------------------------------------


def _back(task_id: str) -> Any:
    target = safe_path(request.form.get("next"))
    return redirect(target or url_for("tasks.detail", task_id=task_id))


def _set_enabled(task_id: str, enabled: bool) -> Any:
    task = _get_task(task_id)
    try:
        ops().set_enabled(actor(), task["_id"], enabled)
    except CloudTaskError as e:
        flash(f"Cannot {'resume' if enabled else 'pause'} {task['name']}: {e}", "error")
    else:
        flash(f"Task {task['name']} {'resumed' if enabled else 'paused'}.", "ok")
    return _back(task["_id"])


@bp.post("/<task_id>/pause")
@requires("operator")
def pause(task_id: str) -> Any:
    return _set_enabled(task_id, False)


@bp.post("/<task_id>/resume")
@requires("operator")
def resume(task_id: str) -> Any:
    return _set_enabled(task_id, True)


def parse_params(text: str) -> tuple[dict[str, str], list[str]]:
    """A run's parameters from ``NAME=value`` lines (blank lines ignored; the value is what
    follows the first ``=``, as typed): (the parameters, the bad lines' messages)."""
    params: dict[str, str] = {}
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name:
            errors.append(f"line {number}: expected NAME=value, got {line!r}")
        elif name in params:
            errors.append(f"line {number}: {name} is given twice")
        else:
            params[name] = value
    return params, errors


def problems_text(problems: list[Problem], labels: dict[str, str] | None = None) -> str:
    """``path: message; ...``; a path of a form field is followed by the field's label."""
    labels = labels or {}
    return "; ".join(
        f"{p.path} ({labels[p.path]}): {p.message}" if p.path in labels else str(p)
        for p in problems
    )


@bp.post("/<task_id>/run")
@requires("operator")
def run(task_id: str) -> Any:
    """Run now; with ``params`` (the parameters box), a run with those parameters."""
    task = _get_task(task_id)
    text = request.form.get("params")
    env = None
    if text is not None:
        env, errors = parse_params(text)
        if errors:
            flash(f"Cannot run {task['name']}: {'; '.join(errors)}", "error")
            return render_detail(task, status=422, params=text)
    try:
        doc = ops().run_now(actor(), task["_id"], env=env or None)
    except ValidationError as e:
        if env:
            flash(
                f"Cannot run {task['name']} with these parameters: {problems_text(e.problems)}",
                "error",
            )
            return render_detail(task, status=422, params=text)
        flash(f"Cannot run {task['name']} now: {problems_text(e.problems)}", "error")
        return redirect(url_for("tasks.detail", task_id=task["_id"]))
    except Conflict as e:
        flash(f"Cannot run {task['name']} now: {e}", "error")
        return redirect(url_for("tasks.detail", task_id=task["_id"]))
    with_params = f" with {len(env)} parameter{'s' if len(env) != 1 else ''}" if env else ""
    flash(
        f"Run {doc['_id']} of {task['name']}{with_params} queued: "
        f"an agent of {task['group']} takes it.",
        "ok",
    )
    return redirect(run_link(doc["_id"]))


BACKFILL_FIELDS = {"start": "From", "end": "To"}


def _local(moment: datetime | None, zone_name: str) -> str:
    if moment is None:
        return "–"
    try:
        return fmt_local(moment, ZoneInfo(zone_name))
    except (ValueError, LookupError):
        return f"{_fmt_utc(moment)} UTC"


@bp.post("/<task_id>/backfill")
@requires("operator")
def backfill(task_id: str) -> Any:
    """Queue a run for each fire time from ``start`` to ``end`` (both included); a time
    without an offset is read in the task's time zone."""
    task = _get_task(task_id)
    zone = schedule_zone(task["spec"].get("schedule"))
    typed = {key: request.form.get(key, "") for key in BACKFILL_FIELDS}
    missing = [Problem(key, "is required") for key, value in typed.items() if not value.strip()]
    try:
        if missing:
            raise ValidationError(missing)
        start, end = (instant_value(typed[key], zone) for key in BACKFILL_FIELDS)
        result = ops().backfill(actor(), task["_id"], start, end)
    except ValidationError as e:
        flash(
            f"Cannot backfill {task['name']}: {problems_text(e.problems, BACKFILL_FIELDS)}", "error"
        )
        return render_detail(task, status=422, backfill=typed)
    queued, existing = result["queued"], result["existing"]
    if result["first"] is None:
        flash(
            f"Backfill of {task['name']}: no fire time from {typed['start'].strip()} to "
            f"{typed['end'].strip()} ({zone}): nothing queued.",
            "warning",
        )
    else:
        flash(
            f"Backfill of {task['name']}: {queued} run{'s' if queued != 1 else ''} queued "
            f"({existing} had run already), first {_local(result['first'], zone)}, "
            f"last {_local(result['last'], zone)}.",
            "ok",
        )
    return redirect(url_for("tasks.detail", task_id=task["_id"]))


def _running(task: dict[str, Any]) -> int:
    return store().unfinished_run_count(task["_id"])


@bp.route("/<task_id>/delete", methods=["GET", "POST"])
@requires("viewer")
def delete(task_id: str) -> Any:
    """GET: the confirmation page; POST (operator): delete, killing running runs if asked."""
    if request.method == "POST":
        return _delete(task_id)
    task = _get_task(task_id)
    return render_template("tasks/delete.html", task=task, running=_running(task))


@requires("operator")
def _delete(task_id: str) -> Any:
    task = _get_task(task_id)
    running = _running(task)
    kill = request.form.get("kill_running") in ("on", "true", "1", "yes")
    try:
        _, killed = ops().delete_task(actor(), task["_id"], kill_running=kill)
    except NotFound:
        flash(f"Task {task['name']} was already deleted.", "ok")
        return redirect(url_for("tasks.index"))
    message = f"Task {task['name']} deleted."
    if kill:
        message += f" {len(killed)} of its {running} running runs asked to stop."
    elif running:
        message += f" Its {running} running runs finish on their own."
    flash(message, "ok")
    return redirect(url_for("tasks.index"))
