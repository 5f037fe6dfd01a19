"""The API's concurrency pools: list (with how full each is), set a size, delete."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from cloudtask.clusterview import pool_usage
from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError

from ..auth import requires
from ..context import actor, jsonable, ops, paths, store, zk
from ..openapi import JSON, Reply, path_param, ref
from .hardening import ApiError, json_body
from .table import api

NAME_PARAM = path_param("name", "The pool's name")


@api.route(
    "GET",
    "/pools",
    summary="Concurrency pools",
    description="Each pool's size and, with the cluster, the runs holding a place (`running`) "
    "and waiting for one (`waiting`).",
    replies={200: Reply("The pools, by name", "PoolList")},
)
@requires("viewer")
def list_pools() -> Any:
    return jsonify(items=jsonable(pool_usage(zk(), paths(), store().list_pools())))


@api.route(
    "PUT",
    "/pools/<name>",
    summary="Create a pool or change its size",
    description='`{"size": N}`: at most N runs at once, across the cluster, of the tasks '
    "and plan items naming the pool; the others wait in order.",
    params=(NAME_PARAM,),
    body={JSON: ref("PoolPut")},
    replies={200: Reply("The pool", "Pool"), 201: Reply("The new pool", "Pool")},
    errors=(422,),
)
@requires("operator")
def put_pool(name: str) -> Any:
    body = json_body()
    unknown = [k for k in body if k != "size"]
    if unknown:
        raise ApiError(
            422, "the pool is invalid", [Problem(k, "unknown key; expected size") for k in unknown]
        )
    existed = any(p["name"] == name for p in store().list_pools())
    try:
        pool = ops().set_pool(actor(), name, body.get("size"))
    except ValidationError as e:
        raise ApiError(422, "the pool is invalid", e.problems) from None
    return jsonify(jsonable(pool)), 200 if existed else 201


@api.route(
    "DELETE",
    "/pools/<name>",
    summary="Delete a pool",
    description="Refused (409) while a task names it.",
    params=(NAME_PARAM,),
    replies={200: Reply("The deleted pool's name", "PoolDeleted")},
    errors=(404, 409),
)
@requires("operator")
def delete_pool(name: str) -> Any:
    try:
        ops().delete_pool(actor(), name)
    except NotFound:
        raise ApiError(404, f"no pool named {name[:100]!r}") from None
    except Conflict as e:
        raise ApiError(409, f"{e}: change those tasks first") from None
    return jsonify(deleted=name)
