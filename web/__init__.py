"""The CloudTask web site (Flask): an application factory and its blueprints.

``create_app(config, test_config)`` builds the app from defaults, then the CloudTask config,
then test overrides. Every page and API route needs a logged-in user (a session, or an API
token as ``Authorization: Bearer``), except the login page and ``/healthz``; roles are checked
on the server for every route; every form carries a CSRF token.
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import Flask, jsonify, render_template

from cloudtask import __version__
from cloudtask.config import Config
from cloudtask.exceptions import CloudTaskError
from cloudtask.store import Store

from .auth import bp as auth_bp
from .auth import login_manager, requires
from .security import LoginThrottle, check_csrf, csrf_token

OPEN_ENDPOINTS = {"auth.login", "healthz", "static"}


def create_app(config: Config | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    cfg = config or Config()
    app.config.from_mapping(
        CLOUDTASK=cfg,
        SECRET_KEY=cfg.web.secret_key or secrets.token_hex(32),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
    )
    if test_config:
        app.config.update(test_config)

    def store() -> Store:
        if "store" not in app.extensions.setdefault("cloudtask", {}):
            cfg: Config = app.config["CLOUDTASK"]
            app.extensions["cloudtask"]["store"] = app.config.get("STORE") or Store(
                cfg.mongodb.uri, cfg.mongodb.database, server_selection_timeout_ms=2000
            )
        return app.extensions["cloudtask"]["store"]

    app.extensions["cloudtask_store"] = store
    app.extensions["cloudtask_throttle"] = LoginThrottle()
    login_manager.init_app(app)
    app.register_blueprint(auth_bp)
    app.before_request(check_csrf)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["version"] = __version__

    @app.get("/healthz")
    def healthz() -> Any:
        """Open to anyone (no login): says whether this web process reaches MongoDB."""
        try:
            store().ping()
        except CloudTaskError as e:
            return jsonify(status="unavailable", version=__version__, error=str(e)), 503
        return jsonify(status="ok", version=__version__)

    @app.get("/")
    @requires("viewer")
    def home() -> Any:
        return render_template("home.html")

    @app.get("/api/v1/me")
    @requires("viewer")
    def api_me() -> Any:
        from flask_login import current_user

        return jsonify(username=current_user.username, role=current_user.role)

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    def error_page(error: Any) -> Any:
        from flask import request

        message = getattr(error, "description", str(error))
        if request.path.startswith("/api/"):
            return jsonify(error=message), error.code
        return render_template("error.html", code=error.code, message=message), error.code

    return app
