"""The REST API under /api/v1: JSON only, the same roles as the pages.

A user logs in with an API token (``Authorization: Bearer <token>``) or the browser session;
viewers read, operators change tasks, runs and files. Every change goes through the audited
:class:`~cloudtask.operations.Operations`, so it validates exactly like the model and is in
the audit log. The two callbacks of http tasks (``/runs/<run_id>/progress`` and ``/result``)
need no user: the service proves itself with the run's own token (``X-CloudTask-Token``).

Every route is declared with ``api.route`` (see :mod:`web.openapi`), which also describes it
in the OpenAPI document served at ``/api/v1/openapi.json``.

Errors are ``{"error": "...", "details": [{"path": "...", "message": "..."}]}``: 400 for a
body that is not a JSON object, 401/403 for logins and roles, 404 for unknown tasks, runs and
routes, 409 for conflicts, 413 for bodies too large, 422 for invalid input (``details`` name
the fields like the model does: ``schedule.cron``, ``per_page``). No input makes a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from datetime import timezone
from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for
from flask_login import current_user

from cloudtask.clock import utcnow
from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError
from cloudtask.operations import find_task
from cloudtask.runmodel import RESULT_STATUSES, RUNNING_STATUSES
from cloudtask.schedules import next_fires
from cloudtask.store import nest_dotted
from cloudtask.store.queries import RUN_LIST_FIELDS
from cloudtask.task import parse_task

from . import queries
from .auth import requires
from .context import actor, agents, cluster, jsonable, ops, run_json, store, task_json
from .openapi import (
    JSON,
    ApiTable,
    Reply,
    document,
    header,
    path_param,
    query,
    ref,
)
from .queries import LAST_RESULTS, MAX_PER_PAGE, RUN_STATUSES, TASK_STATES
from .tasks import task_state

bp = Blueprint("api", __name__, url_prefix="/api/v1")
api = ApiTable(bp)

JSON_BODY_LIMIT = 1024 * 1024  # a task spec is a few KiB
CALLBACK_BODY_LIMIT = 64 * 1024
MESSAGE_LIMIT = 2000  # characters of a callback's message
MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**63 - 1  # what MongoDB stores
NEXT_FIRES = 10
UNASSIGNED_LISTED = 1000
TEXT_ARG_LIMIT = 200
_IF_MATCH = re.compile(r'(?:W/)?"?([0-9]{1,18})"?')
_REVISION = re.compile(r"[0-9]{1,18}")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


class ApiError(Exception):
    """An answer other than success: status, message, and the problems (path, message)."""

    def __init__(self, status: int, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


@bp.errorhandler(ApiError)
def _api_error(error: ApiError) -> Any:
    return jsonify(error=error.message, details=[p.to_dict() for p in error.problems]), error.status


def invalid(message: str, path: str, problem: str) -> ApiError:
    return ApiError(422, message, [Problem(path, problem)])


# --- reading requests -------------------------------------------------------------------------


def _json_int(text: str) -> int:
    value = int(text) if len(text) <= 20 else None  # longer: too large, whatever the digits
    if value is None or abs(value) > MAX_JSON_INT:
        raise ValueError(f"the number {text[:20]}... is too large (at most {MAX_JSON_INT})")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_json(value: Any, depth: int = 0) -> None:
    """Refuse what JSON parses but nothing stores: deep nesting, lone surrogates."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate ("\ud800") raises UnicodeEncodeError
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is too large: at most {limit} bytes")


