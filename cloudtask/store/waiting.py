"""Runs waiting for an agent: manual runs ("run now") and claims the leader released
(their agent left before starting them). Both are stored ``queued`` with no agent; the agent
that owns the task takes one with a single conditional write only one agent can win.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pymongo import ReturnDocument

from ..clock import to_bson_time, utcnow
from ..runmodel import (
    new_run_document,
)
from .base import StoreBase, guard, read_all

log = logging.getLogger("cloudtask.store")


class WaitingRuns(StoreBase):
    """Manual runs and released claims."""

    def released_claims(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Claims released by the leader (never started, waiting for the task's owner)."""
        docs = self._waiting_runs(
            {
                "agent": 1,
                "task_id": 1,
                "scheduled_for": 1,
                "trigger": 1,
                "status": 1,
                "claimed_at": 1,
            }
        )
        return [d for d in docs if d.get("trigger") != "manual"][:limit]

    def _waiting_runs(self, projection: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """Runs ``queued`` with no agent (manual runs, released claims), oldest claim first.
        Read by status alone (there are few) and picked here: a plain match on ``agent`` None
        misses stored nulls on nx-27017, and ``$in: [None]`` is a scan there."""
        # (plan items wait in their own queue: cloudtask/store/plans.py)
        cursor = self.runs.find(
            {"status": {"$eq": "queued"}, "trigger": {"$ne": "plan"}},
            None if projection is None else {**projection, "trigger": 1},
        )
        docs = [
            d
            for d in read_all(cursor, "read the runs waiting for an agent")
            if d.get("agent") is None and d.get("trigger") != "plan"
        ]
        return sorted(docs, key=lambda d: (d["claimed_at"], d["scheduled_for"]))

    def finish_released_claims(self, verdicts: Sequence[tuple[dict[str, Any], str, str]]) -> None:
        """Record released claims no agent took: ``(doc, status, reason)`` each, written only
        while the claim still waits (an agent that took it meanwhile wins)."""
        now = to_bson_time(utcnow())
        finished = []
        for doc, status, reason in verdicts:
            full = guard(
                self.claims.find_one,
                "read a released claim",
                {"_id": doc["_id"], "status": "queued", "agent": {"$in": [None]}},
            )
            if full is None:
                continue
            full.update(status=status, error=f"{full.get('error') or 'released'}; {reason}")
            full.update(finished_at=now, duration=0.0)
            result = guard(
                self.claims.replace_one,
                "record a released claim",
                {"_id": doc["_id"], "status": "queued", "agent": {"$in": [None]}},
                full,
            )
            if result.matched_count:
                finished.append(full)
        self.note_last_runs(finished)

    def request_manual_run(
        self,
        task: dict[str, Any],
        requested_by: str,
        now: datetime | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Record a manual run of ``task``, waiting for an agent of its group to take it.

        The run is stored first (``queued``, no agent), so it is never silently lost: the agent
        that owns the task takes it with one conditional write (see :meth:`take_pending_run`),
        which only one agent can win.
        """
        now = now or utcnow()
        doc = new_run_document(
            task_id=task["_id"],
            task_name=task["name"],
            group=task["group"],
            revision=task["revision"],
            scheduled_for=now,
            slot="manual",
            attempt=0,
            trigger="manual",
            agent=None,
            status="queued",
            now=now,
        )
        doc["requested_by"] = requested_by
        if env:
            doc["env"] = env  # the run's parameters: its environment on top of the task's
        guard(self.runs.insert_one, "record the manual run", doc)
        return doc

    def backfill_runs(
        self,
        task: dict[str, Any],
        fires: list[datetime],
        requested_by: str,
        now: datetime | None = None,
    ) -> tuple[int, int]:
        """Queue a run of ``task`` for each of ``fires`` (trigger ``backfill``, no agent: the
        task's owner takes them, one at a time for a ``forbid`` task). A fire that has a run
        already (the claim index) is not queued again. Returns (queued, existing)."""
        from pymongo.errors import BulkWriteError

        now = now or utcnow()
        docs = []
        for fire in fires:
            doc = new_run_document(
                task_id=task["_id"],
                task_name=task["name"],
                group=task["group"],
                revision=task["revision"],
                scheduled_for=fire,
                slot="one",
                attempt=0,
                trigger="backfill",
                agent=None,
                status="queued",
                now=now,
            )
            doc["requested_by"] = requested_by
            docs.append(doc)
        if not docs:
            return 0, 0
        try:
            guard(self.runs.insert_many, "queue the backfill", docs, ordered=False)
        except BulkWriteError as e:
            existing = len(e.details.get("writeErrors", []))
            return len(docs) - existing, existing
        return len(docs), 0

    def pending_runs(self, group: str, limit: int = 100) -> list[dict[str, Any]]:
        """Runs of ``group`` waiting for an agent to take them, oldest first: manual runs
        ("run now") and claims released by the leader after their agent left before starting
        them."""
        return [d for d in self._waiting_runs() if d.get("group") == group][:limit]

    def take_pending_run(
        self,
        run_id: str,
        agent: str,
        session: str | None,
        token_hash: str,
        trigger: str | None = None,
        status: str | None = None,
    ) -> dict[str, Any] | None:
        """Take a pending run for ``agent``: the whole run document, or None if another agent
        took it first (or it was cancelled). Only strings are written with ``$set``;
        ``trigger`` (a released claim run late is a ``catch-up``) and ``status`` (a released
        claim not due yet is ``claimed``, started at its time) are set too when given."""
        fields = {"agent": agent, "session": session, "token_hash": token_hash}
        if trigger is not None:
            fields["trigger"] = trigger
        if status is not None:
            fields["status"] = status
        return guard(
            self.claims.find_one_and_update,
            "take a pending run",
            {"_id": run_id, "status": "queued", "agent": {"$in": [None]}},
            {"$set": fields},
            return_document=ReturnDocument.AFTER,
        )

    def cancel_pending_run(
        self, run_id: str, reason: str, now: datetime | None = None, agent: str | None = None
    ) -> bool:
        """Finish a run that has not started as ``killed``: a manual run no agent has taken
        yet or a released claim, or (with ``agent``) also a claim of ``agent`` still waiting
        for a slot (its agent is asked to kill a run it does not run). False if it started
        or someone else has it."""
        now = to_bson_time(now or utcnow())
        query = {"_id": run_id, "status": "queued", "agent": {"$in": [None, agent]}}
        doc = guard(self.claims.find_one, "read the run", query)
        if doc is None:
            return False
        doc.update(status="killed", error=reason, finished_at=now, duration=0.0)
        result = guard(self.claims.replace_one, "cancel the run", query, doc)
        if result.matched_count:
            self.note_last_runs([doc])
        return bool(result.matched_count)
