"""Task pages: list, detail, create, edit, clone, pause, resume, run now, delete."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from .auth import requires

bp = Blueprint("tasks", __name__, url_prefix="/tasks")


@bp.get("")
@requires("viewer")
def index() -> Any:
    return "tasks"
