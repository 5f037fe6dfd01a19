"""Users (admin only) and the audit log (anyone logged in).

Users: the list with an add form; one user's page to change the role, enable or disable the
account, set a new password, delete it, and create or revoke API tokens (which may expire
after a number of days, and may be read-only). A new token is shown once, on the page that
answers its creation, and never again (only its hash is stored). Every change is a POST
carrying the CSRF token, needs the admin role, and writes an audit entry (target
``user:<name>``) whose before/after never hold a password or a hash. A role change, a new
password, disabling or deleting end the user's sessions at once. The guard rails (nobody
disables, demotes or deletes their own account, the last enabled admin stays) are in
:class:`cloudtask.users.Users`; this module shows their refusal next to the field.

Audit log: newest first, filtered by actor, action prefix (``task.``), target (``task:nightly``,
or a task name typed plainly) and time (since/until, to the second), in bounded pages. Each
entry shows its changes compactly: the keys whose values differ, old → new, with credentials
and webhook URLs masked (:mod:`cloudtask.operations.audit`: entries are masked as they are
written, and again as they are shown, for entries written before).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from werkzeug.routing import BuildError

from cloudtask.exceptions import Conflict, NotFound, Problem, ValidationError
from cloudtask.operations.audit import mask_pair
from cloudtask.store import Page
from cloudtask.users import ROLES, TOKEN_SCOPES, Users, public, token_name_problem

from .auth import requires
from .context import actor, ops, store
from .queries import int_arg, text_arg, time_arg

bp = Blueprint("admin", __name__)

AUDIT_PER_PAGE = 50
# where a user comes from (cloudtask.users.source_of), as the users pages name it
SOURCE_LABELS = {"local": "local", "ldap": "LDAP", "oidc": "OpenID Connect"}
AUDIT_MAX_PER_PAGE = 200
VALUE_CHARS = 240  # a changed value longer than this is cut in the audit list
DIFF_DEPTH = 2  # nested objects are compared key by key this deep (schedule.cron)
KNOWN_ACTIONS = (
    "task.",
    "task.create",
    "task.update",
    "task.pause",
    "task.resume",
    "task.clone",
    "task.delete",
    "task.run",
    "run.",
    "run.kill",
    "file.",
    "file.upload",
    "file.upload.unchanged",
    "file.upload.refused",
    "file.rollback",
    "user.",
    "user.create",
    "user.role",
    "user.enable",
    "user.disable",
    "user.password",
    "user.delete",
    "token.",
    "token.create",
    "token.revoke",
    "auth.",
    "auth.login",
    "auth.login_failed",
    "auth.lockout",
    "auth.logout",
    "settings.",
    "settings.alerts",
    "settings.test_mail",
)


def _users() -> Users:
    return Users(store())


def _get_user(username: str) -> dict[str, Any]:
    try:
        return _users().get(username)
    except NotFound:
        abort(404, description=f"no user named {username!r}")


# --- users: list and add ----------------------------------------------------------------------


def _render_users(form: dict[str, str], errors: dict[str, str], status: int = 200) -> Any:
    return render_template(
        "admin/users.html",
        users=_users().list(),
        form=form,
        errors=errors,
        roles=ROLES,
        source_labels=SOURCE_LABELS,
    ), status


@bp.get("/users")
@requires("admin")
def users() -> Any:
    return _render_users({"username": "", "role": "viewer"}, {})


@bp.post("/users")
@requires("admin")
def user_add() -> Any:
    form = {
        "username": request.form.get("username", "").strip(),
        "role": request.form.get("role", "viewer"),
    }
    password = request.form.get("password", "")
    problems = Users.problems(form["username"], password, form["role"])
    if password != request.form.get("password2", ""):
        problems.append(Problem("password2", "the two passwords differ: type the same twice"))
    if problems:
        return _render_users(form, {p.path: p.message for p in problems}, 422)
    try:
        ops().add_user(actor(), form["username"], password, form["role"])
    except Conflict as e:
        return _render_users(form, {p.path: p.message for p in e.problems}, 409)
    flash(f"User {form['username']} added ({form['role']}).", "ok")
    return redirect(url_for("admin.user_detail", username=form["username"]))


# --- users: one user --------------------------------------------------------------------------


def _render_user(
    username: str,
    errors: dict[str, str] | None = None,
    status: int = 200,
    new_token: dict[str, str] | None = None,
    token_name: str = "",
) -> Any:
    """One user's page; ``new_token`` (id, name, token) is shown once, on this answer only."""
    doc = _get_user(username)
    tokens = _users().list_tokens(username)  # also gives tokens made before ids their id
    page = render_template(
        "admin/user.html",
        user=public(doc),
        tokens=tokens,
        is_self=username == current_user.username,
        last_admin=_is_last_admin(doc),
        errors=errors or {},
        roles=ROLES,
        source_labels=SOURCE_LABELS,
        scopes=TOKEN_SCOPES,
        new_token=new_token,
        token_name=token_name,
    )
    # a page holding a new token is never cached (nor kept for the back button)
    headers = {"Cache-Control": "no-store"} if new_token else {}
    return page, status, headers


