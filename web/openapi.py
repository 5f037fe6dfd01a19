"""The OpenAPI 3.1 document of the REST API, built from the routes themselves.

Every API route is declared with :meth:`ApiTable.route` (see :mod:`web.api`): one call adds
the Flask URL rule and records what the document says of it (parameters, request body,
replies, errors), so the document and the URL map cannot drift apart. This module is the
machinery (parameters, replies, operations, the table, :func:`document`); the schemas of the
bodies the API takes and gives are :mod:`web.openapi_schemas`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint

from cloudtask import __version__

from .openapi_schemas import SCHEMAS, ref

OPENAPI_VERSION = "3.1.0"
PREFIX = "/api/v1"
JSON = "application/json"

# --- what a route declares --------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query, path or header parameter."""

    name: str
    where: str  # query, path or header
    schema: dict[str, Any]
    description: str
    required: bool = False

    def to_openapi(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "in": self.where,
            "required": self.required or self.where == "path",
            "description": self.description,
            "schema": self.schema,
        }
        if self.where == "query":
            out["allowEmptyValue"] = True  # an empty value counts as not given (as in forms)
        return out


def query(name: str, schema: dict[str, Any], description: str) -> Param:
    return Param(name, "query", schema, description)


def path_param(name: str, description: str) -> Param:
    return Param(name, "path", {"type": "string", "minLength": 1}, description, True)


def header(name: str, schema: dict[str, Any], description: str) -> Param:
    return Param(name, "header", schema, description)


@dataclass(frozen=True)
class Reply:
    """A successful answer: its description, the component schema of its body, the headers
    it always carries (name -> description), and its media type (JSON unless given: a file's
    bytes are ``application/octet-stream``)."""

    description: str
    schema: str
    headers: dict[str, str] = field(default_factory=dict)
    media: str = "application/json"


# Error answers, shared by every operation (components/responses)
ERRORS = {
    400: ("BadRequest", "The body is not JSON, or not a JSON object."),
    401: (
        "Unauthorized",
        "No valid login: send `Authorization: Bearer <token>` (or, for the callbacks of http "
        "tasks, the run's `X-CloudTask-Token`).",
    ),
    403: ("Forbidden", "The user's role is not enough for this operation."),
    404: ("NotFound", "No such task, run, file, user, token or setting."),
    409: (
        "Conflict",
        "The change collides with the stored state: the name is taken, the revision is "
        "stale, or the run is not running (or already reported its result).",
    ),
    413: ("TooLarge", "The body is too large."),
    422: (
        "Invalid",
        "The input is invalid: `details` names each field (`schedule.cron`, `per_page`) and "
        "says what is wrong.",
    ),
    503: (
        "Unavailable",
        "This web process cannot do it now: the store or the cluster failed, or (stored "
        "secrets) it has no key ring (`secrets.keys`).",
    ),
}
ROLE_TEXT = {
    "viewer": "Needs a logged-in user (any role).",
    "operator": "Needs the operator role (or admin).",
    "admin": "Needs the admin role.",
}


@dataclass
class Operation:
    method: str
    rule: str  # the Flask rule, relative to the blueprint: /tasks/<task>
    endpoint: str
    summary: str
    description: str
    role: str | None  # None: the callbacks, authenticated by the run's token
    params: tuple[Param, ...]
    body: dict[str, Any] | None  # media type -> schema
    replies: dict[int, Reply]
    errors: tuple[int, ...]

    @property
    def path(self) -> str:
        """The OpenAPI path: ``/api/v1/tasks/{task}``."""
        return PREFIX + re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", self.rule)

    def error_codes(self) -> list[int]:
        codes = set(self.errors) | {401}
        if self.role in ("operator", "admin"):
            codes.add(403)
        if self.body is not None:
            codes |= {400, 413}
        return sorted(codes)

    def to_openapi(self) -> dict[str, Any]:
        text = self.description
        if self.role:
            text = f"{text}\n\n{ROLE_TEXT[self.role]}".strip()
        out: dict[str, Any] = {
            "operationId": self.endpoint,
            "summary": self.summary,
            "description": text,
            "tags": [self.rule.strip("/").split("/")[0].replace(".json", "")],
        }
        if self.params:
            out["parameters"] = [p.to_openapi() for p in self.params]
        if self.body is not None:
            out["requestBody"] = {
                "required": True,
                "content": {media: {"schema": schema} for media, schema in self.body.items()},
            }
        responses: dict[str, Any] = {}
        for code, reply in sorted(self.replies.items()):
            answer: dict[str, Any] = {
                "description": reply.description,
                "content": {reply.media: {"schema": ref(reply.schema)}},
            }
            if reply.headers:
                answer["headers"] = {
                    name: {"description": text, "required": True, "schema": {"type": "string"}}
                    for name, text in reply.headers.items()
                }
            responses[str(code)] = answer
        for code in self.error_codes():
            responses[str(code)] = {"$ref": f"#/components/responses/{ERRORS[code][0]}"}
        out["responses"] = responses
        if self.role is None:
            out["security"] = [{"runToken": []}]
        else:
            out["x-required-role"] = self.role
        return out


class ApiTable:
    """The API's routes: each added to a blueprint and described for the document at once."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        rule: str,
        *,
        summary: str,
        replies: dict[int, Reply],
        description: str = "",
        params: tuple[Param, ...] = (),
        body: dict[str, Any] | None = None,
        errors: tuple[int, ...] = (),
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``view`` answers ``method rule``. Put it above ``@requires(role)`` (the
        role is read from the view) or on a callback, which has no role."""

        def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
            self.blueprint.add_url_rule(rule, view.__name__, view, methods=[method])
            self.operations.append(
                Operation(
                    method=method,
                    rule=rule,
                    endpoint=view.__name__,
                    summary=summary,
                    description=description,
                    role=getattr(view, "required_role", None),
                    params=params,
                    body=body,
                    replies=replies,
                    errors=errors,
                )
            )
            return view

        return decorate


def document(table: ApiTable) -> dict[str, Any]:
    """The whole OpenAPI document of ``table``'s routes."""
    paths: dict[str, dict[str, Any]] = {}
    for op in table.operations:
        paths.setdefault(op.path, {})[op.method.lower()] = op.to_openapi()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "CloudTask REST API",
            "version": __version__,
            "description": (
                "Manage and watch CloudTask: tasks, runs, agents, the cluster and task files. "
                "JSON only. Log in with an API token (`cloudtask token create NAME`, or the "
                "users page, or `POST /api/v1/users/{username}/tokens`) sent as `Authorization: "
                "Bearer <token>`; a browser session works too (its writes need the "
                "`X-CSRF-Token` header). Viewers read, operators change tasks, runs and "
                "files, admins manage users, tokens and the alert settings. Every error is "
                '`{"error": "...", "details": [{"path": "...", "message": "..."}]}`.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "responses": {
                name: {"description": text, "content": {JSON: {"schema": ref("Error")}}}
                for name, text in ERRORS.values()
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token of a user: `cloudtask token create NAME`.",
                },
                "runToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-CloudTask-Token",
                    "description": "The run's own token, sent to the service of an http task "
                    "in the X-CloudTask-Token header of its call.",
                },
            },
        },
        "security": [{"bearer": []}],
    }