def json_body(limit: int = JSON_BODY_LIMIT) -> dict[str, Any]:
    """The request's body, a JSON object, or an ApiError (400, 413) that says what is wrong."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    raw = request.get_data(cache=True)
    if len(raw) > limit:
        raise too_large(limit)
    if not raw.strip():
        raise ApiError(400, "the body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 text: {e}") from None
    try:
        value = json.loads(
            text,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
        _check_json(value)
    except RecursionError:
        raise ApiError(400, "the body is not usable JSON: nested too deeply") from None
    except (ValueError, UnicodeEncodeError) as e:
        raise ApiError(400, f"the body is not usable JSON: {e}") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        if value is None:
            kind = "null"
        raise ApiError(400, f"the body must be a JSON object, got {kind}")
    return value


def expected_revision() -> int | None:
    """The revision a change expects (``If-Match: "3"`` or ``?revision=3``), or None."""
    problems: list[Problem] = []
    revision = None
    raw = request.headers.get("If-Match")
    if raw not in (None, "", "*"):
        match = _IF_MATCH.fullmatch(raw)
        if match:
            revision = int(match[1])
        else:
            problems.append(
                Problem("If-Match", f'expected the task\'s revision, such as "3", got {raw[:40]!r}')
            )
    arg = request.args.get("revision")
    if arg not in (None, ""):
        if not _REVISION.fullmatch(arg) or int(arg) < 1:
            problems.append(Problem("revision", f"expected a revision number, got {arg[:40]!r}"))
        elif revision is not None and int(arg) != revision:
            problems.append(Problem("revision", "differs from the If-Match header"))
        else:
            revision = int(arg)
    if problems:
        raise ApiError(422, "the expected revision is invalid", problems)
    return revision


def flag_arg(name: str) -> bool:
    raw = request.args.get(name)
    if raw in (None, ""):
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise invalid(f"{name} is invalid", name, f"expected true or false, got {raw[:40]!r}")


def checked(read: Any) -> dict[str, Any]:
    """The filters read by ``read`` (web.queries), or 422 naming each bad argument."""
    try:
        return read(request.args)
    except ValidationError as e:
        raise ApiError(422, "the query arguments are invalid", e.problems) from None


# --- tasks: output ----------------------------------------------------------------------------


def owner_of(task_id: str) -> str | None:
    view = cluster()
    return view.owners.get(task_id) if view.connected else None


def fire_times(task: dict[str, Any]) -> list[str]:
    """The next fires in UTC (ISO 8601); none for a done, keepalive or unreadable task."""
    if task.get("done_at"):
        return []
    try:
        spec = parse_task(task["spec"])
    except ValidationError:
        return []
    if spec.schedule.keepalive:
        return []
    now = utcnow()
    return [
        f.astimezone(timezone.utc).isoformat() for f in next_fires(spec.schedule, now, NEXT_FIRES)
    ]


def task_out(doc: dict[str, Any], detail: bool = True) -> dict[str, Any]:
    doc.setdefault("spec", {})
    owner = doc.get("owner_agent") if "owner_agent" in doc else owner_of(doc["_id"])
    out = task_json(doc, owner)
    out["enabled"] = bool(out["enabled"])  # flags are read by truthiness (nx-27017)
    out["state"] = task_state(doc)
    if detail:
        out["next_fires"] = fire_times(doc)
    return out


def task_reply(doc: dict[str, Any], status: int = 200, **headers: str) -> Any:
    answer = jsonify(task_out(doc))
    answer.headers["ETag"] = f'"{doc["revision"]}"'
    for name, value in headers.items():
        answer.headers[name] = value
    return answer, status


def find_or_404(name_or_id: str) -> dict[str, Any]:
    try:
        return find_task(store(), name_or_id)
    except NotFound:
        raise ApiError(404, f"no task named {name_or_id!r} (nor with that id)") from None


def spec_problems(error: ValidationError) -> ApiError:
    return ApiError(422, "the task is invalid", error.problems)


def name_conflict(error: Conflict) -> ApiError:
    """409, with the field at fault when there is one (a name taken: ``name``)."""
    return ApiError(409, str(error), error.problems)


TASK_PARAM = path_param("task", "The task's name or id")
TASK_REPLY = Reply("The task", "Task", {"ETag": 'The task\'s revision, such as "3"'})
REVISION_PARAMS = (
    header(
        "If-Match",
        {"type": "string", "pattern": '^(\\*|(W/)?"?[0-9]{1,18}"?)$'},
        'Only change the task if its revision is still this one ("3"); else 409',
    ),
    query("revision", {"type": "integer", "minimum": 1}, "The same as If-Match"),
)
TEXT_ARG = {"type": "string", "maxLength": TEXT_ARG_LIMIT}
PAGE_PARAMS = (
    query("page", {"type": "integer", "minimum": 1, "maximum": 1_000_000}, "Page (1)"),
    query(
        "per_page",
        {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE},
        f"Items per page (50, at most {MAX_PER_PAGE})",
    ),
)


# --- who am I ---------------------------------------------------------------------------------


@api.route("GET", "/me", summary="The logged-in user", replies={200: Reply("The user", "Me")})
@requires("viewer")
def me() -> Any:
    return jsonify(username=current_user.username, role=current_user.role)


# --- tasks ------------------------------------------------------------------------------------


@api.route(
    "GET",
    "/tasks",
    summary="List tasks",
    description="Sorted by name; `q` matches the start of the name (any case).",
    params=(
        query("q", TEXT_ARG, "The start of the name"),
        query("group", TEXT_ARG, "Only this group"),
        query("state", {"enum": list(TASK_STATES)}, "Only tasks in this state"),
        query("owner", TEXT_ARG, "Only tasks of this owner (a person or team)"),
        query("last", {"enum": list(LAST_RESULTS)}, "Only tasks whose last run ended so"),
        *PAGE_PARAMS,
    ),
    replies={200: Reply("One page of tasks", "TaskPage")},
    errors=(422,),
)
@requires("viewer")
def list_tasks() -> Any:
    filters = checked(queries.task_filters)
    view = cluster()
    page = store().task_page(filters, view.owners if view.connected else {})
    items = [task_out(nest_dotted(item), detail=False) for item in page.items]
    return jsonify(
        items=items, page=page.page, per_page=page.per_page, total=page.total, capped=page.capped
    )


@api.route(
    "POST",
    "/tasks",
    summary="Create a task",
    body={JSON: ref("TaskSpec")},
    replies={201: Reply("The task, created", "Task", {"Location": "The task's URL"})},
    errors=(409, 422),
)
@requires("operator")
def create_task() -> Any:
    spec = json_body()
    try:
        doc = ops().create_task(actor(), spec)
    except ValidationError as e:
        raise spec_problems(e) from None
    except Conflict as e:
        raise name_conflict(e) from None
    return task_reply(doc, 201, Location=url_for("api.get_task", task=doc["_id"]))


@api.route(
    "GET",
    "/tasks/<task>",
    summary="One task",
    description="Its definition, the agent that owns it and its next 10 fire times (UTC).",
    params=(TASK_PARAM,),
    replies={200: TASK_REPLY},
    errors=(404,),
)
@requires("viewer")
def get_task(task: str) -> Any:
    return task_reply(find_or_404(task))


@api.route(
    "PUT",
    "/tasks/<task>",
    summary="Replace a task's definition",
    params=(TASK_PARAM, *REVISION_PARAMS),
    body={JSON: ref("TaskSpec")},
    replies={200: TASK_REPLY},
    errors=(404, 409, 422),
)
@requires("operator")
def replace_task(task: str) -> Any:
    revision = expected_revision()
    current = find_or_404(task)
    spec = json_body()
    try:
        doc = ops().replace_task(actor(), current["_id"], spec, expected_revision=revision)
    except ValidationError as e:
        raise spec_problems(e) from None
    except Conflict as e:
        raise name_conflict(e) from None
    return task_reply(doc)


@api.route(
    "PATCH",
    "/tasks/<task>",
    summary="Change some keys of a task's definition",
    description="The top-level keys given replace the task's (null removes one); the result "
    "must be a valid task.",
    params=(TASK_PARAM, *REVISION_PARAMS),
    body={JSON: ref("TaskPatch")},
    replies={200: TASK_REPLY},
    errors=(404, 409, 422),
)
@requires("operator")
def patch_task(task: str) -> Any:
    revision = expected_revision()
    current = find_or_404(task)
    changes = json_body()
    try:
        doc = ops().patch_task(actor(), current["_id"], changes, expected_revision=revision)
    except ValidationError as e:
        raise spec_problems(e) from None
    except Conflict as e:
        raise name_conflict(e) from None
    return task_reply(doc)


@api.route(
    "DELETE",
    "/tasks/<task>",
    summary="Delete a task",
    description="Its running runs finish, or are asked to stop with `kill_running=true`.",
    params=(
        TASK_PARAM,
        query("kill_running", {"type": "boolean"}, "Kill its running runs (false)"),
    ),
    replies={200: Reply("The deleted task, and the runs asked to stop", "Deleted")},
    errors=(404, 422),
)
@requires("operator")
def delete_task(task: str) -> Any:
    kill = flag_arg("kill_running")
    current = find_or_404(task)
    try:
        deleted, killed = ops().delete_task(actor(), current["_id"], kill_running=kill)
    except NotFound:
        raise ApiError(404, f"task {current['name']!r} was deleted meanwhile") from None
    deleted["owner_agent"] = None
    return jsonify(deleted=task_out(deleted, detail=False), killed=killed)


@api.route(
    "POST",
    "/tasks/<task>/run",
    summary="Run a task now",
    description="The run is stored at once (queued); an agent of the task's group takes it.",
    params=(TASK_PARAM,),
    replies={202: Reply("The queued run", "Run", {"Location": "The run's URL"})},
    errors=(404, 409),
)
@requires("operator")
def run_task(task: str) -> Any:
    current = find_or_404(task)
    run = ops().run_now(actor(), current["_id"])  # Conflict (a keepalive task): 409
    answer = jsonify(run_json(run))
    answer.headers["Location"] = url_for("api.get_run", run_id=run["_id"])
    return answer, 202


def _set_enabled(task: str, enabled: bool) -> Any:
    current = find_or_404(task)
    try:
        doc = ops().set_enabled(actor(), current["_id"], enabled)
    except ValidationError as e:  # a stored spec the model no longer takes
        raise spec_problems(e) from None
    return task_reply(doc)


@api.route(
    "POST",
    "/tasks/<task>/pause",
    summary="Pause a task",
    params=(TASK_PARAM,),
    replies={200: TASK_REPLY},
    errors=(404, 409, 422),
)
@requires("operator")
def pause_task(task: str) -> Any:
    return _set_enabled(task, False)


@api.route(
    "POST",
    "/tasks/<task>/resume",
    summary="Resume a paused task",
    params=(TASK_PARAM,),
    replies={200: TASK_REPLY},
    errors=(404, 409, 422),
)
@requires("operator")
def resume_task(task: str) -> Any:
    return _set_enabled(task, True)


# --- runs -------------------------------------------------------------------------------------

RUN_PARAM = path_param("run_id", "The run's id")


def read_run(run_id: str, fields: dict[str, int]) -> dict[str, Any]:
    doc = store().run_fields(run_id, fields)
    if doc is None:
        raise ApiError(404, f"no run with id {run_id!r}")
    return doc


@api.route(
    "GET",
    "/runs",
    summary="List runs",
    description="Newest scheduled first, without their output.",
    params=(
        query("task", TEXT_ARG, "Only runs of this task (its id)"),
        query("status", {"enum": list(RUN_STATUSES)}, "Only runs in this status"),
        query("agent", TEXT_ARG, "Only runs of this agent"),
        query(
            "since",
            {"type": "string", "format": "date-time"},
            "Scheduled at or after (ISO 8601; UTC without an offset)",
        ),
        query("until", {"type": "string", "format": "date-time"}, "Scheduled before"),
        *PAGE_PARAMS,
    ),
    replies={200: Reply("One page of runs", "RunPage")},
    errors=(422,),
)
@requires("viewer")
def list_runs() -> Any:
    filters = checked(queries.run_filters)
    page = store().run_page(filters)
    return jsonify(
        items=[run_json(r) for r in page.items],
        page=page.page,
        per_page=page.per_page,
        total=page.total,
        capped=page.capped,
    )


def report_json(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    out = jsonable(report)
    out.pop("_id", None)
    out.pop("version", None)
    return out


@api.route(
    "GET",
    "/runs/<run_id>",
    summary="One run",
    description="Every fact of the run but its output, with the report of an http task's "
    "service (`report`).",
    params=(RUN_PARAM,),
    replies={200: Reply("The run", "RunDetail")},
    errors=(404,),
)
@requires("viewer")
def get_run(run_id: str) -> Any:
    out = run_json(read_run(run_id, RUN_LIST_FIELDS))
    out["report"] = report_json(store().get_report(run_id))
    return jsonify(out)


@api.route(
    "GET",
    "/runs/<run_id>/output",
    summary="A run's output",
    description="The last 64 KiB of what it wrote (its whole output is in the agent's log).",
    params=(RUN_PARAM,),
    replies={200: Reply("The output", "RunOutput")},
    errors=(404,),
)
@requires("viewer")
def run_output(run_id: str) -> Any:
    doc = read_run(run_id, {"output_tail": 1, "status": 1})
    return jsonify(run_id=doc["_id"], status=doc.get("status"), output=doc.get("output_tail") or "")


@api.route(
    "POST",
    "/runs/<run_id>/kill",
    summary="Kill a run",
    description="Its agent kills its whole process tree; a manual run no agent took yet is "
    "cancelled at once.",
    params=(RUN_PARAM,),
    replies={202: Reply("The run (killed, or asked to stop)", "Run")},
    errors=(404, 409),
)
@requires("operator")
def kill_run(run_id: str) -> Any:
    read_run(run_id, {"_id": 1})
    ops().kill_run(actor(), run_id)  # not running, or no cluster: Conflict, 409
    return jsonify(run_json(read_run(run_id, RUN_LIST_FIELDS))), 202


# --- callbacks of http tasks (no user: the run's own token) ----------------------------------


def _callback_run(run_id: str) -> dict[str, Any]:
    """The run whose token the request carries; 401 for a wrong token and an unknown run
    alike, so the API does not tell which run ids exist."""
    token = request.headers.get("X-CloudTask-Token", "")
    doc = store().run_fields(run_id, {"status": 1, "token_hash": 1}) or {}
    expected = doc.get("token_hash")
    expected = expected.encode() if isinstance(expected, str) and expected else b"\0"
    given = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest().encode()
    if not (token and hmac.compare_digest(given, expected)) or not doc:
        raise ApiError(
            401, "the run's token (X-CloudTask-Token) is missing or wrong, or there is no such run"
        )
    return doc


def _message(body: dict[str, Any], problems: list[Problem]) -> str:
    message = body.get("message", "")
    if message is None:
        return ""
    if not isinstance(message, str):
        problems.append(Problem("message", "expected a string"))
        return ""
    if len(message) > MESSAGE_LIMIT:
        problems.append(Problem("message", f"at most {MESSAGE_LIMIT} characters"))
    return message


def _unknown_keys(body: dict[str, Any], allowed: tuple[str, ...], problems: list[Problem]) -> None:
    for key in body:
        if key not in allowed:
            problems.append(Problem(key, f"unknown key; expected one of {', '.join(allowed)}"))


def _still_running(doc: dict[str, Any]) -> None:
    if doc.get("status") not in RUNNING_STATUSES:
        raise ApiError(409, f"run {doc['_id']} is not running (it is {doc.get('status')})")


CALLBACK_ERRORS = (400, 404, 409, 413, 422)


@api.route(
    "POST",
    "/runs/<run_id>/progress",
    summary="Report progress (an http task's service)",
    description="Shown on the run page. Authenticated by the run's token "
    "(`X-CloudTask-Token`), not by a user.",
    params=(RUN_PARAM,),
    body={JSON: ref("Progress")},
    replies={200: Reply("The run's report", "Report")},
    errors=CALLBACK_ERRORS,
)
def run_progress(run_id: str) -> Any:
    doc = _callback_run(run_id)
    body = json_body(CALLBACK_BODY_LIMIT)
    problems: list[Problem] = []
    _unknown_keys(body, ("percent", "message"), problems)
    percent = body.get("percent")
    if percent is not None and (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float))
        or not 0 <= percent <= 100
    ):
        problems.append(Problem("percent", "expected a number from 0 to 100"))
    message = _message(body, problems)
    if problems:
        raise ApiError(422, "the progress report is invalid", problems)
    _still_running(doc)
    value = None if percent is None else float(percent)
    return jsonify(report_json(store().report_progress(run_id, value, message)))


@api.route(
    "POST",
    "/runs/<run_id>/result",
    summary="Report the result (an http task's service)",
    description="Success or failure with a message; the agent waiting for it finishes the run. "
    "Only the first result counts (a second: 409). Authenticated by the run's token.",
    params=(RUN_PARAM,),
    body={JSON: ref("Result")},
    replies={202: Reply("The run's report, with its result", "Report")},
    errors=CALLBACK_ERRORS,
)
def run_result(run_id: str) -> Any:
    doc = _callback_run(run_id)
    body = json_body(CALLBACK_BODY_LIMIT)
    problems: list[Problem] = []
    _unknown_keys(body, ("status", "message"), problems)
    status = body.get("status")
    if status not in RESULT_STATUSES:
        got = "nothing" if "status" not in body else json.dumps(status)[:40]
        problems.append(Problem("status", f"expected succeeded or failed, got {got}"))
    message = _message(body, problems)
    if problems:
        raise ApiError(422, "the result is invalid", problems)
    _still_running(doc)
    return jsonify(report_json(store().report_result(run_id, status, message))), 202


# --- agents and the cluster -------------------------------------------------------------------


def agent_json(row: dict[str, Any]) -> dict[str, Any]:
    out = jsonable(row)
    out["load"] = {
        "cpu_percent": out.pop("cpu_percent", None),
        "memory_percent": out.pop("memory_percent", None),
    }
    return out


@api.route(
    "GET",
    "/agents",
    summary="Every agent",
    description="Live ones (from ZooKeeper) and those that went away (offline, last seen), "
    "with host, pid, load, running runs and assigned tasks.",
    replies={200: Reply("The agents, by group", "AgentList")},
)
@requires("viewer")
def list_agents() -> Any:
    return jsonify(items=[agent_json(a) for a in agents()])


@api.route(
    "GET",
    "/cluster",
    summary="The cluster",
    description="The leading center, every center and agent, and the tasks no live agent can "
    f"take (at most {UNASSIGNED_LISTED} listed; `unassigned_total` counts them all).",
    replies={200: Reply("The cluster as ZooKeeper shows it", "Cluster")},
)
@requires("viewer")
def get_cluster() -> Any:
    view = cluster()
    unassigned = sorted(view.unassigned.items())
    listed = unassigned[:UNASSIGNED_LISTED]
    names = {}
    if listed:
        names = store().task_names(t for t, _ in listed)
    return jsonify(
        connected=view.connected,
        leader=view.leader,
        centers=jsonable(view.centers),
        agents=[agent_json(a) for a in agents()],
        unassigned=[{"task_id": t, "name": names.get(t), "group": g} for t, g in listed],
        unassigned_total=len(unassigned),
    )


# --- events -----------------------------------------------------------------------------------


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
        query("task", TEXT_ARG, "Only events of this task (its id)"),
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
    errors=(422,),
)
@requires("viewer")
def list_events() -> Any:
    filters = checked(queries.event_filters)
    page = store().event_page(filters)
    return jsonify(
        items=[event_json(e) for e in page.items],
        page=page.page,
        per_page=page.per_page,
        total=page.total,
        capped=page.capped,
    )


# --- files ------------------------------------------------------------------------------------


@api.route(
    "GET",
    "/files",
    summary="Task files",
    description="The latest version of each stored file.",
    replies={200: Reply("The files, by name", "FileList")},
)
@requires("viewer")
def list_files() -> Any:
    return jsonify(items=jsonable(store().list_files()))


def _file_name(given: str | None, fallback: str) -> str:
    if given not in (None, ""):
        return given
    # a browser may send a path: keep its last part (the name is then checked like any)
    return re.split(r"[/\\]", fallback or "")[-1]


@api.route(
    "POST",
    "/files",
    summary="Upload a task file",
    description="A script, a binary, or a .zip/.tar.gz package: the multipart field `file` "
    "(and `name`, else the file's own name), or the raw body with `?name=`. A new version "
    "of the file; the bytes of the latest version again add none (200).",
    params=(query("name", {"type": "string"}, "The file's name (a raw body needs it)"),),
    body={
        "multipart/form-data": ref("Upload"),
        "application/octet-stream": {"type": "string", "format": "binary"},
    },
    replies={
        201: Reply("The new version", "File"),
        200: Reply("Unchanged: the latest version holds these bytes", "File"),
    },
    errors=(422,),
)
@requires("operator")
def upload_file() -> Any:
    cfg = current_app.config["CLOUDTASK"]
    limit = cfg.web.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise too_large(limit)
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        upload = request.files.get("file")
        if upload is None:
            raise invalid("the upload is invalid", "file", "required: the file's contents")
        name = _file_name(request.form.get("name") or request.args.get("name"), upload.filename)
        data = upload.read(limit + 1)
    else:
        name = request.args.get("name") or ""
        data = request.get_data(cache=False)
    if len(data) > limit:
        raise too_large(limit)
    if not name:
        raise invalid("the upload is invalid", "name", "required: the file's name")
    try:
        info = ops().put_file(actor(), name, data, keep=cfg.web.file_versions_kept, max_bytes=limit)
    except ValidationError as e:
        raise ApiError(422, f"the file {name[:100]!r} is refused", e.problems) from None
    created = info.get("created", True)
    return jsonify(jsonable(info)), 201 if created else 200


# --- the document -----------------------------------------------------------------------------


@api.route(
    "GET",
    "/openapi.json",
    summary="This API's OpenAPI document",
    replies={200: Reply("The OpenAPI 3.1 document", "OpenApi")},
)
@requires("viewer")
def openapi() -> Any:
    cache = current_app.extensions.setdefault("cloudtask_openapi", {})
    if "doc" not in cache:
        cache["doc"] = document(api)
    return jsonify(cache["doc"])
