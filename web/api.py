"""The REST API under /api/v1: JSON only, Bearer tokens or the session, the same roles."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from flask_login import current_user

from .auth import requires

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.get("/me")
@requires("viewer")
def me() -> Any:
    return jsonify(username=current_user.username, role=current_user.role)
