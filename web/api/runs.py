"""The API's runs: list, get (with an http task's report), output, kill; and the two
callbacks of http tasks (``/runs/<run_id>/progress`` and ``/result``).

The callbacks need no user: the service proves itself with the run's own token
(``X-CloudTask-Token``), and a wrong token and an unknown run get the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from flask import jsonify, request

from cloudtask.exceptions import Problem
from cloudtask.runmodel import RESULT_STATUSES, RUNNING_STATUSES
from cloudtask.store.queries import RUN_LIST_FIELDS

from .. import queries
from ..auth import requires
from ..context import actor, jsonable, ops, run_json, store
from ..openapi import JSON, Reply, path_param, query, ref
from ..queries import RUN_STATUSES
from .events import with_task_id
from .hardening import (
    CALLBACK_BODY_LIMIT,
    MESSAGE_LIMIT,
    ApiError,
    checked,
    json_body,
    unknown_keys,
)
from .table import PAGE_PARAMS, TEXT_ARG, api, page_json

RUN_PARAM = path_param("run_id", "The run's id")
CALLBACK_ERRORS = (400, 404, 409, 413, 422)


def read_run(run_id: str, fields: dict[str, int]) -> dict[str, Any]:
    doc = store().run_fields(run_id, fields)
    if doc is None:
        raise ApiError(404, f"no run with id {run_id!r}")
    return doc


def report_json(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    out = jsonable(report)
    out.pop("_id", None)
    out.pop("version", None)
    return out


# --- runs -------------------------------------------------------------------------------------


@api.route(
    "GET",
    "/runs",
    summary="List runs",
    description="Newest scheduled first, without their output.",
    params=(
        query("task", TEXT_ARG, "Only runs of this task (its name or id; 404 if none)"),
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
    errors=(404, 422),
)
@requires("viewer")
def list_runs() -> Any:
    filters = with_task_id(checked(queries.run_filters))
    page = store().run_page(filters)
    return jsonify(page_json(page, [run_json(r) for r in page.items]))


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


def _still_running(doc: dict[str, Any]) -> None:
    if doc.get("status") not in RUNNING_STATUSES:
        raise ApiError(409, f"run {doc['_id']} is not running (it is {doc.get('status')})")


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
    unknown_keys(body, ("percent", "message"), problems)
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
    unknown_keys(body, ("status", "message"), problems)
    status = body.get("status")
    if status not in RESULT_STATUSES:
        got = "nothing" if "status" not in body else json.dumps(status)[:40]
        problems.append(Problem("status", f"expected succeeded or failed, got {got}"))
    message = _message(body, problems)
    if problems:
        raise ApiError(422, "the result is invalid", problems)
    _still_running(doc)
    return jsonify(report_json(store().report_result(run_id, status, message))), 202
