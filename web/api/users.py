"""The API's users and their API tokens (admin only, like the users pages).

A user is answered without a password or any hash: name, role, enabled, ``source`` (who checks
the password: ``local``, ``ldap`` or ``oidc``) and their tokens (never a token's secret). A new
token's secret is in the answer of its creation (201, ``Cache-Control: no-store``) and nowhere
else: only its sha256 is stored. Every change goes through the audited operations, with the
guard rails of :class:`cloudtask.users.Users`: nobody disables, demotes or deletes their own
account, and the last enabled admin stays (409 saying so).
"""

from __future__ import annotations

from typing import Any

from flask import jsonify, url_for
from flask_login import current_user

from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError
from cloudtask.users import MAX_TOKEN_DAYS, Users, public, token_name_problem

from ..auth import requires
from ..context import actor, jsonable, ops, store
from ..openapi import JSON, Reply, path_param, ref
from .hardening import ApiError, json_body, unknown_keys
from .table import api

USER_PARAM = path_param("username", "The user's name")
TOKEN_PARAM = path_param("token_id", "The token's id (from the user's token list)")
USER_REPLY = Reply("The user", "User")
USER_KEYS = ("username", "password", "role")
CHANGE_KEYS = ("role", "enabled", "password")
TOKEN_KEYS = ("name", "expires_in_days", "read_only")


def _users() -> Users:
    return Users(store())


def _user_or_404(username: str) -> dict[str, Any]:
    try:
        return _users().get(username)
    except NotFound:
        raise ApiError(404, f"no user named {username!r}") from None


def user_json(username: str) -> dict[str, Any]:
    """A user as the API shows it: no password, no hash; tokens without their secret."""
    shown = public(_user_or_404(username))
    shown["tokens"] = _users().list_tokens(username)  # gives old tokens their id
    return jsonable(shown)


def _text(body: dict[str, Any], key: str, problems: list[Problem], required: bool) -> Any:
    if key not in body:
        if required:
            problems.append(Problem(key, "required"))
        return None
    value = body[key]
    if not isinstance(value, str):
        problems.append(Problem(key, "expected a string"))
        return None
    return value


def _invalid(what: str, problems: list[Problem]) -> ApiError:
    return ApiError(422, f"the {what} is invalid", problems)


# --- users ------------------------------------------------------------------------------------


@api.route(
    "GET",
    "/users",
    summary="List users",
    description="Every user by name, with their role, whether enabled, where their password "
    "is checked (`source`: local, ldap or oidc) and their API tokens (never a secret).",
    replies={200: Reply("The users", "UserList")},
)
@requires("admin")
def list_users() -> Any:
    return jsonify(items=jsonable(_users().list()))


@api.route(
    "POST",
    "/users",
    summary="Add a user",
    description='`{"username", "password", "role"}`: a local user (the password at least 10 '
    "characters; the role viewer when not given). The password is never answered back.",
    body={JSON: ref("UserCreate")},
    replies={201: Reply("The user, added", "User", {"Location": "The user's URL"})},
    errors=(409, 422),
)
@requires("admin")
def create_user() -> Any:
    body = json_body()
    problems: list[Problem] = []
    unknown_keys(body, USER_KEYS, problems)
    username = _text(body, "username", problems, True)
    password = _text(body, "password", problems, True)
    role = _text(body, "role", problems, False) or "viewer"
    problems += [  # a name missing or not a string is said above already
        p
        for p in Users.problems(username or "", password, role)
        if p.path != "username" or username is not None
    ]
    if problems:
        raise _invalid("user", problems)
    try:
        ops().add_user(actor(), username, password, role)
    except ValidationError as e:
        raise _invalid("user", e.problems) from None
    except Conflict as e:  # the name is taken: 409 at username
        raise ApiError(409, str(e), e.problems) from None
    answer = jsonify(user_json(username))
    answer.headers["Location"] = url_for("api.get_user", username=username)
    return answer, 201


