"""The API's tasks: list, create, get, replace, patch, delete, run now, pause, resume.

A task is answered with its definition, its state, the agent that owns it and (one task)
its next fire times, with its revision as the ETag; PUT and PATCH take the revision they
expect (``If-Match`` or ``?revision=``) and answer 409 when the task changed meanwhile. The
answer of a create, replace or patch also carries ``warnings``: what was stored but should
not be, such as a header named like a credential given in clear (``http.headers.
Authorization``: store it as a secret and give ``{"secret": "NAME"}``). A reference to a
secret that is not stored is refused (422 at its path).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timezone
from typing import Any

from flask import jsonify, request, url_for

from cloudtask.clock import utcnow
from cloudtask.dependencies import dependency_status
from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError
from cloudtask.operations import find_task, task_warnings
from cloudtask.store import nest_dotted
from cloudtask.store.calendars import preview_fires
from cloudtask.task import parse_task

from .. import queries
from ..auth import requires
from ..context import actor, cluster, jsonable, ops, run_json, store, task_json
from ..openapi import JSON, Reply, header, path_param, query, ref
from ..queries import LAST_RESULTS, TASK_STATES
from ..tasks import task_state
from .hardening import ApiError, checked, expected_revision, flag_arg, json_body
from .table import PAGE_PARAMS, TEXT_ARG, api, page_json

NEXT_FIRES = 10

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


# --- output -----------------------------------------------------------------------------------


def owner_of(task_id: str) -> str | None:
    view = cluster()
    return view.owners.get(task_id) if view.connected else None


def fire_times(task: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The next fires in UTC (ISO 8601), its calendar rule judged, each with the blackout
    that will record it skipped (or None); none for a done, keepalive or unreadable task."""
    if task.get("done_at"):
        return []
    try:
        spec = parse_task(task["spec"])
    except ValidationError:
        return []
    if spec.schedule.keepalive:
        return []
    fires = preview_fires(store(), spec, utcnow(), NEXT_FIRES)
    return [(f.astimezone(timezone.utc).isoformat(), blackout) for f, blackout in fires]


def task_out(doc: dict[str, Any], detail: bool = True) -> dict[str, Any]:
    doc.setdefault("spec", {})
    owner = doc.get("owner_agent") if "owner_agent" in doc else owner_of(doc["_id"])
    out = task_json(doc, owner)
    out["enabled"] = bool(out["enabled"])  # flags are read by truthiness (nx-27017)
    out["state"] = task_state(doc)
    if detail:
        fires = fire_times(doc)
        out["next_fires"] = [at for at, _ in fires]
        if any(blackout for _, blackout in fires):  # recorded skipped by a blackout
            out["next_fires_skipped"] = [
                {"at": at, "reason": f"blackout {blackout}"} for at, blackout in fires if blackout
            ]
        status = dependency_status(store(), doc["spec"])
        if status:  # a task that runs after others: what it waits for
            out["dependencies"] = status
    return out


def task_reply(
    doc: dict[str, Any], status: int = 200, *, warnings: bool = False, **headers: str
) -> Any:
    """The task as JSON, its revision as the ETag; ``warnings``: with the task's warnings
    (the answer of a change)."""
    out = task_out(doc)
    if warnings:
        out["warnings"] = [p.to_dict() for p in task_warnings(doc["spec"])]
    answer = jsonify(out)
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


# --- routes -----------------------------------------------------------------------------------


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
    return jsonify(page_json(page, items))


