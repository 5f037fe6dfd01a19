"""Users (admin only) and the audit log."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from .auth import requires

bp = Blueprint("admin", __name__)


@bp.get("/users")
@requires("admin")
def users() -> Any:
    return "users"


@bp.get("/audit")
@requires("viewer")
def audit() -> Any:
    return "audit"
