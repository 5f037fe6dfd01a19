"""The dashboard: tasks by state, runs and success rate in the last 24 h, failing tasks,
agents online and offline, unassigned tasks, recent runs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from .auth import requires

bp = Blueprint("dashboard", __name__)


@bp.get("/")
@requires("viewer")
def index() -> Any:
    return render_template("dashboard.html")
