"""Tasks as code through the API: ``POST /api/v1/tasks:apply`` takes task files' tasks and
answers the plan ``cloudtask apply`` prints (:mod:`cloudtask.taskdiff`), then applies it, or
only answers it with ``dry_run=true``. Every task is checked first: nothing is stored if one
is invalid (422, each problem at ``tasks[i].PATH``)."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError
from cloudtask.schedules import NAME_PATTERN
from cloudtask.task import validate_task
from cloudtask.taskdiff import after_parents, apply_item, make_plan

from ..auth import requires
from ..context import actor, ops, store
from ..openapi import JSON, Reply, query, ref
from ..openapi_schemas import NAME, SCHEMAS
from .hardening import ApiError, flag_arg, json_body, unknown_keys
from .table import api

MAX_APPLY = 1000  # tasks in one request (and groups to prune)
_ANY: dict[str, Any] = {}  # any JSON value

APPLY_SCHEMAS: dict[str, Any] = {
    "TaskApply": {
        "type": "object",
        "required": ["tasks"],
        "additionalProperties": False,
        "properties": {
            "tasks": {
                "type": "array",
                "maxItems": MAX_APPLY,
                # each is read by the task model, its problems answered at tasks[i].PATH
                "items": {"type": "object", "description": "A task, as TaskSpec describes it"},
            },
            "prune": {
                "type": "boolean",
                "description": "Also delete the tasks apply created or changed that no task "
                "of `tasks` names, in their groups and `prune_groups` (false)",
            },
            "prune_groups": {
                "type": "array",
                "maxItems": MAX_APPLY,
                "items": NAME,
                "description": "Groups to prune too (implies prune)",
            },
        },
    },
    "TaskApplyResult": {
        "type": "object",
        "required": ["dry_run", "plan", "kept", "applied"],
        "properties": {
            "dry_run": {"type": "boolean"},
            "plan": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["action", "name", "group", "changes", "notes"],
                    "properties": {
                        "action": {"enum": ["create", "change", "unchanged", "delete"]},
                        "name": {"type": "string"},
                        "group": {"type": "string"},
                        "changes": {
                            "type": "array",
                            "description": "The fields that differ, by path; `old` or `new` "
                            "is left out where the key is on one side only; credentials masked",
                            "items": {
                                "type": "object",
                                "required": ["path"],
                                "properties": {
                                    "path": {"type": "string"},
                                    "old": _ANY,
                                    "new": _ANY,
                                },
                            },
                        },
                        "notes": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
            "kept": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Tasks of the pruned groups not named, and not deleted: not "
                "created or changed by apply",
            },
            "applied": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["outcome", "name"],
                    "properties": {
                        "outcome": {
                            "enum": ["created", "updated", "unchanged", "deleted", "skipped"]
                        },
                        "name": {"type": "string"},
                    },
                },
            },
        },
    },
}
SCHEMAS.update(APPLY_SCHEMAS)


def _read(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """The tasks, prune and the groups to prune, or 422 with every problem."""
    problems: list[Problem] = []
    unknown_keys(body, ("tasks", "prune", "prune_groups"), problems)
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        problems.append(Problem("tasks", "expected a list of task objects"))
        tasks = []
    elif len(tasks) > MAX_APPLY:
        problems.append(Problem("tasks", f"{len(tasks):,} tasks; at most {MAX_APPLY} at once"))
        tasks = []
    prune = body.get("prune", False)
    if not isinstance(prune, bool):
        problems.append(Problem("prune", "expected true or false"))
    groups = body.get("prune_groups", [])
    if not isinstance(groups, list) or len(groups) > MAX_APPLY:
        problems.append(Problem("prune_groups", f"expected a list of at most {MAX_APPLY} names"))
        groups = []
    for i, group in enumerate(groups):
        if not isinstance(group, str) or not NAME_PATTERN.fullmatch(group):
            problems.append(Problem(f"prune_groups[{i}]", "expected a group's name"))
    seen: set[str] = set()
    for i, task in enumerate(tasks):
        problems += [_at(i, p) for p in validate_task(task)]
        name = task.get("name") if isinstance(task, dict) else None
        if isinstance(name, str) and name in seen:
            problems.append(Problem(f"tasks[{i}].name", f"{name!r} is given more than once"))
        seen.add(name if isinstance(name, str) else "")
    if problems:
        raise ApiError(422, "nothing applied: the request is invalid", problems)
    return tasks, bool(prune) or bool(groups), groups


def _at(i: int, problem: Problem) -> Problem:
    return Problem(f"tasks[{i}].{problem.path}" if problem.path else f"tasks[{i}]", problem.message)


@api.route(
    "POST",
    "/tasks:apply",
    summary="Apply tasks as code",
    description="The plan of `cloudtask apply` for these tasks (each `create`, `change` with "
    "the fields that differ, `unchanged`, and with `prune` `delete`), then applied: creates "
    "and changes (parents before the tasks that run after them), then deletes. An unchanged "
    "task is not written. With `dry_run=true` only the plan. Every task is checked first; "
    "nothing is stored if one is invalid.",
    params=(query("dry_run", {"type": "boolean"}, "Only the plan, nothing changed (false)"),),
    body={JSON: ref("TaskApply")},
    replies={200: Reply("The plan, and what was applied", "TaskApplyResult")},
    errors=(409, 422),
)
@requires("operator")
def apply_tasks() -> Any:
    dry_run = flag_arg("dry_run")
    tasks, prune, groups = _read(json_body())
    operations = ops()
    batch = after_parents(tasks)
    problems: list[Problem] = []
    for i, task in enumerate(tasks):
        try:
            operations.check_apply(task, batch)
        except ValidationError as e:
            problems += [_at(i, p) for p in e.problems]
    if problems:
        raise ApiError(422, "nothing applied: a task is refused", problems)
    named = [(f"tasks[{i}]", task) for i, task in enumerate(tasks)]
    plan = make_plan(store(), named, prune=prune, prune_groups=groups)
    applied: list[dict[str, str]] = []
    if not dry_run:
        who = actor()
        for item in plan.pending:
            try:
                outcome, _ = apply_item(operations, who, item)
            except (ValidationError, Conflict, NotFound) as e:
                done = ", ".join(a["name"] for a in applied) or "none"
                details = list(getattr(e, "problems", []))
                status = 422 if isinstance(e, ValidationError) else 409
                raise ApiError(
                    status, f"stopped at {item.name}: {e}; applied before it: {done}", details
                ) from None
            applied.append({"outcome": outcome, "name": item.name})
    return jsonify(
        dry_run=dry_run,
        plan=[i.to_json() for i in plan.items],
        kept=plan.kept,
        applied=applied,
    )
