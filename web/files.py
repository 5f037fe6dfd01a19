"""Task files: upload, versions, pin and roll back."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from .auth import requires

bp = Blueprint("files", __name__, url_prefix="/files")


@bp.get("")
@requires("viewer")
def index() -> Any:
    return "files"
