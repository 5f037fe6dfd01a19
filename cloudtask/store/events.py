"""Events and the audit log (``events`` and ``audit`` collections).

Events (see :mod:`cloudtask.events` for their shape) are written whole, once: an event whose
``_id`` is taken is already recorded. Recording one never breaks the write it hangs on: the
callers in this store log and swallow a failure (``_record_events_quietly``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .. import events as ev
from ..clock import to_bson_time, utcnow
from ..events import event_document
from ..exceptions import StoreError
from ..runmodel import (
    SCHEMA_VERSION,
    new_id,
)
from .base import StoreBase, guard, indexed, read_all

log = logging.getLogger("cloudtask.store")


class EventRecords(StoreBase):
    """Events and audit entries."""

    def task_id_in_history(self, value: str) -> str | None:
        """A task that is gone but left history: ``value`` itself when it is the id of events
        or runs still stored (both indexed by task_id), else the task id events recorded under
        that name (an unindexed read: only for a name no task has now). None: never a task."""
        for collection in (self.events, self.runs):
            found = guard(
                collection.find_one, "look up a task's history", {"task_id": value}, {"_id": 1}
            )
            if found is not None:
                return value
        named = guard(
            self.events.find_one,
            "look up a task's history",
            {"task_name": value, "task_id": {"$gt": ""}},
            {"task_id": 1},
        )
        return named["task_id"] if named else None

    def record_event(self, doc: dict[str, Any]) -> bool:
        """Insert one event. False if its ``_id`` is recorded already; StoreError if MongoDB
        refused it otherwise (a duplicate on another unique index is a refusal too)."""
        try:
            guard(self.events.insert_one, "record an event", doc)
        except DuplicateKeyError as e:
            if self._events_recorded([doc["_id"]]):
                return False
            raise StoreError(f"MongoDB refused the event {doc['_id']}: {e}") from e
        return True

    def record_events(self, docs: Sequence[dict[str, Any]]) -> int:
        """Insert events in one unordered ``insert_many``; those whose ``_id`` is recorded
        already are skipped. Returns how many were new. Other refusals raise StoreError
        (after the others were inserted)."""
        if not docs:
            return 0
        docs = list(docs)
        try:
            result = guard(self.events.insert_many, "record events", docs, ordered=False)
        except BulkWriteError as e:  # duplicate keys only: guard raised anything else
            errors = e.details.get("writeErrors", [])
            failed = [docs[err["index"]]["_id"] for err in errors]
            refused = set(failed) - self._events_recorded(failed)
            if refused:
                raise StoreError(
                    f"MongoDB refused {len(refused)} events (a unique index other than _id?): "
                    f"{errors[0].get('errmsg')}"
                ) from e
            return int(e.details.get("nInserted", len(docs) - len(errors)))
        return len(result.inserted_ids)

    def _events_recorded(self, ids: list[str]) -> set[str]:
        """Which of these event ids are stored (a duplicate key on ``_id``, not on another
        index: servers word that error differently, so ask)."""
        cursor = self.events.find({"_id": {"$in": ids}}, {"_id": 1})
        return {d["_id"] for d in read_all(cursor, "read events")}

    def _record_events_quietly(self, docs: Sequence[dict[str, Any]], what: str) -> int:
        """:meth:`record_events`, for a path an event must not break: a failure is logged."""
        try:
            return self.record_events(docs)
        except Exception as e:
            log.warning("cannot record the events of %s (%d lost): %s", what, len(docs), e)
            return 0

    def new_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """Events whose deliveries are not planned yet (``delivery`` "new"), oldest first."""
        cursor = self.events.find(indexed({"delivery": "new"})).sort("ts", ASCENDING).limit(limit)
        return read_all(cursor, "read new events")

    def set_event_delivery(self, event_id: str, state: str) -> bool:
        """Set an event's ``delivery`` (read, change, replace whole). False if it is gone."""
        doc = guard(self.events.find_one, "read an event", {"_id": event_id})
        if doc is None:
            return False
        doc["delivery"] = state
        result = guard(self.events.replace_one, "mark an event", {"_id": event_id}, doc)
        return bool(result.matched_count)

    def add_event(self, kind: str, message: str, **fields: Any) -> str:
        """Record an event of ``kind`` now (fields: see :func:`event_document`); its id."""
        doc = event_document(kind, message, **fields)
        self.record_event(doc)
        return doc["_id"]

    def add_audit(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
        task_id: str | None = None,
    ) -> None:
        """Record who changed what. A change of a task (create, clone, update, pause, resume,
        delete) is also an event (``task.created``/``changed``/``deleted``) naming the actor;
        ``task_id`` is looked up by the task's name when not given."""
        doc = {
            "_id": new_id(),
            "version": SCHEMA_VERSION,
            "at": to_bson_time(utcnow()),
            "actor": actor,
            "action": action,
            "target": target,
            "before": before,
            "after": after,
        }
        guard(self.audit.insert_one, "record an audit entry", doc)
        if action in ev.AUDIT_KINDS:
            self._record_audit_event(doc, task_id)

    def _record_audit_event(self, entry: dict[str, Any], task_id: str | None) -> None:
        try:
            event = ev.audit_event(entry, task_id)
            if event is None:
                return
            if task_id is None and event["task_name"] and entry["action"] != "task.delete":
                found = self.tasks.find_one({"name": event["task_name"]}, {"_id": 1})
                event["task_id"] = found["_id"] if found else None
            self.record_event(event)
        except Exception as e:  # the change and its audit entry are stored: never fail them
            log.warning(
                "cannot record the event of %s on %s: %s", entry["action"], entry["target"], e
            )
