"""The store's schema: the indexes of every collection, and the changes an older version's
data needs (made when the store opens; each is safe to make again).

The indexes are chosen for the queries the store makes, and for the embedded wire server
(nx-27017) as much as for MongoDB: see the notes at each.
"""

from __future__ import annotations

import logging

from pymongo import ASCENDING, DESCENDING

from .base import StoreBase

log = logging.getLogger("cloudtask.store")


class Schema(StoreBase):
    """The indexes, made when the store opens."""

    def ensure_indexes(self) -> None:
        self._use_claim_concern()
        self.tasks.create_index([("name", ASCENDING)], unique=True, name="name_unique")
        self.tasks.create_index(
            [("group", ASCENDING), ("enabled", ASCENDING)], name="group_enabled"
        )
        self.runs.create_index(
            [
                ("task_id", ASCENDING),
                ("scheduled_for", ASCENDING),
                ("slot", ASCENDING),
                ("attempt", ASCENDING),
            ],
            unique=True,
            name="claim",
        )
        self.runs.create_index(
            [("task_id", ASCENDING), ("scheduled_for", DESCENDING)], name="task_time"
        )
        self.runs.create_index([("status", ASCENDING), ("agent", ASCENDING)], name="status_agent")
        self.runs.create_index([("scheduled_for", DESCENDING)], name="time")
        self._ensure_ttl()
        self.runs.create_index(
            [("trigger", ASCENDING), ("status", ASCENDING), ("group", ASCENDING)],
            name="pending_manual",
        )
        self.tasks.create_index([("last_run.status", ASCENDING)], name="last_status")
        self.tasks.create_index([("spec.owner", ASCENDING)], name="owner")
        self.tasks.create_index([("name_lc", ASCENDING)], name="name_lc")
        self.tasks.create_index([("secrets_used", ASCENDING)], name="secrets_used")
        # a single-field index: the wire server used on one machine sorts a task's runs by
        # time fast with it, and 100 times slower through the compound ones
        self.runs.create_index([("task_id", ASCENDING)], name="task")
        # the leader's lateness checks: some tasks' successes fired since a time, by the fire's
        # epoch seconds (cloudtask/center/lateness.py); MongoDB reads one range per task
        self.runs.create_index([("task_id", ASCENDING), ("ts", DESCENDING)], name="task_ts")
        for doc in self.tasks.find({"name_lc": {"$in": [None]}}, {"name": 1}):
            self.tasks.update_one({"_id": doc["_id"]}, {"$set": {"name_lc": doc["name"].lower()}})
        self.runs.create_index(
            [("agent", ASCENDING), ("scheduled_for", DESCENDING)], name="agent_time"
        )
        self.runs.create_index(
            [("status", ASCENDING), ("scheduled_for", DESCENDING)], name="status_time"
        )
        self.audit.create_index([("actor", ASCENDING), ("at", DESCENDING)], name="actor_at")
        self.audit.create_index([("target", ASCENDING), ("at", DESCENDING)], name="target_at")
        self.audit.create_index([("action", ASCENDING), ("at", DESCENDING)], name="action_at")
        self._ensure_event_indexes()
        self.ensure_plan_indexes()  # type: ignore[attr-defined]  (store/plans.py)
        self.users.create_index([("username", ASCENDING)], unique=True, name="username_unique")
        # the web's login throttle (web.security.LoginThrottle): MongoDB drops a pair's failures
        # once they are too old to count
        self.db["login_failures"].create_index(
            [("expires_at", ASCENDING)], expireAfterSeconds=0, name="expire"
        )
        self.audit.create_index([("at", DESCENDING)], name="at")
        self.db["files.files"].create_index([("metadata.sha256", ASCENDING)], name="sha256")
        self.db["files.files"].create_index(
            [("filename", ASCENDING), ("uploadDate", DESCENDING)], name="name_date"
        )

    def _ensure_event_indexes(self) -> None:
        """Events are ranged and sorted by ``ts`` (a number), never by the date: the notifier
        reads "new, oldest first", the site filters by kind, task or agent. The indexes on
        ``at`` of an older version are dropped (nothing queries them; each costs inserts)."""
        existing = self.events.index_information()
        for old in ("at", "kind_at"):
            if old in existing:
                self.events.drop_index(old)
        self.events.create_index([("delivery", ASCENDING), ("ts", ASCENDING)], name="delivery_ts")
        self.events.create_index([("ts", DESCENDING)], name="ts")
        self.events.create_index([("kind", ASCENDING), ("ts", DESCENDING)], name="kind_ts")
        self.events.create_index([("task_id", ASCENDING), ("ts", DESCENDING)], name="task_ts")
        self.events.create_index([("agent", ASCENDING), ("ts", DESCENDING)], name="agent_ts")
        # the events page also filters by severity and by group
        self.events.create_index([("severity", ASCENDING), ("ts", DESCENDING)], name="severity_ts")
        self.events.create_index([("group", ASCENDING), ("ts", DESCENDING)], name="group_ts")

    def _ensure_ttl(self) -> None:
        """Finished runs are deleted by :meth:`purge_runs` (the leading center, or a standalone
        agent, calls it hourly), not by a TTL index: the MongoDB wire server used on one machine
        checks a TTL index on every query of the collection, which made every run query cost
        100-200 ms at 100,000 runs. A TTL index left by an older version is dropped."""
        for name, info in self.runs.index_information().items():
            if info.get("expireAfterSeconds") is not None:
                self.runs.drop_index(name)
        self.runs.create_index([("finished_at", ASCENDING)], name="finished")
        self.runs.create_index([("ts", DESCENDING)], name="ts")