def _changed(change: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The task ``change()`` stored: 422 naming each problem, 409 (at ``name`` for a name
    taken) for a conflict."""
    try:
        return change()
    except ValidationError as e:
        raise spec_problems(e) from None
    except Conflict as e:
        raise name_conflict(e) from None


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
    doc = _changed(lambda: ops().create_task(actor(), spec))
    return task_reply(doc, 201, warnings=True, Location=url_for("api.get_task", task=doc["_id"]))


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
    return task_reply(
        _changed(lambda: ops().replace_task(actor(), current["_id"], spec, revision)),
        warnings=True,
    )


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
    return task_reply(
        _changed(lambda: ops().patch_task(actor(), current["_id"], changes, revision)),
        warnings=True,
    )


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
    description="The run is stored at once (queued); an agent of the task's group takes it. "
    'An optional body `{"env": {"NAME": "value"}}` gives the run parameters: environment '
    "values on top of the task's own (checked like its env; 422 at `env.NAME`).",
    params=(TASK_PARAM,),
    body={JSON: ref("RunParams")},
    replies={202: Reply("The queued run", "Run", {"Location": "The run's URL"})},
    errors=(404, 409, 422),
)
@requires("operator")
def run_task(task: str) -> Any:
    current = find_or_404(task)
    env = None
    if request.get_data(cache=True).strip():
        body = json_body()
        unknown = [k for k in body if k != "env"]
        if unknown:
            raise ApiError(
                422,
                "the run is invalid",
                [Problem(k, "unknown key; expected env") for k in unknown],
            )
        env = body.get("env")
    try:
        run = ops().run_now(actor(), current["_id"], env=env)  # Conflict (keepalive): 409
    except ValidationError as e:
        raise ApiError(422, "the run's parameters are invalid", e.problems) from None
    answer = jsonify(run_json(run))
    answer.headers["Location"] = url_for("api.get_run", run_id=run["_id"])
    return answer, 202


@api.route(
    "POST",
    "/tasks/<task>/backfill",
    summary="Backfill a range of a task's fire times",
    description='`{"start": "...", "end": "..."}` (ISO 8601, both included, `end` not in the '
    "future, at most 1,000 fires): a run is queued for each fire time of the task in the "
    "range, under that time, so a fire that has a run already is not run again; a `forbid` "
    "task runs them one after the other.",
    params=(TASK_PARAM,),
    body={JSON: ref("Backfill")},
    replies={202: Reply("How many were queued", "BackfillQueued")},
    errors=(404, 422),
)
@requires("operator")
def backfill_task(task: str) -> Any:
    current = find_or_404(task)
    body = json_body()
    unknown = [k for k in body if k not in ("start", "end")]
    if unknown:
        raise ApiError(
            422,
            "the backfill is invalid",
            [Problem(k, "unknown key; expected start, end") for k in unknown],
        )
    try:
        result = ops().backfill(actor(), current["_id"], body.get("start"), body.get("end"))
    except ValidationError as e:
        raise ApiError(422, "the backfill is invalid", e.problems) from None
    return jsonify(jsonable(result)), 202


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


@api.route(
    "POST",
    "/tasks/<task>/clone",
    summary="Clone a task",
    description='`{"name": "new-name"}`: a copy of the task\'s definition under the new name, '
    "created paused so it does not fire next to the original (as the clone page does). "
    "Optional `changes`: top-level keys of the spec to change in the copy, as PATCH takes "
    'them (`{"group": "batch", "enabled": true}`; null removes a key).',
    params=(TASK_PARAM,),
    body={JSON: ref("Clone")},
    replies={201: Reply("The copy", "Task", {"Location": "The copy's URL"})},
    errors=(404, 409, 422),
)
@requires("operator")
def clone_task(task: str) -> Any:
    current = find_or_404(task)
    body = json_body()
    problems: list[Problem] = []
    for key in body:
        if key not in ("name", "changes"):
            problems.append(Problem(key, "unknown key; expected name, changes"))
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem("name", "required: the copy's name"))
    changes = body.get("changes")
    if changes is not None and not isinstance(changes, dict):
        problems.append(Problem("changes", "expected an object of the spec's keys to change"))
    elif changes and "name" in changes:
        problems.append(Problem("changes.name", "give the copy's name as name, not here"))
    if problems:
        raise ApiError(422, "the clone is invalid", problems)
    changes = changes or {}
    try:
        doc = ops().clone_task(actor(), current["_id"], name.strip(), changes)
    except ValidationError as e:
        raise ApiError(
            422,
            "the clone is invalid",
            [_clone_problem(p, changes) for p in e.problems],
        ) from None
    except Conflict as e:
        raise name_conflict(e) from None
    return task_reply(doc, 201, warnings=True, Location=url_for("api.get_task", task=doc["_id"]))


def _clone_problem(problem: Problem, changes: dict[str, Any]) -> Problem:
    """A problem of the copy at the body's path: ``changes.KEY`` for a key the body changed."""
    head = problem.path.split(".")[0].split("[")[0]
    if head and head != "name" and head in changes:
        return Problem(f"changes.{problem.path}", problem.message)
    return problem
