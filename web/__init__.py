"""The CloudTask web site (Flask): an application factory and its blueprints.

``create_app(config, test_config)`` builds the app from defaults, then the CloudTask config,
then test overrides (``STORE``: a ready Store; ``ZK``: a started kazoo client, None without a
cluster). What the app holds for CloudTask (the store, ZooKeeper, the login throttle, the
caches) is one :class:`~web.context.CloudTaskExtension`, in ``app.extensions["cloudtask"]``.

One blueprint per area: ``auth`` (login, logout, password), ``dashboard``, ``tasks``,
``runs``, ``events``, ``cluster``, ``files``, ``admin`` (users, audit log), ``settings`` (the
alert settings, admin only), ``secrets`` (stored secrets, :mod:`web.secret_pages`), ``metrics``
(``/metrics`` for Prometheus and ``/readyz``, :mod:`web.metrics`) and ``api`` (``/api/v1``, JSON).
Shared helpers are in :mod:`web.context`. Every page and API route needs a logged-in user (a session, or an API
token as ``Authorization: Bearer``), except the login page, ``/healthz`` and ``/readyz``; roles are checked
on the server for every route; every form carries a CSRF token.

Sessions are kept on the server (:mod:`web.sessions`); what protects every request (the CSRF
check, the client's address behind ``web.trusted_proxies``, the login throttle, the security
headers of every answer) is :mod:`web.security`. Before a view runs: a valid API token is
taken (:func:`web.auth.authenticate_token`), a session the store could not read fails the
request (503, never a silent logout), and the CSRF check.
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import Flask, jsonify, render_template, request
from pymongo.errors import PyMongoError
from werkzeug.exceptions import HTTPException

from cloudtask import __version__
from cloudtask.config import Config
from cloudtask.exceptions import CloudTaskError

from .auth import authenticate_token, login_manager
from .auth import bp as auth_bp
from .context import CloudTaskExtension
from .security import (
    check_csrf,
    csrf_token,
    parse_networks,
    security_headers,
    session_identifier,
)
from .sessions import COOKIE_NAME, ServerSessionInterface, failure

# routes anyone may call: the login page, the health check, static files, and the callbacks
# of http tasks (authenticated by the run's own token, not by a user)
OPEN_ENDPOINTS = {
    "auth.login",
    "auth.oidc_start",  # "Log in with <provider>", and the provider's way back
    "auth.oidc_callback",
    "healthz",
    "metrics.readyz",  # (web/metrics.py)
    "static",
    "api.run_progress",
    "api.run_result",
}


def create_app(config: Config | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    cfg = config or Config()
    secure = cfg.web.secure_cookies
    if secure is None:  # auto: the site is reached over https
        secure = cfg.web.base_url.strip().lower().startswith("https://")
    app.config.from_mapping(
        CLOUDTASK=cfg,
        ZK=None,
        MAX_CONTENT_LENGTH=cfg.web.max_upload_bytes + 64 * 1024,
        SECRET_KEY=cfg.web.secret_key or secrets.token_hex(32),
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=secure,
        TRUSTED_PROXIES=parse_networks(cfg.web.trusted_proxies),
    )
    if test_config:
        app.config.update(test_config)

    cfg = app.config["CLOUDTASK"]
    extension = CloudTaskExtension(cfg, store=app.config.get("STORE"), zk=app.config.get("ZK"))
    app.extensions["cloudtask"] = extension
    app.session_interface = ServerSessionInterface(
        extension.store, cfg.web.session_idle_timeout, cfg.web.session_max_age
    )
    login_manager.init_app(app)
    login_manager._session_identifier_generator = session_identifier
    # before every view, in this order: a valid API token, a session that could not be read,
    # the CSRF check
    app.before_request(_authenticate)
    app.before_request(_session_unreadable)
    app.before_request(check_csrf)
    app.after_request(security_headers)
    app.register_blueprint(auth_bp)
    from . import sso

    sso.init_app(app)  # LDAP and OpenID Connect login (auth.ldap, auth.oidc)
    from . import admin, api, cluster, dashboard, events, files, runs, settings, tasks
    from .filters import register_filters

    for module in (dashboard, tasks, runs, events, cluster, files, admin, settings, api):
        app.register_blueprint(module.bp)
    from . import secret_pages  # the Secrets page (not "secrets": this module uses the stdlib's)

    app.register_blueprint(secret_pages.bp)
    from . import plan_pages  # the Plans pages (the API's plans are web/api/plans.py)

    app.register_blueprint(plan_pages.bp)
    from . import calendar_pages  # the Calendars page (the API's are web/api/calendars.py)

    app.register_blueprint(calendar_pages.bp)
    from . import metrics  # /metrics (Prometheus) and /readyz

    app.register_blueprint(metrics.bp)
    register_filters(app)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["version"] = __version__

    @app.get("/healthz")
    def healthz() -> Any:
        """Open to anyone (no login): whether this web process reaches MongoDB, as the status
        code (200 or 503) and ``{"status": "ok"}`` or ``{"status": "unavailable"}``. A
        logged-in user (a session or an API token) also gets the version and, when MongoDB
        cannot be reached, the error (which names its host and port)."""
        try:
            extension.store().ping()
            status, code, error = "ok", 200, None
        except CloudTaskError as e:
            status, code, error = "unavailable", 503, str(e)
            app.logger.warning("health check: %s", e)
        if not _logged_in():
            return jsonify(status=status), code
        details: dict[str, Any] = {"status": status, "version": __version__}
        if error:
            details["error"] = error
        return jsonify(details), code

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def error_page(error: Any) -> Any:
        from flask import request

        message = getattr(error, "description", str(error))
        if error.code == 413:
            limit = app.config["CLOUDTASK"].web.max_upload_bytes
            message = f"the upload is too large: at most {limit} bytes (web.max_upload_bytes)"
        # keep what the error says in headers (a 405's Allow), but not its HTML content type
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        if request.path.startswith("/api/"):
            return jsonify(error=message, details=[]), error.code, headers
        page = render_template("error.html", code=error.code, message=message)
        return page, error.code, headers

    @app.errorhandler(HTTPException)
    def other_http_error(error: HTTPException) -> Any:
        """Any other HTTP error (401, 415, 431 ...): JSON on the API, Werkzeug's page elsewhere."""
        from flask import request

        if not request.path.startswith("/api/") or error.code is None:
            return error
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        return jsonify(error=error.description or error.name, details=[]), error.code, headers

    @app.errorhandler(PyMongoError)
    def store_error(error: PyMongoError) -> Any:
        """MongoDB failed under a query made without the store's guard: 503, never a 500."""
        from flask import request

        app.logger.warning("MongoDB failed: %s", error)
        message = f"the store (MongoDB) failed: {error}"
        if request.path.startswith("/api/"):
            return jsonify(error=message, details=[]), 503
        return render_template("error.html", code=503, message=message), 503

    @app.errorhandler(500)
    def server_error(error: Any) -> Any:
        from flask import request

        message = "an internal error occurred; it is in the web server's log"
        if request.path.startswith("/api/"):
            return jsonify(error=message, details=[]), 500
        return render_template("error.html", code=500, message=message), 500

    @app.errorhandler(CloudTaskError)
    def cloudtask_error(error: CloudTaskError) -> Any:
        """CloudTask's own errors not handled by a view: bad input 422 (with one detail per
        problem), not found 404, conflict 409, store or cluster failure 503."""
        from flask import request

        from cloudtask.exceptions import Conflict, NotFound, ValidationError

        details: list[dict[str, str]] = []
        if isinstance(error, ValidationError):
            code, message = 422, f"{error.source or 'the input'} is invalid"
            details = [p.to_dict() for p in error.problems]
        elif isinstance(error, NotFound):
            code, message = 404, str(error)
        elif isinstance(error, Conflict):
            code, message = 409, str(error)
        else:
            code, message = 503, str(error)
        if request.path.startswith("/api/"):
            return jsonify(error=message, details=details), code
        if details:
            message += ": " + "; ".join(f"{d['path']}: {d['message']}" for d in details)
        return render_template("error.html", code=code, message=message), code

    return app


# the health checks: they tell anyone whether this site is up, even when MongoDB cannot say
# who asks
HEALTH_ENDPOINTS = ("healthz", "metrics.readyz")


def _authenticate() -> None:
    """:func:`web.auth.authenticate_token`; a health check goes on when the store cannot tell
    whose the token is (it answers whoever asks, as for an anonymous caller)."""
    try:
        authenticate_token()
    except CloudTaskError:
        if request.endpoint not in HEALTH_ENDPOINTS:
            raise


def _session_unreadable() -> None:
    """A session cookie the store could not read: the request fails with 503 (saying so)
    rather than going on as if logged out. The health checks and static files go on."""
    error = failure()
    if error is not None and request.endpoint not in (*HEALTH_ENDPOINTS, "static"):
        raise error


def _logged_in() -> bool:
    """Whether this request is a logged-in user's; False when that cannot be told (MongoDB
    down)."""
    from flask_login import current_user

    try:
        return bool(current_user.is_authenticated)
    except CloudTaskError:
        return False
