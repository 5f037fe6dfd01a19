"""The API's stored secrets: list, one, set or replace (PUT), delete. Never a value.

Like the Secrets page: every user sees the names and the tasks using each; operators also see
the description, the key a value is sealed under, who changed it and when, and may PUT
(``{"value": "...", "description": "..."}``: 201 for a new secret, 200 for a replaced value)
and DELETE (409 while a task uses it). The web process seals a value with its key ring
(``secrets.keys``); without one, a PUT is 503 saying why (and the list says so too:
``can_store``, ``store_problem``).
"""

from __future__ import annotations

from typing import Any

from flask import jsonify
from flask_login import current_user

from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError
from cloudtask.secretbox import SecretError
from cloudtask.store.secrets import secret_name_problem

from ..auth import requires
from ..context import actor, jsonable, ops, secret_box, store
from ..openapi import JSON, Reply, path_param, ref
from .hardening import ApiError, json_body
from .table import api

NAME_PARAM = path_param("name", "The secret's name")
SECRET_REPLY = Reply("The secret (never its value)", "Secret")
BODY_KEYS = ("value", "description")
OPERATOR_FIELDS = (
    "description",
    "key_id",
    "revision",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
)


def secret_out(info: dict[str, Any]) -> dict[str, Any]:
    """A secret as the API shows it to this user: names only for a viewer."""
    out: dict[str, Any] = {
        "name": info["name"],
        "used_by": [{"id": t["id"], "name": t["name"]} for t in info.get("used_by", [])],
    }
    if current_user.can("operator"):
        out.update({k: info.get(k) for k in OPERATOR_FIELDS})
    return jsonable(out)


def _info(name: str) -> dict[str, Any]:
    if secret_name_problem(name):  # no such name can be stored: not even asked for
        raise ApiError(404, f"no secret named {name[:100]!r}")
    try:
        return store().get_secret_info(name)
    except NotFound:
        raise ApiError(404, f"no secret named {name[:100]!r}") from None


@api.route(
    "GET",
    "/secrets",
    summary="Stored secrets",
    description="Every secret's name and the tasks using it; operators also see its "
    "description, key, and who changed it when. Never a value.",
    replies={200: Reply("The secrets, by name", "SecretList")},
)
@requires("viewer")
def list_secrets() -> Any:
    _, problem = secret_box()
    items = [secret_out(info) for info in store().list_secrets()]
    return jsonify(items=items, can_store=not problem, store_problem=problem or None)


@api.route(
    "GET",
    "/secrets/<name>",
    summary="One stored secret",
    description="Its name and the tasks using it (operators: also its description, key, and "
    "who changed it when). Never its value.",
    params=(NAME_PARAM,),
    replies={200: SECRET_REPLY},
    errors=(404,),
)
@requires("viewer")
def get_secret(name: str) -> Any:
    return jsonify(secret_out(_info(name)))


@api.route(
    "PUT",
    "/secrets/<name>",
    summary="Set or replace a secret's value",
    description="The value is sealed under the web process's key ring and never shown again "
    "(the answer is the secret without it). A description left out is kept. 503 when this "
    "web process has no key ring (`secrets.keys`).",
    params=(NAME_PARAM,),
    body={JSON: ref("SecretPut")},
    replies={
        201: Reply("The new secret", "Secret"),
        200: Reply("The secret, its value replaced", "Secret"),
    },
    errors=(422, 503),
)
@requires("operator")
def put_secret(name: str) -> Any:
    body = json_body()
    unknown = [key for key in body if key not in BODY_KEYS]
    if unknown:
        problems = [Problem(k, "unknown key; expected value, description") for k in unknown]
        raise ApiError(422, "the secret is invalid", problems)
    box, problem = secret_box()
    try:
        existed = not secret_name_problem(name) and name in store().stored_secret_names([name])
        info = ops().set_secret(actor(), box, name, body.get("value"), body.get("description"))
    except ValidationError as e:
        raise ApiError(422, "the secret is invalid", e.problems) from None
    except SecretError:
        raise ApiError(503, f"secrets cannot be stored: {problem}") from None
    return jsonify(secret_out(info)), 200 if existed else 201


@api.route(
    "DELETE",
    "/secrets/<name>",
    summary="Delete a secret",
    description="Refused (409) while a task uses it: the error names the tasks.",
    params=(NAME_PARAM,),
    replies={200: Reply("The deleted secret's name", "SecretDeleted")},
    errors=(404, 409),
)
@requires("operator")
def delete_secret(name: str) -> Any:
    if secret_name_problem(name):
        raise ApiError(404, f"no secret named {name[:100]!r}")
    try:
        ops().delete_secret(actor(), name)
    except NotFound:
        raise ApiError(404, f"no secret named {name[:100]!r}") from None
    except Conflict as e:
        raise ApiError(409, f"{e}: change those tasks first") from None
    return jsonify(deleted=name)
