"""The CloudTask web site (Flask): an application factory and its blueprints.

``create_app(config)`` builds the app from defaults, then the CloudTask config, then test
overrides. So far it serves the health check that load balancers and `cloudtask up` use; the
operator pages and the REST API are built on this factory.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify

from cloudtask import __version__
from cloudtask.config import Config
from cloudtask.exceptions import CloudTaskError
from cloudtask.store import Store


def create_app(config: Config | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(CLOUDTASK=config or Config())
    if test_config:
        app.config.update(test_config)

    def store() -> Store:
        if "CLOUDTASK_STORE" not in app.extensions:
            cfg: Config = app.config["CLOUDTASK"]
            app.extensions["CLOUDTASK_STORE"] = app.config.get("STORE") or Store(
                cfg.mongodb.uri, cfg.mongodb.database, server_selection_timeout_ms=2000
            )
        return app.extensions["CLOUDTASK_STORE"]

    @app.get("/healthz")
    def healthz() -> Any:
        """Open to anyone (no login): says whether this web process reaches MongoDB."""
        try:
            store().ping()
        except CloudTaskError as e:
            return jsonify(status="unavailable", version=__version__, error=str(e)), 503
        return jsonify(status="ok", version=__version__)

    return app