@api.route(
    "GET",
    "/users/<username>",
    summary="One user",
    params=(USER_PARAM,),
    replies={200: USER_REPLY},
    errors=(404,),
)
@requires("admin")
def get_user(username: str) -> Any:
    return jsonify(user_json(username))


@api.route(
    "PATCH",
    "/users/<username>",
    summary="Change a user: role, enabled, password",
    description='Any of `{"role": "operator", "enabled": false, "password": "..."}`. A new '
    "role, disabling or a new password end the user's sessions; a disabled user's API tokens "
    "stop working. Nobody demotes or disables their own account, and the last enabled admin "
    "stays (409). A password can only be set for a local user (422 for ldap and oidc users).",
    params=(USER_PARAM,),
    body={JSON: ref("UserChange")},
    replies={200: USER_REPLY},
    errors=(404, 409, 422),
)
@requires("admin")
def change_user(username: str) -> Any:
    doc = _user_or_404(username)
    body = json_body()
    problems: list[Problem] = []
    unknown_keys(body, CHANGE_KEYS, problems)
    role = _text(body, "role", problems, False)
    password = _text(body, "password", problems, False)
    enabled = body.get("enabled")
    if "enabled" in body and not isinstance(enabled, bool):
        problems.append(Problem("enabled", "expected true or false"))
    problems += [p for p in Users.problems(username, password, role) if p.path != "username"]
    if not problems and password is not None and public(doc)["source"] != "local":
        problems.append(
            Problem(
                "password",
                f"{username!r} logs in through {public(doc)['source']}: their password is kept "
                "there; change it there",
            )
        )
    if problems:
        raise _invalid("change", problems)
    by = current_user.username
    try:  # each step is checked above; a guard rail refusing one is a Conflict (409)
        if role is not None:
            ops().set_role(actor(), username, role, by=by)
        if enabled is not None:
            ops().set_user_enabled(actor(), username, enabled, by=by)
        if password is not None:
            ops().set_password(actor(), username, password)
    except ValidationError as e:
        raise _invalid("change", e.problems) from None
    return jsonify(user_json(username))


@api.route(
    "DELETE",
    "/users/<username>",
    summary="Delete a user",
    description="With their API tokens and sessions, which stop working at once. Nobody "
    "deletes their own account, and the last enabled admin stays (409).",
    params=(USER_PARAM,),
    replies={200: Reply("The deleted user", "UserDeleted")},
    errors=(404, 409),
)
@requires("admin")
def delete_user(username: str) -> Any:
    _user_or_404(username)
    doc = ops().delete_user(actor(), username, by=current_user.username)
    return jsonify(deleted=jsonable(public(doc)))


# --- tokens -----------------------------------------------------------------------------------


@api.route(
    "GET",
    "/users/<username>/tokens",
    summary="A user's API tokens",
    description="Oldest first: id, name, scope (`read`: GET and HEAD only), created, last "
    "used, expiry. Never the token itself.",
    params=(USER_PARAM,),
    replies={200: Reply("The tokens", "TokenList")},
    errors=(404,),
)
@requires("admin")
def list_tokens(username: str) -> Any:
    _user_or_404(username)
    return jsonify(items=jsonable(_users().list_tokens(username)))


@api.route(
    "POST",
    "/users/<username>/tokens",
    summary="Create an API token",
    description='`{"name": "ci", "expires_in_days": 90, "read_only": true}`: the answer holds '
    "the token (`token`), shown this once: only its hash is stored. Send it as "
    "`Authorization: Bearer <token>`.",
    params=(USER_PARAM,),
    body={JSON: ref("TokenCreate")},
    replies={201: Reply("The new token, with its secret (shown once)", "NewToken")},
    errors=(404, 422),
)
@requires("admin")
def create_token(username: str) -> Any:
    _user_or_404(username)
    return _new_token(username, url_for("api.list_tokens", username=username))


