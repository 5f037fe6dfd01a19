"""Reports of http-task services (``run_reports`` collection): progress and the result a
service posts back for its run (callbacks). The run's agent, its only writer, copies them into
the run document.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pymongo.errors import DuplicateKeyError

from ..clock import to_bson_time, utcnow
from ..exceptions import Conflict
from ..runmodel import (
    SCHEMA_VERSION,
)
from .base import StoreBase, guard

log = logging.getLogger("cloudtask.store")


class RunReports(StoreBase):
    """Progress and results reported by http-task services."""

    def get_report(self, run_id: str) -> dict[str, Any] | None:
        """What the service of an http run reported: ``percent``, ``message``, ``updated_at``
        and ``result`` (None, or ``{"status": "succeeded"|"failed", "message", "at"}``)."""
        return guard(self.reports.find_one, "read the run's report", {"_id": run_id})

    def report_progress(
        self, run_id: str, percent: float | None, message: str, now: datetime | None = None
    ) -> dict[str, Any]:
        """Record a progress report of a run. Written whole (never ``$set``), and refused with
        Conflict once the run's result is in. The agent, the run's only writer, copies the
        latest report into the run document."""
        now = to_bson_time(now or utcnow())
        current = self.get_report(run_id)
        if current is not None and current.get("result"):
            raise Conflict(f"run {run_id} already reported its result")
        doc = {
            "_id": run_id,
            "version": SCHEMA_VERSION,
            "percent": percent,
            "message": message,
            "updated_at": now,
            "result": None,
        }
        if current is None:
            try:
                guard(self.reports.insert_one, "record the progress", doc)
                return doc
            except DuplicateKeyError:
                current = self.get_report(run_id) or {}
                if current.get("result"):
                    raise Conflict(f"run {run_id} already reported its result") from None
        guard(
            self.reports.replace_one,
            "record the progress",
            {"_id": run_id, "result": {"$in": [None]}},
            doc,
        )
        return doc

    def report_result(
        self, run_id: str, status: str, message: str, now: datetime | None = None
    ) -> dict[str, Any]:
        """Record the result of a run (``succeeded`` or ``failed``); only the first counts:
        a second raises Conflict. The agent waiting for it finishes the run."""
        now = to_bson_time(now or utcnow())
        current = self.get_report(run_id)
        if current is not None and current.get("result"):
            raise Conflict(f"run {run_id} already reported its result")
        result = {"status": status, "message": message, "at": now}
        doc = {
            "_id": run_id,
            "version": SCHEMA_VERSION,
            "percent": current.get("percent") if current else None,
            "message": current.get("message", "") if current else "",
            "updated_at": now,
            "result": result,
        }
        if current is None:
            try:
                guard(self.reports.insert_one, "record the result", doc)
                return doc
            except DuplicateKeyError:
                pass
        outcome = guard(
            self.reports.replace_one,
            "record the result",
            {"_id": run_id, "result": {"$in": [None]}},
            doc,
        )
        if not outcome.matched_count:
            raise Conflict(f"run {run_id} already reported its result")
        return doc
