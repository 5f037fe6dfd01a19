"""Log in and out (flask-login sessions), API tokens, and role checks on every route."""

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
    url_for,
)
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from cloudtask.exceptions import CloudTaskError, NotFound, ValidationError
from cloudtask.users import Users, has_role

from .context import store, throttle

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.session_protection = "strong"


class User(UserMixin):
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.id = doc["_id"]
        self.username = doc["username"]
        self.role = doc["role"]

    @property
    def is_active(self) -> bool:
        return bool(self.doc.get("enabled"))

    def can(self, role: str) -> bool:
        return has_role(self.role, role)

    def get_id(self) -> str:
        # the session names the user and their session epoch: a password change or reset, or
        # disabling the account, moves the epoch on, and every older session ends
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
    return User(doc)


@login_manager.request_loader
def load_user_from_token(req: Any) -> User | None:
    header = req.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or g.get("_user_load_failed"):
        return None
    try:
        doc = users().by_token(header[7:].strip())
    except CloudTaskError:
        g._user_load_failed = True
        raise
    return User(doc) if doc else None


@login_manager.unauthorized_handler
def unauthorized() -> Any:
    if request.path.startswith("/api/"):
        answer = jsonify(
            error="authentication required: log in or send 'Authorization: Bearer <token>'",
            details=[],
        )
        answer.headers["WWW-Authenticate"] = 'Bearer realm="cloudtask"'
        return answer, 401
    return redirect(
        url_for("auth.login", next=request.full_path if request.query_string else request.path)
    )


def requires(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Route decorator: logged in, and at least ``role`` (viewer < operator < admin)."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                return login_manager.unauthorized()
            if not current_user.can(role):
                if request.path.startswith("/api/"):
                    return jsonify(error=f"this needs the {role} role", details=[]), 403
                abort(403)
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


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        address = request.remote_addr or "?"
        guard = throttle()
        if guard.blocked(username, address):
            flash("Too many failed attempts. Wait a few minutes and try again.", "error")
            return render_template("login.html", username=username), 429
        doc = users().authenticate(username, password)
        if doc is None:
            guard.failed(username, address)
            flash("Wrong user name or password.", "error")
            return render_template("login.html", username=username), 401
        guard.succeeded(username, address)
        login_user(User(doc))
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", username="")


@bp.post("/logout")
@requires("viewer")
def logout() -> Any:
    logout_user()
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@requires("viewer")
def change_password() -> Any:
    if request.method == "POST":
        name = current_user.username
        address = request.remote_addr or "?"
        guard = throttle()
        key = f"password-change:{name}"  # guesses of the current password are throttled too
        if guard.blocked(key, address):
            flash("Too many wrong passwords. Wait a few minutes and try again.", "error")
            return render_template("password.html"), 429
        if users().authenticate(name, request.form.get("current", "")) is None:
            guard.failed(key, address)
            flash("The current password is wrong.", "error")
            return render_template("password.html"), 400
        guard.succeeded(key, address)
        try:
            doc = users().set_password(name, request.form.get("new", ""))
        except ValidationError as e:  # say what is wrong
            flash("; ".join(p.message for p in e.problems) or str(e), "error")
            return render_template("password.html"), 400
        # the change ended every session of this user; this one goes on with the new epoch
        login_user(User(doc))
        store().add_audit(name, "user.password", f"user:{name}", None, {"password_changed": True})
        flash("Password changed. Your other sessions have ended.", "ok")
        return redirect(url_for("dashboard.index"))
    return render_template("password.html")
