"""The API's route table: the ``api`` blueprint (under /api/v1), the
:class:`~web.openapi.ApiTable` every route of the resource modules is declared on, and the
parameters several resources share.

The blueprint answers an :class:`~web.api.hardening.ApiError` with its JSON error.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from cloudtask.store import Page

from ..openapi import ApiTable, query
from ..queries import MAX_PER_PAGE
from .hardening import ApiError, api_error

bp = Blueprint("api", __name__, url_prefix="/api/v1")
bp.register_error_handler(ApiError, api_error)
api = ApiTable(bp)

TEXT_ARG_LIMIT = 200
TEXT_ARG = {"type": "string", "maxLength": TEXT_ARG_LIMIT}
PAGE_PARAMS = (
    query("page", {"type": "integer", "minimum": 1, "maximum": 1_000_000}, "Page (1)"),
    query(
        "per_page",
        {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE},
        f"Items per page (50, at most {MAX_PER_PAGE})",
    ),
)


def page_json(page: Page, items: list[Any]) -> dict[str, Any]:
    """One page of a list as the API answers it: its items, where it is, how many in all."""
    return {
        "items": items,
        "page": page.page,
        "per_page": page.per_page,
        "total": page.total,
        "capped": page.capped,
    }