def _is_last_admin(doc: dict[str, Any]) -> bool:
    return (
        doc.get("role") == "admin"
        and bool(doc.get("enabled"))
        and _users().enabled_admins() == [doc["_id"]]
    )


@bp.get("/users/<username>")
@requires("admin")
def user_detail(username: str) -> Any:
    return _render_user(username)


@bp.post("/users/<username>/role")
@requires("admin")
def user_role(username: str) -> Any:
    _get_user(username)
    role = request.form.get("role", "")
    try:
        old = ops().set_role(actor(), username, role, by=current_user.username)
    except ValidationError as e:
        return _render_user(username, {"role": "; ".join(p.message for p in e.problems)}, 422)
    except Conflict as e:
        return _render_user(username, {"role": str(e)}, 409)
    if old != role:
        flash(f"{username} is now {role}.", "ok")
    return redirect(url_for("admin.user_detail", username=username))


def _set_enabled(username: str, enabled: bool) -> Any:
    _get_user(username)
    try:
        old = ops().set_user_enabled(actor(), username, enabled, by=current_user.username)
    except Conflict as e:
        return _render_user(username, {"enabled": str(e)}, 409)
    if old != enabled:
        note = "" if enabled else ": their sessions and API tokens stop working"
        flash(f"{username} {'enabled' if enabled else 'disabled'}{note}.", "ok")
    return redirect(url_for("admin.user_detail", username=username))


@bp.post("/users/<username>/disable")
@requires("admin")
def user_disable(username: str) -> Any:
    return _set_enabled(username, False)


@bp.post("/users/<username>/enable")
@requires("admin")
def user_enable(username: str) -> Any:
    return _set_enabled(username, True)


@bp.post("/users/<username>/password")
@requires("admin")
def user_password(username: str) -> Any:
    _get_user(username)
    password = request.form.get("password", "")
    errors = {p.path: p.message for p in Users.problems(username, password, None)}
    if password != request.form.get("password2", ""):
        errors["password2"] = "the two passwords differ: type the same twice"
    if errors:
        return _render_user(username, errors, 422)
    ops().set_password(actor(), username, password)
    flash(f"New password set for {username}.", "ok")
    return redirect(url_for("admin.user_detail", username=username))


@bp.post("/users/<username>/delete")
@requires("admin")
def user_delete(username: str) -> Any:
    _get_user(username)
    if request.form.get("confirm", "") != username:
        message = f"type the user's name ({username}) to confirm"
        return _render_user(username, {"delete": message}, 422)
    try:
        ops().delete_user(actor(), username, by=current_user.username)
    except Conflict as e:
        return _render_user(username, {"delete": str(e)}, 409)
    flash(f"User {username} deleted: their sessions and API tokens stopped working.", "ok")
    return redirect(url_for("admin.users"))


@bp.post("/users/<username>/tokens")
@requires("admin")
def user_token_create(username: str) -> Any:
    _get_user(username)
    name = request.form.get("name", "").strip()
    days = request.form.get("expires_in", "").strip()
    scope = request.form.get("scope", "all")
    if problem := token_name_problem(name):
        return _render_user(username, {"token_name": problem}, 422, token_name=name)
    try:
        token_id, token = ops().add_token(
            actor(), username, name, expires_in_days=days or None, scope=scope
        )
    except ValidationError as e:
        fields = {"name": "token_name", "expires_in": "token_expires", "scope": "token_scope"}
        errors = {fields.get(p.path, "token_name"): p.message for p in e.problems}
        return _render_user(username, errors, 422, token_name=name)
    # answered here, not after a redirect: the token must not travel in the session cookie
    new = {"id": token_id, "name": name, "token": token, "scope": scope}
    return _render_user(username, new_token=new)


@bp.post("/users/<username>/tokens/<token_id>/revoke")
@requires("admin")
def user_token_revoke(username: str, token_id: str) -> Any:
    _get_user(username)
    try:
        gone = ops().revoke_token(actor(), username, token_id)
    except NotFound as e:
        return _render_user(username, {"tokens": f"{e}: it was revoked already"}, 404)
    flash(f"Token {gone['name']} ({token_id}) of {username} revoked: it stops working now.", "ok")
    return redirect(url_for("admin.user_detail", username=username))


# --- audit log: filters and query -------------------------------------------------------------


