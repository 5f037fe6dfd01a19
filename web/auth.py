"""Log in and out (flask-login over sessions kept on the server), API tokens, and role checks
on every route.

A browser logs in with the form: the throttle (:class:`web.security.LoginThrottle`) is asked
first, the password is always checked against a hash (a dummy one for an unknown name, so an
unknown user, a disabled one and a wrong password take the same time), and a success starts
a new session under a new id with a new CSRF token (:func:`web.sessions.renew_session`).
Logins, failed logins, lockouts and logouts are audited.

Directory (LDAP) and OpenID Connect users (:mod:`web.sso`): a name that is no local account
(or a directory user's) is checked against the directory after the local check fails; a
directory user in no mapped group is refused with a message saying so, and a directory that
cannot be reached is a clear error. Every request of a directory user (a session or an API
token) goes through :func:`web.sso.recheck`, which asks the directory again at most every
``auth.ldap.recheck_interval``.

A program sends ``Authorization: Bearer <token>``. :func:`authenticate_token` runs before
anything else of a request: a valid token makes the request its user's (whatever cookie it
carries) and exempts it from the CSRF check; an expired one is refused with 401 saying so; a
read-only token (scope ``read``) may only GET and HEAD (403 otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from cloudtask.exceptions import CloudTaskError, NotFound, ValidationError
from cloudtask.users import Users, has_role, source_of, token_scope

from . import sso
from .context import ops, store, throttle
from .security import client_address
from .sessions import end_session, renew_session

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.session_protection = "strong"
READ_METHODS = ("GET", "HEAD", "OPTIONS")


class User(UserMixin):
    def __init__(self, doc: dict[str, Any], token: dict[str, Any] | None = None) -> None:
        self.doc = doc
        self.id = doc["_id"]
        self.username = doc["username"]
        self.role = doc["role"]
        self.token = token  # the API token this request came with, None for a session

    @property
    def is_active(self) -> bool:
        return bool(self.doc.get("enabled"))

    @property
    def read_only(self) -> bool:
        """A read-only API token: GET and HEAD only, whatever the role."""
        return self.token is not None and token_scope(self.token) == "read"

    def can(self, role: str) -> bool:
        return has_role(self.role, role)

    def get_id(self) -> str:
        # the session names the user and their session epoch: a password change or reset, a
        # role change, or disabling the account, moves the epoch on, and every older session
        # ends (they are also deleted from the store: see cloudtask.users)
        return f"{self.id}|{int(self.doc.get('session_epoch') or 0)}"


def users() -> Users:
    return Users(store())


@login_manager.user_loader
def load_user(session_id: str) -> User | None:
    """The session's user, if the account is enabled and the session's epoch is current. If
    MongoDB cannot be reached the request fails with 503 (once: the error page then renders
    for an anonymous user), rather than looking logged out."""
    if g.get("_user_load_failed"):
        return None
    username, _, epoch = session_id.rpartition("|")
    if not username:
        username, epoch = session_id, "0"
    try:
        doc = users().get(username)
    except NotFound:
        return None
    except CloudTaskError:
        g._user_load_failed = True
        raise
    if not doc.get("enabled") or str(int(doc.get("session_epoch") or 0)) != epoch:
        return None
    checked = sso.recheck(doc)  # a directory user: still vouched for?
    if checked is None or str(int(checked.get("session_epoch") or 0)) != epoch:
        return None
    return User(checked)


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() != "bearer ":
        return None
    return header[7:].strip()


def authenticate_token() -> None:
    """Before every request: a valid API token makes the request its user's (``g.token_user``,
    and flask-login's current user), whatever cookie it carries; an invalid or expired one
    leaves a message for the 401 (``g.token_refused``) and authenticates nothing."""
    token = _bearer()
    if token is None or request.endpoint == "static":
        return
    try:
        doc, entry, refused = users().token_user(token)
    except CloudTaskError:
        g._user_load_failed = True
        if request.endpoint == "healthz":
            return  # it says "unavailable" to whoever asks; who it is cannot be told
        raise
    if doc is not None:
        doc = sso.recheck(doc)  # a directory user: still vouched for?
        if doc is None:
            refused = "the API token's user no longer has access (the directory refused them)"
    if doc is None:
        g.token_refused = refused
        return
    user = User(doc, token=entry)
    g.token_user = user
    login_manager._update_request_context_with_user(user)


@login_manager.request_loader
def load_user_from_token(req: Any) -> User | None:
    """Only a token :func:`authenticate_token` accepted (it runs first, for every request)."""
    return g.get("token_user")


@login_manager.unauthorized_handler
def unauthorized() -> Any:
    if request.path.startswith("/api/") or _bearer() is not None:
        message = g.get("token_refused") or (
            "authentication required: log in or send 'Authorization: Bearer <token>'"
        )
        answer = jsonify(error=message, details=[])
        answer.headers["WWW-Authenticate"] = 'Bearer realm="cloudtask"'
        return answer, 401
    return redirect(
        url_for("auth.login", next=request.full_path if request.query_string else request.path)
    )


def role_needed(role: str) -> str:
    """What a 403 says: the role this needs, the one the user has, and who can change it."""
    return (
        f"this needs the {role} role; {current_user.username} has the {current_user.role} "
        "role. An admin can change it on the Users page."
    )


def requires(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Route decorator: logged in, and at least ``role`` (viewer < operator < admin); a
    read-only API token only for GET and HEAD."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                return login_manager.unauthorized()
            if getattr(current_user, "read_only", False) and request.method not in READ_METHODS:
                message = (
                    "this API token is read-only (scope read): it may only GET and HEAD; "
                    "ask an admin for a token with scope all"
                )
                return jsonify(error=message, details=[]), 403
            if not current_user.can(role):
                needed = role_needed(role)
                if request.path.startswith("/api/"):
                    return jsonify(error=needed, details=[]), 403
                abort(403, description=needed)
            return view(*args, **kwargs)

        wrapped.required_role = role  # type: ignore[attr-defined]
        return wrapped

    return decorate


def safe_path(target: str | None) -> str | None:
    """``target`` if it is a path on this site, else None: never an absolute URL an attacker
    chose (``//host``, ``/\\host``, or one hidden behind tabs and newlines, which browsers
    drop), nor anything that cannot go in a Location header."""
    if not target or any(c in target for c in "\\\r\n\t\x00") or not target.isprintable():
        return None
    if not target.startswith("/") or target.startswith("//"):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _safe_next(target: str | None) -> str:
    return safe_path(target) or url_for("dashboard.index")


MAX_NAME = 256  # a longer name is no user's: it is refused like a wrong one


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        username = request.form.get("username", "").strip()[:MAX_NAME]
        password = request.form.get("password", "")
        address = client_address()
        guard = throttle()
        refusal = guard.check(username, address)
        if refusal is not None:
            flash(refusal.message, "error")
            page = render_template("login.html", username=username)
            return page, 429, {"Retry-After": str(max(1, int(refusal.retry_after)))}
        doc = users().authenticate(username, password)
        via = None
        if doc is None:  # not a local account's password: the directory's user?
            answer = sso.directory_login(username, password)
            if isinstance(answer, sso.Refused) and answer.status != 401:
                flash(answer.message, "error")
                return render_template("login.html", username=username), answer.status
            if isinstance(answer, dict):
                doc, via = answer, "ldap"
        if doc is None:
            lockout = guard.failed(username, address)
            ops().note_login_failure(username, address)
            if lockout is not None:
                ops().note_lockout(username, address, lockout.reason, lockout.retry_after)
            flash("Wrong user name or password.", "error")
            return render_template("login.html", username=username), 401
        guard.succeeded(username, address)
        # a new session: nothing the browser held before the login is kept (no fixation)
        session.clear()
        login_user(User(doc))
        renew_session()
        if via is None:
            ops().note_login(doc["username"], address)
        else:
            after = {"address": address, "via": via}
            ops().audit(doc["username"], "auth.login", f"user:{doc['username']}", None, after)
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", username="")


@bp.get("/login/oidc")
def oidc_start() -> Any:
    """The "Log in with <provider>" button: off to the provider (see :mod:`web.sso`)."""
    return sso.oidc_begin(safe_path(request.args.get("next")) or "")


@bp.get(sso.CALLBACK_PATH)
def oidc_callback() -> Any:
    """The provider's way back: the user is logged in if :func:`web.sso.oidc_complete` says
    the provider vouched for them with a role; else its page (400, 401, 403, 503)."""
    outcome = sso.oidc_complete()
    if not isinstance(outcome, sso.SignedIn):
        return outcome
    doc = outcome.doc
    session.clear()  # a new session: nothing the browser held before the login is kept
    login_user(User(doc))
    renew_session()
    after = {"address": client_address(), "via": "oidc"}
    ops().audit(doc["username"], "auth.login", f"user:{doc['username']}", None, after)
    return redirect(_safe_next(outcome.next))


@bp.post("/logout")
@requires("viewer")
def logout() -> Any:
    name = current_user.username
    logout_user()
    end_session()
    ops().note_logout(name, client_address())
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@requires("viewer")
def change_password() -> Any:
    if source_of(current_user.doc) != "local":
        where = (
            "the directory (LDAP)" if source_of(current_user.doc) == "ldap" else "single sign-on"
        )
        page = render_template("sso_password.html", where=where)
        return page, 400 if request.method == "POST" else 200
    if request.method == "POST":
        name = current_user.username
        address = client_address()
        guard = throttle()
        key = f"password-change:{name}"  # guesses of the current password are throttled too
        refusal = guard.check(key, address)
        if refusal is not None:
            flash("Too many wrong passwords. Wait a few minutes and try again.", "error")
            return render_template("password.html"), 429
        if users().authenticate(name, request.form.get("current", "")) is None:
            lockout = guard.failed(key, address)
            ops().note_login_failure(name, address, "password change", actor=name)
            if lockout is not None:
                ops().note_lockout(name, address, lockout.reason, lockout.retry_after, name)
            flash("The current password is wrong.", "error")
            return render_template("password.html"), 400
        guard.succeeded(key, address)
        try:
            doc = ops().set_password(name, name, request.form.get("new", ""))
        except ValidationError as e:  # say what is wrong
            flash("; ".join(p.message for p in e.problems) or str(e), "error")
            return render_template("password.html"), 400
        # the change ended every session of this user; this one goes on, under a new id
        login_user(User(doc))
        renew_session(keep_created=True)
        flash("Password changed. Your other sessions have ended.", "ok")
        return redirect(url_for("dashboard.index"))
    return render_template("password.html")
