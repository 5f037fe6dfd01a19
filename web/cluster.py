"""The cluster page: agents by group and centers with the leader marked."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from .auth import requires

bp = Blueprint("cluster", __name__, url_prefix="/cluster")


@bp.get("")
@requires("viewer")
def index() -> Any:
    return "cluster"
