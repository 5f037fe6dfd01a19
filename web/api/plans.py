"""The API's plans: work other systems submit, each item run once by a free agent of its type.

``POST /plans`` takes a plan as JSON, or as XML (``Content-Type: application/xml``); the
whole plan is validated first: 201 with the receipt (plan id, item ids, how many were new and
how many were submitted before under the same ``external_id``), or 422 with every problem
(``items[3].command``) and nothing stored. ``GET /plans/<id>`` gives its counts by state and
every item; ``/items?state=`` filters; ``POST /plans/<id>/cancel`` and
``POST /plans/items/<item_id>/cancel`` drop what waits and kill what runs.
"""

from __future__ import annotations

from typing import Any

from flask import jsonify, request

from cloudtask.exceptions import Conflict, NotFound, ValidationError
from cloudtask.runmodel import FINISHED_STATUSES, RUNNING_STATUSES

from ..auth import requires
from ..context import actor, jsonable, ops, store
from ..openapi import JSON, Reply, path_param, query, ref
from .hardening import ApiError, json_body, too_large
from .table import api

PLAN_BODY_LIMIT = 32 * 1024 * 1024  # 10,000 items of a few KiB
XML_TYPES = ("application/xml", "text/xml")
ITEM_STATES = (*RUNNING_STATUSES, "retrying", *FINISHED_STATUSES)
PLAN_PARAM = path_param("plan_id", "The plan's id (from its receipt)")
ITEM_PARAM = path_param("item_id", "The item's id (from its plan's receipt)")
STATE_QUERY = query(
    "state", {"type": "string", "enum": list(ITEM_STATES)}, "Only items in this state"
)


def _plan_out(plan: dict[str, Any], items: list[dict[str, Any]] | None) -> dict[str, Any]:
    out = {
        "plan_id": plan["_id"],
        "name": plan.get("name") or "",
        "submitter": plan.get("submitter"),
        "callback_url": plan.get("callback_url"),
        "created_at": plan.get("created_at"),
        "cancelled_at": plan.get("cancelled_at"),
        "cancelled_by": plan.get("cancelled_by"),
        "total": plan.get("total", 0),
        "counts": plan.get("counts", {}),
        "done": bool(plan.get("done")),
    }
    if items is not None:
        out["items"] = items
    return jsonable(out)


def _plan(plan_id: str) -> dict[str, Any]:
    try:
        return store().get_plan(plan_id)
    except NotFound:
        raise ApiError(404, f"no plan {plan_id[:100]!r}") from None


@api.route(
    "POST",
    "/plans",
    summary="Submit a plan",
    description="A set of items, each a task to run once by a free agent of its `type` (the "
    "agent group). JSON, or XML with `Content-Type: application/xml`. Validated whole first: "
    "the answer is a receipt, or every problem with its path and nothing is stored. An item "
    "with an `external_id` submitted before by the same user is not stored again: the "
    "receipt names the existing item (`existing: true`).",
    body={JSON: ref("PlanSubmit"), "application/xml": {"schema": {"type": "string"}}},
    replies={201: Reply("The receipt", "PlanReceipt")},
    errors=(413, 422),
)
@requires("operator")
def submit_plan() -> Any:
    content_type = (request.mimetype or "").lower()
    xml = content_type in XML_TYPES
    if xml:
        if request.content_length is not None and request.content_length > PLAN_BODY_LIMIT:
            raise too_large(PLAN_BODY_LIMIT)
        data: Any = request.get_data(cache=True)
        if len(data) > PLAN_BODY_LIMIT:
            raise too_large(PLAN_BODY_LIMIT)
    else:
        data = json_body(PLAN_BODY_LIMIT)
    try:
        receipt = ops().submit_plan(actor(), data, xml=xml)
    except ValidationError as e:
        raise ApiError(422, "the plan is invalid: nothing was stored", e.problems) from None
    return jsonify(jsonable(receipt)), 201


@api.route(
    "GET",
    "/plans",
    summary="Plans",
    description="The latest plans, newest first (without their items).",
    replies={200: Reply("The plans", "PlanList")},
)
@requires("viewer")
def list_plans() -> Any:
    plans = store().list_plans()
    return jsonify(items=[_plan_out(p, None) for p in plans])


@api.route(
    "GET",
    "/plans/<plan_id>",
    summary="One plan: its counts by state and every item",
    params=(PLAN_PARAM,),
    replies={200: Reply("The plan", "Plan")},
    errors=(404,),
)
@requires("viewer")
def get_plan(plan_id: str) -> Any:
    plan = _plan(plan_id)
    return jsonify(_plan_out(plan, store().plan_items(plan_id)))


@api.route(
    "GET",
    "/plans/<plan_id>/items",
    summary="A plan's items",
    description="Each item as its latest attempt left it; `state` filters.",
    params=(PLAN_PARAM, STATE_QUERY),
    replies={200: Reply("The items", "PlanItemList")},
    errors=(404, 422),
)
@requires("viewer")
def plan_items(plan_id: str) -> Any:
    state = request.args.get("state") or None
    if state is not None and state not in ITEM_STATES:
        raise ApiError(
            422,
            "the query arguments are invalid",
            [_problem("state", f"expected one of {', '.join(ITEM_STATES)}")],
        )
    try:
        items = store().plan_items(plan_id, state)
    except NotFound:
        raise ApiError(404, f"no plan {plan_id[:100]!r}") from None
    return jsonify(items=jsonable(items))


@api.route(
    "POST",
    "/plans/<plan_id>/cancel",
    summary="Cancel a plan",
    description="Items that wait are dropped (recorded `killed`), running ones are killed, "
    "and no further attempt is queued.",
    params=(PLAN_PARAM,),
    replies={200: Reply("What was dropped and what is being killed", "PlanCancelled")},
    errors=(404, 409),
)
@requires("operator")
def cancel_plan(plan_id: str) -> Any:
    try:
        result = ops().cancel_plan(actor(), plan_id)
    except NotFound:
        raise ApiError(404, f"no plan {plan_id[:100]!r}") from None
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    return jsonify(result)


@api.route(
    "POST",
    "/plans/items/<item_id>/cancel",
    summary="Cancel one plan item",
    description="Its waiting attempt is dropped, or its running one killed.",
    params=(ITEM_PARAM,),
    replies={200: Reply("Whether it was dropped or is being killed", "PlanItemCancelled")},
    errors=(404, 409),
)
@requires("operator")
def cancel_item(item_id: str) -> Any:
    try:
        result = ops().cancel_item(actor(), item_id)
    except NotFound:
        raise ApiError(404, f"no plan item {item_id[:100]!r}") from None
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    return jsonify(result)


def _problem(path: str, message: str) -> Any:
    from cloudtask.exceptions import Problem

    return Problem(path, message)
