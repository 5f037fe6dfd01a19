"""The API about itself: who the logged-in user is, and the OpenAPI document of every route
(built once per app from the route table)."""

from __future__ import annotations

from typing import Any

from flask import jsonify
from flask_login import current_user

from cloudtask.users import public_token

from ..auth import requires
from ..context import extension
from ..openapi import Reply, document
from .table import api


@api.route("GET", "/me", summary="The logged-in user", replies={200: Reply("The user", "Me")})
@requires("viewer")
def me() -> Any:
    answer: dict[str, Any] = {"username": current_user.username, "role": current_user.role}
    token = getattr(current_user, "token", None)
    if token is not None:  # the API token this request came with: what it may do, how long
        shown = public_token(token)
        answer["token"] = {k: shown[k] for k in ("id", "name", "scope", "expires_at")}
    return jsonify(answer)


@api.route(
    "GET",
    "/openapi.json",
    summary="This API's OpenAPI document",
    replies={200: Reply("The OpenAPI 3.1 document", "OpenApi")},
)
@requires("viewer")
def openapi() -> Any:
    return jsonify(extension().cached("openapi", float("inf"), lambda: document(api)))
