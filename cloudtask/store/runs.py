"""Runs and claims (``runs`` collection): the once-only protocol's writes.

The unique index on ``(task_id, scheduled_for, slot, attempt)`` is the once-only claim: an
agent inserts a run document *before* it starts anything, and a duplicate key means some other
process already has that fire. Every later write of a run is conditional on its owner and
status, so a late write of a process that lost the run changes nothing. Writes that once-only
rests on go through ``self.claims`` (the claim write concern, see
:meth:`StoreBase._use_claim_concern`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pymongo
from pymongo import DESCENDING, ReplaceOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .. import events as ev
from ..clock import from_epoch, to_bson_time, utcnow
from ..exceptions import NotFound, StoreError
from ..runmodel import (
    RUNNING_STATUSES,
    lost_fields,
    new_run_document,
    next_attempt_document,
    released_fields,
)
from .base import DUPLICATE_KEY, StoreBase, guard, indexed, read_all

log = logging.getLogger("cloudtask.store")


class RunRecords(StoreBase):
    """Claims, run writes, and the reads that decide them."""

    def claim_runs(self, docs: Sequence[dict[str, Any]]) -> list[bool]:
        """Insert run documents as claims, in one batch. Returns, per document, whether we won it.

        A duplicate key means another process claimed that fire first, unless the stored
        document has the very same ``_id``: then an earlier try of this same claim landed (its
        answer was lost with the connection) and the fire is ours. Any other write error is
        raised, because then we do not know whether the fire is ours.

        A fire recorded ``missed`` is final at once: its ``run.missed`` event is recorded here
        (by the claim that won it; a retried claim finds the event recorded).
        """
        if not docs:
            return []
        try:
            guard(self.claims.insert_many, "claim runs", list(docs), ordered=False)
            won = [True] * len(docs)
        except BulkWriteError as e:
            duplicates: set[int] = set()
            for err in e.details.get("writeErrors", []):
                if err.get("code") != DUPLICATE_KEY:
                    raise StoreError(f"MongoDB refused a run claim: {err.get('errmsg')}") from e
                duplicates.add(err["index"])
            ids = [docs[i]["_id"] for i in duplicates]
            ours = {
                d["_id"]
                for d in read_all(
                    self.claims.find({"_id": {"$in": ids}}, {"_id": 1}), "check claims"
                )
            }
            won = [i not in duplicates or docs[i]["_id"] in ours for i in range(len(docs))]
        missed = [ev.run_event(d) for d, ok in zip(docs, won) if ok and d["status"] == "missed"]
        if missed:
            self._record_events_quietly([e for e in missed if e], "missed fires")
        return won

    def save_runs(self, docs: Sequence[dict[str, Any]], owner: str | None = None) -> None:
        """Write the current state of many runs in one round trip (the run's agent writes).

        Whole documents are replaced rather than ``$set``: every field keeps its BSON type on
        every server (nx-27017 stores a date written with ``$set`` as a string). A run is
        replaced only while it is still its agent's (``owner``, else the document's own
        ``agent``: a claim released to another agent is no longer ours) and not finished, or
        marked ``lost`` by the leader: "lost" means its agent could not be heard from, and the
        agent that ran it after all records the real outcome. A run another process finished
        is never overwritten by a late write.
        """
        if not docs:
            return
        ops = [
            ReplaceOne(
                {
                    "_id": d["_id"],
                    "status": {"$in": [*RUNNING_STATUSES, "lost"]},
                    "agent": owner if owner is not None else d["agent"],
                },
                d,
            )
            for d in docs
        ]
        guard(self.claims.bulk_write, "write runs", ops, ordered=False)
        self.note_last_runs(docs)

    def beat_runs(self, agent: str, run_ids: Sequence[str], beat: float) -> int:
        """The heartbeat of an agent's unfinished runs: ``beat`` (its clock, epoch seconds) on
        each. The leader marks a run ``lost`` only once its agent's session is gone *and* it
        has seen this value stay the same for a grace period. Returns how many were beaten."""
        if not run_ids:
            return 0
        result = guard(
            self.claims.update_many,
            "beat runs",
            {
                "_id": {"$in": list(run_ids)},
                "agent": agent,
                "status": {"$in": [*RUNNING_STATUSES, "lost"]},
            },
            {"$set": {"beat": float(beat)}},
        )
        return result.modified_count

    def start_queued_run(self, run_id: str, agent: str, token: str) -> bool:
        """Move a claim that waited for a slot from ``queued`` to ``running``, before its
        process starts: one conditional write, so a claim released to (or taken over by)
        another agent meanwhile is never started here too. ``token`` is made by the caller
        once per run: a write whose answer was lost, sent again with the same token, finds
        the run moved by it and counts as done (not as taken by another agent, which would
        leave the run ``running`` with no process). Only strings are ``$set``."""
        result = guard(
            self.claims.update_one,
            "start a queued run",
            {
                "_id": run_id,
                "agent": agent,
                "$or": [{"status": "queued"}, {"status": "running", "start_token": token}],
            },
            {"$set": {"status": "running", "start_token": token}},
        )
        return result.matched_count == 1

    def runs_by_id(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The whole documents of these runs (the ones that exist)."""
        cursor = self.runs.find({"_id": {"$in": list(run_ids)}})
        return read_all(cursor, "read runs")

    def run_states(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """run id -> its ``status``, ``agent``, ``attempt`` and ``finished_at`` (runs that
        exist)."""
        fields = {"status": 1, "agent": 1, "attempt": 1, "finished_at": 1}
        cursor = self.runs.find({"_id": {"$in": list(run_ids)}}, fields)
        return {d["_id"]: d for d in read_all(cursor, "read runs")}

    def unfinished_runs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """Runs matching ``query`` that are still ``queued`` or ``running``.

        One query per status, an ``$eq`` (see :func:`indexed`): the embedded server then finds
        the few unfinished runs by its status index, whatever else ``query`` asks; with a
        status ``$in`` it scanned every run, longer than a pass's deadline past about 100,000."""
        found: list[dict[str, Any]] = []
        for status in RUNNING_STATUSES:
            cursor = self.runs.find(indexed({**query, "status": status}))
            found += read_all(cursor, "find unfinished runs")
        return found

    def finish_unheard_runs(
        self, docs: Sequence[dict[str, Any]], reason: str, now: datetime | None = None
    ) -> list[str]:
        """The leader's verdict on runs whose agent is gone and went silent: a run that was
        ``running`` or ``claimed`` (ahead of its due time: whether it started is not known
        here; its agent's journal tells, if it comes back) becomes ``lost``; a claim still
        ``queued`` (it never started) is released:
        ``agent`` None, so the task's owner takes it over like a manual run and runs it (see
        :meth:`take_pending_run`). Each write applies only if the run is exactly as read (same
        status, agent and heartbeat): a run its agent touched meanwhile is left alone.
        Returns the ids written."""
        if not docs:
            return []
        now = to_bson_time(now or utcnow())
        ops, written = [], []
        for doc in docs:
            new = dict(doc)
            if doc["status"] == "queued":
                new.update(released_fields(doc["agent"], reason))
            elif doc["status"] == "claimed":  # its agent may have died before its due time
                why = f"{reason}; it was claimed ahead of its due time and may never have started"
                new.update(lost_fields(doc, why, now))
            else:
                new.update(lost_fields(doc, reason, now))
            beat = doc.get("beat")
            ops.append(
                ReplaceOne(
                    {
                        "_id": doc["_id"],
                        "status": doc["status"],
                        "agent": doc["agent"],
                        "beat": beat if beat is not None else {"$in": [None]},
                    },
                    new,
                )
            )
            written.append(new)
        guard(self.claims.bulk_write, "mark runs lost", ops, ordered=False)
        self.note_last_runs([d for d in written if d["status"] == "lost"])
        return [d["_id"] for d in written]

    def rerun_lost_runs(self, docs: Sequence[dict[str, Any]], now: datetime | None = None) -> int:
        """Queue the fires of these lost runs again, each as its next attempt (trigger
        ``retry``, no agent: the task's owner takes it like a released claim). An attempt
        queued already (the claim index) is not queued twice. Returns how many were new."""
        now = now or utcnow()
        fresh = []
        for doc in docs:
            new = next_attempt_document(doc, "retry", now)
            new["released_by"] = doc.get("agent")
            new["rerun_of"] = doc["_id"]
            fresh.append(new)
        if not fresh:
            return 0
        try:
            guard(self.claims.insert_many, "queue lost runs again", fresh, ordered=False)
        except BulkWriteError as e:
            return len(fresh) - len(e.details.get("writeErrors", []))
        return len(fresh)

    def parent_runs(
        self, task_ids: list[str], since: datetime, until: datetime
    ) -> list[dict[str, Any]]:
        """The runs of ``task_ids`` fired from ``since`` to ``until`` (fan-in: what the
        parents of an after task did)."""
        if not task_ids:
            return []
        cursor = self.runs.find(
            {
                "task_id": {"$in": sorted(set(task_ids))},
                "ts": {"$gte": since.timestamp(), "$lte": until.timestamp()},
            },
            {
                "task_id": 1,
                "scheduled_for": 1,
                "status": 1,
                "attempt": 1,
                "finished_at": 1,
            },
        )
        return read_all(cursor, "read the parents' runs")

    def record_after_fire(
        self,
        task_id: str,
        task_name: str,
        group: str,
        revision: int,
        at: datetime,
        day: str,
        parents: dict[str, str],
        *,
        missed: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """The fire of an after task for the logical date ``day`` (recorded at ``at``): a
        run ``queued`` with no agent for the task's owner, or, with ``missed``, recorded
        ``missed`` with that reason. False when it was recorded before (the claim index)."""
        now = now or utcnow()
        doc = new_run_document(
            task_id=task_id,
            task_name=task_name,
            group=group,
            revision=revision,
            scheduled_for=at,
            slot="one",
            attempt=0,
            trigger="after",
            agent=None,
            status="missed" if missed else "queued",
            now=now,
        )
        doc["after_date"] = day
        doc["parents"] = parents  # name -> the run that counted
        if missed:
            doc["error"] = missed
        try:
            guard(self.claims.insert_one, "record the fire of an after task", doc)
        except DuplicateKeyError:
            return False
        if missed:
            self.note_last_runs([doc])
        return True

    def mark_runs_lost(
        self,
        query: dict[str, Any],
        reason: str,
        now: datetime | None = None,
        free_leases: bool = False,
    ) -> list[str]:
        """Mark the unfinished runs matching ``query`` as ``lost``. Returns their ids.

        For tests and tools; the leader decides with :meth:`finish_unheard_runs`, a restarted
        agent with :meth:`left_runs` and its run journal.
        ``free_leases`` also frees the keepalive leases they held: only for a caller that knows
        their processes are gone.
        """
        now = to_bson_time(now or utcnow())
        docs = self.unfinished_runs(query)
        for doc in docs:
            doc.update(lost_fields(doc, reason, now))
        by_agent: dict[Any, list[dict[str, Any]]] = {}
        for doc in docs:
            by_agent.setdefault(doc["agent"], []).append(doc)
        for agent, group in by_agent.items():
            self.save_runs(group, owner=agent)
        ids = [d["_id"] for d in docs]
        if free_leases:
            self.free_leases(ids)
        return ids

    def left_runs(
        self, agent: str, own: set[str], known: set[str], now: datetime
    ) -> list[dict[str, Any]]:
        """The runs an earlier life of ``agent`` left: still ``queued`` or ``running`` and not
        among ``own`` (the claims of this life, from its journal), and the ones in ``known``
        (its run journal) that the leader has marked ``lost`` meanwhile (fires of the last
        day before ``now``).

        Told apart by the journal, not by time: a claim's time is the earlier life's clock,
        which may have run ahead (a run claimed by a life whose clock was 5 s fast was taken
        for this life's own, and its journal deleted unread), and the embedded server
        compares dates to the second."""
        left = [d for d in self.unfinished_runs({"agent": agent}) if d["_id"] not in own]
        if known:
            since = (now - timedelta(days=1)).timestamp()  # ts: the fire's time, a number
            cursor = self.runs.find(
                indexed({"agent": agent, "status": "lost", "ts": {"$gte": since, "$lte": 1e12}})
            )
            lost = read_all(cursor, "find lost runs")
            left += [d for d in lost if d["_id"] in known]
        return left

    def free_leases(self, holders: Sequence[str]) -> None:
        """Free the keepalive leases these runs held (for a caller that knows their processes
        are gone)."""
        if holders:
            guard(self.leases.delete_many, "free leases", {"holder": {"$in": list(holders)}})

    def last_fires(self, task_ids: Sequence[str], slot: str) -> dict[str, datetime]:
        """The latest fire recorded (any status, any agent) in slot ``slot`` of each of these
        tasks: task id -> its ``scheduled_for``; a task with no run is absent. One call for all
        of them: an agent that starts with 10,000 tasks reads their histories in a few calls."""
        pipeline = [
            {"$match": indexed({"task_id": {"$in": list(task_ids)}, "slot": slot})},
            # the epoch seconds beside it: the embedded server answers a date computed in a
            # pipeline as text
            {"$group": {"_id": "$task_id", "last": {"$max": "$ts"}}},
        ]
        found = guard(lambda: list(self.claims.aggregate(pipeline)), "read the run history")
        return {
            d["_id"]: from_epoch(round(d["last"], 3))
            for d in found
            if isinstance(d.get("last"), (int, float))
        }

    def owed_retries(
        self,
        task_id: str,
        slot: str,
        retries: int,
        since: datetime,
        statuses: Sequence[str],
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Runs of a task's slot scheduled since ``since`` that ended in ``statuses`` with
        attempts left (``attempt`` < ``retries``) and whose next attempt is not recorded: the
        retries their agent still owed when it died or stopped. Oldest first."""
        cursor = (
            self.claims.find(
                indexed(
                    {
                        "task_id": task_id,
                        "slot": slot,
                        "ts": {"$gte": since.timestamp(), "$lte": 1e12},
                    }
                ),
                {"scheduled_for": 1, "attempt": 1, "status": 1, "finished_at": 1},
            )
            .sort("ts", DESCENDING)
            .limit(limit * (retries + 1))
        )
        docs = read_all(cursor, "read the run history")
        attempts = {(d["scheduled_for"], d["attempt"]) for d in docs}
        owed = [
            d
            for d in docs
            if d["status"] in statuses
            and d["attempt"] < retries
            and (d["scheduled_for"], d["attempt"] + 1) not in attempts
        ]
        return sorted(owed, key=lambda d: d["scheduled_for"])[-limit:]

    def get_run(self, run_id: str) -> dict[str, Any]:
        doc = guard(self.runs.find_one, "read the run", {"_id": run_id})
        if doc is None:
            raise NotFound(f"no run with id {run_id!r}")
        return doc

    def list_runs(
        self,
        task_id: str | None = None,
        status: str | Sequence[str] | None = None,
        agent: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if task_id is not None:
            query["task_id"] = task_id
        if isinstance(status, str):
            query["status"] = status
        elif status is not None:
            query["status"] = {"$in": list(status)}
        if agent is not None:
            query["agent"] = agent
        cursor = self.runs.find(query).sort("scheduled_for", pymongo.DESCENDING).limit(limit)
        return read_all(cursor, "list runs")

    def purge_runs(self, now: datetime | None = None) -> int:
        """Delete the runs that finished more than ``run_retention_days`` ago. Returns how many."""
        cutoff = to_bson_time((now or utcnow()) - timedelta(days=self.run_retention_days))
        result = guard(self.runs.delete_many, "delete old runs", {"finished_at": {"$lt": cutoff}})
        if result.deleted_count:
            log.info(
                "deleted %d runs finished before %s (runs.retention_days = %s)",
                result.deleted_count,
                cutoff.date(),
                self.run_retention_days,
            )
        return result.deleted_count
