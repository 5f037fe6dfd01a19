"""The REST API under /api/v1: JSON only, the same roles as the pages.

A user logs in with an API token (``Authorization: Bearer <token>``) or the browser session;
viewers read, operators change tasks, runs and files. Every change goes through the audited
:class:`~cloudtask.operations.Operations`, so it validates exactly like the model and is in
the audit log. The two callbacks of http tasks (``/runs/<run_id>/progress`` and ``/result``)
need no user: the service proves itself with the run's own token (``X-CloudTask-Token``).

Errors are ``{"error": "...", "details": [{"path": "...", "message": "..."}]}``: 400 for a
body that is not a JSON object, 401/403 for logins and roles, 404 for unknown tasks, runs and
routes, 409 for conflicts, 413 for bodies too large, 422 for invalid input (``details`` name
the fields like the model does: ``schedule.cron``, ``per_page``). No input makes a 500.

The package:

* :mod:`web.api.table`: the ``api`` blueprint and the route table (:class:`~web.openapi.
  ApiTable`) every route is declared on, which also describes it in the OpenAPI document
  served at ``/api/v1/openapi.json``;
* :mod:`web.api.hardening`: reading bodies, headers and query arguments, and
  :class:`~web.api.hardening.ApiError`;
* one module per resource: :mod:`~web.api.tasks` (and :mod:`~web.api.taskplan`: the plan
  of ``cloudtask apply``), :mod:`~web.api.runs` (with the callbacks
  of http tasks), :mod:`~web.api.files`, :mod:`~web.api.cluster` (agents and the cluster),
  :mod:`~web.api.events`, :mod:`~web.api.calendars` (calendars and blackout windows),
  :mod:`~web.api.secrets` (stored secrets, never a value),
  :mod:`~web.api.plans` (plans from other systems), :mod:`~web.api.users` (users and
  their API tokens, admin only), :mod:`~web.api.settings` (the alert settings, admin only,
  secrets write-only), :mod:`~web.api.audit` (the audit log), and
  :mod:`~web.api.meta` (the user and the document).

Importing the package declares every route; ``bp`` is the blueprint to register and ``api``
the table of its routes.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each declares its routes)
    audit,
    calendars,
    cluster,
    events,
    files,
    meta,
    plans,
    pools,
    runs,
    secrets,
    settings,
    taskplan,
    tasks,
    users,
)
from .table import api, bp

__all__ = ["api", "bp"]
