"""Log in and out (flask-login sessions), API tokens, and role checks on every route."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from cloudtask.users import Users, has_role

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


def users() -> Users:
    return Users(current_app.extensions["cloudtask_store"]())


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    try:
        doc = users().get(user_id)
    except Exception:
        return None
    return User(doc) if doc.get("enabled") else None


@login_manager.request_loader
def load_user_from_token(req: Any) -> User | None:
    header = req.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    doc = users().by_token(header[7:].strip())
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


def _safe_next(target: str | None) -> str:
    # only paths on this site: never an absolute URL an attacker chose
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("dashboard.index")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        address = request.remote_addr or "?"
        throttle = current_app.extensions["cloudtask_throttle"]
        if throttle.blocked(username, address):
            flash("Too many failed attempts. Wait a few minutes and try again.", "error")
            return render_template("login.html", username=username), 429
        doc = users().authenticate(username, password)
        if doc is None:
            throttle.failed(username, address)
            flash("Wrong user name or password.", "error")
            return render_template("login.html", username=username), 401
        throttle.succeeded(username, address)
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
        if users().authenticate(current_user.username, request.form.get("current", "")) is None:
            flash("The current password is wrong.", "error")
            return render_template("password.html"), 400
        try:
            users().set_password(current_user.username, request.form.get("new", ""))
        except Exception as e:  # ValidationError: say what is wrong
            flash(str(e), "error")
            return render_template("password.html"), 400
        store = current_app.extensions["cloudtask_store"]()
        name = current_user.username
        store.add_audit(name, "user.password", f"user:{name}", None, {"password_changed": True})
        flash("Password changed.", "ok")
        return redirect(url_for("dashboard.index"))
    return render_template("password.html")