def _new_token(username: str, listed_at: str) -> Any:
    """Create a token for ``username`` from the request's body (checked first); the 201."""
    body = json_body()
    problems: list[Problem] = []
    unknown_keys(body, TOKEN_KEYS, problems)
    name = _text(body, "name", problems, True)
    if name is not None and (problem := token_name_problem(name)):
        problems.append(Problem("name", problem))
    days = body.get("expires_in_days")
    if "expires_in_days" in body and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_TOKEN_DAYS
    ):
        problems.append(
            Problem("expires_in_days", f"a whole number of days from 1 to {MAX_TOKEN_DAYS}")
        )
    read_only = body.get("read_only", False)
    if not isinstance(read_only, bool):
        problems.append(Problem("read_only", "expected true or false"))
    if problems:
        raise _invalid("token", problems)
    scope = "read" if read_only else "all"
    try:
        token_id, token = ops().add_token(
            actor(), username, name, expires_in_days=days, scope=scope
        )
    except ValidationError as e:
        paths = {"expires_in": "expires_in_days"}
        raise _invalid(
            "token", [Problem(paths.get(p.path, p.path), p.message) for p in e.problems]
        ) from None
    shown = next(t for t in _users().list_tokens(username) if t["id"] == token_id)
    answer = jsonify({**jsonable(shown), "token": token, "username": username})
    answer.headers["Cache-Control"] = "no-store"
    answer.headers["Location"] = listed_at
    return answer, 201


@api.route(
    "DELETE",
    "/users/<username>/tokens/<token_id>",
    summary="Revoke an API token",
    description="It stops working at once.",
    params=(USER_PARAM, TOKEN_PARAM),
    replies={200: Reply("The revoked token", "TokenRevoked")},
    errors=(404,),
)
@requires("admin")
def revoke_token(username: str, token_id: str) -> Any:
    _user_or_404(username)
    gone = ops().revoke_token(actor(), username, token_id)  # NotFound: 404
    return jsonify(revoked=jsonable(gone), username=username)


# --- one's own tokens -------------------------------------------------------------------------


def _self_service() -> str:
    """The logged-in user, who manages their own tokens here whatever their role; only a
    password login (a session) makes one, so a token never makes a longer-lived token."""
    if getattr(current_user, "token", None) is not None:
        raise ApiError(
            403,
            "an API token cannot make API tokens: log in with your password "
            "(`cloudtask login`), or ask an admin",
        )
    return current_user.username


@api.route(
    "GET",
    "/me/tokens",
    summary="My API tokens",
    description="The logged-in user's own tokens, oldest first. Never the token itself.",
    replies={200: Reply("The tokens", "TokenList")},
)
@requires("viewer")
def my_tokens() -> Any:
    return jsonify(items=jsonable(_users().list_tokens(current_user.username)))


@api.route(
    "POST",
    "/me/tokens",
    summary="Create an API token for myself",
    description="Any role may, for their own account, from a password login (a session; "
    "not with a token: 403). The token acts with the user's role; `read_only` limits it "
    'to GET and HEAD. `{"name": "cli on laptop", "expires_in_days": 90}`: the secret is '
    "in this answer only.",
    body={JSON: ref("TokenCreate")},
    replies={201: Reply("The new token, with its secret (shown once)", "NewToken")},
    errors=(403, 422),
)
@requires("viewer")
def create_my_token() -> Any:
    return _new_token(_self_service(), url_for("api.my_tokens"))


@api.route(
    "DELETE",
    "/me/tokens/<token_id>",
    summary="Revoke one of my API tokens",
    description="It stops working at once; the token this request came with may revoke itself.",
    params=(TOKEN_PARAM,),
    replies={200: Reply("The revoked token", "TokenRevoked")},
    errors=(404,),
)
@requires("viewer")
def revoke_my_token(token_id: str) -> Any:
    username = current_user.username
    gone = ops().revoke_token(actor(), username, token_id)  # NotFound: 404
    return jsonify(revoked=jsonable(gone), username=username)
