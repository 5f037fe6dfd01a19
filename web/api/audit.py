"""The API's audit log: who changed what and when, newest first, filtered like the audit page
(anyone logged in reads it, as the page).

The filters and the query are the page's (:func:`web.admin.audit_filters`): ``actor``,
``action`` (a prefix such as ``task.``), ``target`` (``task:nightly``, ``user:ann``; a plain
name means a task), ``since`` and ``until`` (ISO 8601, to the second), in pages of
``per_page`` (at most 200). Each entry carries its ``before`` and ``after`` with credentials
and webhook URLs masked, and ``changes``: the keys that differ, old and new, as the page
shows them.
"""

from __future__ import annotations

from typing import Any

from flask import jsonify

from cloudtask.operations.audit import mask_pair

from ..admin import AUDIT_MAX_PER_PAGE, audit_changes, audit_filters, list_audit
from ..auth import requires
from ..context import jsonable
from ..openapi import Reply, query
from .hardening import checked
from .table import TEXT_ARG, api, page_json


def audit_json(doc: dict[str, Any]) -> dict[str, Any]:
    before, after = mask_pair(doc.get("before"), doc.get("after"))
    out = jsonable(
        {
            "id": doc["_id"],
            "at": doc.get("at"),
            "actor": doc.get("actor"),
            "action": doc.get("action"),
            "target": doc.get("target"),
            "before": before,
            "after": after,
        }
    )
    out["changes"] = [
        {"key": key, "old": old, "new": new}
        for key, old, new in audit_changes(doc.get("before"), doc.get("after"))
    ]
    return out


@api.route(
    "GET",
    "/audit",
    summary="The audit log",
    description="Every change and login, newest first: who (`actor`), what (`action`), on "
    "what (`target`), the state before and after (credentials masked) and the keys that "
    "changed. Filtered and paged like the audit page.",
    params=(
        query("actor", TEXT_ARG, "Only entries of this user (`cli:<login>` for the command line)"),
        query("action", TEXT_ARG, "An action (`task.create`) or a prefix (`task.`, `user.`)"),
        query(
            "target",
            TEXT_ARG,
            "What was changed: `task:NAME`, `user:NAME`, `file:NAME`, `settings:alerts`; a "
            "plain name means a task",
        ),
        query(
            "since",
            {"type": "string", "format": "date-time"},
            "At or after (ISO 8601, to the second; UTC without an offset)",
        ),
        query("until", {"type": "string", "format": "date-time"}, "Before"),
        query("page", {"type": "integer", "minimum": 1, "maximum": 100_000}, "Page (1)"),
        query(
            "per_page",
            {"type": "integer", "minimum": 1, "maximum": AUDIT_MAX_PER_PAGE},
            f"Entries per page (50, at most {AUDIT_MAX_PER_PAGE})",
        ),
    ),
    replies={200: Reply("One page of entries", "AuditPage")},
    errors=(422,),
)
@requires("viewer")
def list_audit_entries() -> Any:
    page = list_audit(checked(audit_filters))
    return jsonify(page_json(page, [audit_json(item) for item in page.items]))