def audit_filters(args: Any) -> dict[str, Any]:
    """Checked audit filters: actor, action (a prefix), target, since, until, page, per_page.

    A target without a kind (``nightly-cleanup``) means a task (``task:nightly-cleanup``):
    task names hold no ``:``. Times are taken to the whole second (see :func:`list_audit`)."""
    problems: list[Problem] = []
    filters: dict[str, Any] = {
        "actor": text_arg(args, "actor", problems),
        "action": text_arg(args, "action", problems),
        "target": text_arg(args, "target", problems),
        "since": time_arg(args, "since", problems),
        "until": time_arg(args, "until", problems),
        "page": int_arg(args, "page", 1, 1, 100_000, problems),
        "per_page": int_arg(args, "per_page", AUDIT_PER_PAGE, 1, AUDIT_MAX_PER_PAGE, problems),
    }
    for name in ("since", "until"):
        if filters[name] is not None:
            filters[name] = filters[name].replace(microsecond=0)
    if filters["target"] and ":" not in filters["target"]:
        filters["target"] = f"task:{filters['target']}"
    since, until = filters["since"], filters["until"]
    if since and until and since >= until:
        problems.append(Problem("until", "must be after since"))
    if problems:
        raise ValidationError(problems, source="the filters")
    return filters


def list_audit(filters: dict[str, Any]) -> Page:
    """One page of entries, newest first (see :meth:`Store.audit_page`)."""
    return store().audit_page(filters, AUDIT_PER_PAGE)


_MISSING = object()


def _show(value: Any) -> str:
    """A value as the audit list shows it: text as it is, anything else as compact JSON."""
    if value is _MISSING:
        return "–"
    if isinstance(value, str):
        text = value
    elif isinstance(value, datetime):
        text = value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    else:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


def audit_changes(before: Any, after: Any) -> list[tuple[str, str, str]]:
    """(key, old, new) for what differs between an entry's before and after (None when there
    was nothing, as before a create): the keys of objects, dotted into nested objects
    (``schedule.cron``) down to DIFF_DEPTH levels, deeper values and lists as JSON. Values
    that are not objects are one change with the key ''."""
    before, after = mask_pair(before, after)  # entries written before they were masked too
    objects = isinstance(before, (dict, type(None))) and isinstance(after, (dict, type(None)))
    if not objects or before is after is None:
        return [] if before == after else [("", _show(before), _show(after))]
    changes: list[tuple[str, str, str]] = []
    _diff_objects(before or {}, after or {}, "", 1, changes)
    return changes


def _diff_objects(
    old: dict[str, Any], new: dict[str, Any], prefix: str, depth: int, changes: list
) -> None:
    for key in list(old) + [k for k in new if k not in old]:
        path = f"{prefix}.{key}" if prefix else str(key)
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and depth < DIFF_DEPTH:
            _diff_objects(a, b, path, depth + 1, changes)
        else:
            changes.append((path, _show(a), _show(b)))


def _link(endpoint: str, **values: Any) -> str | None:
    try:
        return url_for(endpoint, **values)
    except BuildError:  # that area of the site is missing: show the target as text
        return None


def target_links(items: list[dict[str, Any]]) -> dict[str, str]:
    """target -> URL for the page's entries: tasks that still exist (found by name in one
    query for the whole page), users (for admins), runs and files."""
    targets = {str(item.get("target") or "") for item in items}
    names = sorted(t[5:] for t in targets if t.startswith("task:"))
    task_ids = store().task_ids_by_name(names) if names else {}
    links: dict[str, str] = {}
    for target in targets:
        kind, _, name = target.partition(":")
        url = None
        if kind == "task" and name in task_ids:
            url = _link("tasks.detail", task_id=task_ids[name])
        elif kind == "user" and current_user.can("admin"):
            url = _link("admin.user_detail", username=name)
        elif kind == "run" and name:
            url = _link("runs.detail", run_id=name)
        elif kind == "file" and name:
            url = _link("files.detail", name=name)
        if url:
            links[target] = url
    return links


@bp.get("/audit")
@requires("viewer")
def audit() -> Any:
    errors: dict[str, str] = {}
    try:
        filters = audit_filters(request.args)
    except ValidationError as e:
        errors = {p.path: p.message for p in e.problems}
        kept = {k: v for k, v in request.args.items() if k not in errors}
        if "until" in errors:
            kept.pop("since", None)  # since/until disagree: list without either
        filters = audit_filters(kept)
    page = list_audit(filters)
    for item in page.items:
        item["changes"] = audit_changes(item.get("before"), item.get("after"))
    return render_template(
        "admin/audit.html",
        page=page,
        args=request.args,
        filters=filters,
        errors=errors,
        links=target_links(page.items),
        actions=KNOWN_ACTIONS,
    ), (422 if errors else 200)
