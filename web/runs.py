"""Run pages: list with filters, detail with live output, kill."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from .auth import requires

bp = Blueprint("runs", __name__, url_prefix="/runs")


@bp.get("")
@requires("viewer")
def index() -> Any:
    return "runs"
