"""The notifier's state and the login throttle: ``deliveries`` (one document per message to
send), ``alert_state`` (per-task throttling of failure mail), ``settings`` (the alert settings
saved on the settings page), ``lateness`` (the leader's slow, deadline and overdue alerts per
task) and ``login_failures`` (the web's failed logins).

The rules (when to retry a delivery, what a digest holds, which settings are valid, how many
failed logins block) are :mod:`cloudtask.notify`'s and :mod:`web.security`'s; this module
reads and writes. Documents are written whole, never with ``$set`` of dates or booleans
(nx-27017 returns them changed); the login throttle's update sets numbers and one date only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReplaceOne
from pymongo.errors import BulkWriteError

from ..exceptions import StoreError
from .base import DUPLICATE_KEY, StoreBase, guard, indexed, read_all

DELIVERIES = "deliveries"
ALERT_STATE = "alert_state"
SETTINGS = "settings"
LOGIN_FAILURES = "login_failures"
LATENESS = "lateness"  # the leader's lateness alerts per task (cloudtask/center/lateness.py)
# what the lateness checks read of a run
_LATENESS_RUN_FIELDS = {
    "task_id": 1,
    "task_name": 1,
    "group": 1,
    "agent": 1,
    "status": 1,
    "trigger": 1,
    "attempt": 1,
    "scheduled_for": 1,
    "started_at": 1,
    "finished_at": 1,
    "duration": 1,
    "exit_code": 1,
    "http_status": 1,
    "error": 1,
}


class AlertRecords(StoreBase):
    """Deliveries, alert throttle states, alert settings and failed logins."""

    def ensure_alert_indexes(self) -> None:
        deliveries = self.db[DELIVERIES]
        guard(
            deliveries.create_index,
            "index the deliveries",
            [("status", ASCENDING), ("next_at_ts", ASCENDING)],
            name="status_next",
        )
        guard(
            deliveries.create_index, "index the deliveries", [("event_id", ASCENDING)], name="event"
        )
        guard(
            self.db[ALERT_STATE].create_index,
            "index the alert state",
            [("digest_due_ts", ASCENDING)],
            name="digest_due",
        )

    # --- deliveries ---------------------------------------------------------------------------

    def insert_deliveries(self, docs: list[dict[str, Any]]) -> int:
        """Insert pending deliveries; those already there are left as they are. Returns how
        many are new."""
        if not docs:
            return 0
        try:
            result = guard(
                self.db[DELIVERIES].insert_many, "record deliveries", docs, ordered=False
            )
            return len(result.inserted_ids)
        except BulkWriteError as e:  # duplicate keys only: the guard raised anything else
            errors = e.details.get("writeErrors", [])
            if any(err.get("code") != DUPLICATE_KEY for err in errors):
                raise StoreError(f"MongoDB refused to record deliveries: {errors}") from e
            return int(e.details.get("nInserted", len(docs) - len(errors)))

    def deliveries_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Pending deliveries whose time has come, oldest due first."""
        query = indexed({"status": "pending", "next_at_ts": {"$lte": float(now)}})
        cursor = self.db[DELIVERIES].find(query).sort("next_at_ts", ASCENDING).limit(limit)
        return read_all(cursor, "read the deliveries due")

    def replace_delivery(self, doc: dict[str, Any], new: dict[str, Any], what: str) -> bool:
        """Write ``new`` over ``doc`` if it is still unclaimed since read (its ``claims``)."""
        match = {"_id": doc["_id"], "claims": doc["claims"]}
        result = guard(self.db[DELIVERIES].replace_one, what, match, new)
        return result.matched_count == 1

    def get_delivery(self, delivery_id: str) -> dict[str, Any] | None:
        return guard(self.db[DELIVERIES].find_one, "read a delivery", {"_id": delivery_id})

    def deliveries_for_event(self, event_id: str) -> list[dict[str, Any]]:
        cursor = self.db[DELIVERIES].find(indexed({"event_id": event_id})).sort("_id", ASCENDING)
        return read_all(cursor, "read deliveries")

    # --- alert throttle state -----------------------------------------------------------------

    def get_alert_state(self, key: str) -> dict[str, Any] | None:
        return guard(self.db[ALERT_STATE].find_one, "read the alert state", {"_id": key})

    def save_alert_state(self, state: dict[str, Any]) -> None:
        guard(
            self.db[ALERT_STATE].replace_one,
            "store the alert state",
            {"_id": state["_id"]},
            state,
            upsert=True,
        )

    def delete_alert_state(self, key: str) -> None:
        guard(self.db[ALERT_STATE].delete_one, "reset the alert state", {"_id": key})

    def alert_digests_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        cursor = (
            self.db[ALERT_STATE]
            .find({"digest_due_ts": {"$lte": float(now)}})
            .sort("digest_due_ts", ASCENDING)
            .limit(limit)
        )
        return read_all(cursor, "read the digests due")

    # --- lateness alerts (cloudtask/center/lateness.py) ---------------------------------------

    def lateness_states(self) -> list[dict[str, Any]]:
        """Every task's lateness state (one small document per task that sets warn_after,
        deadline or expect_every), read once by each new leader."""
        return read_all(self.db[LATENESS].find({}), "read the lateness states")

    def lateness_state(self, task_id: str) -> dict[str, Any] | None:
        """One task's lateness state (for its page), or None."""
        return guard(self.db[LATENESS].find_one, "read a lateness state", {"_id": task_id})

    def save_lateness_states(self, docs: list[dict[str, Any]]) -> None:
        """Write lateness states whole, in one unordered bulk write."""
        if docs:
            ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
            guard(self.db[LATENESS].bulk_write, "store the lateness states", ops, ordered=False)

    def delete_lateness_states(self, task_ids: list[str]) -> None:
        if task_ids:
            guard(
                self.db[LATENESS].delete_many,
                "forget lateness states",
                {"_id": {"$in": list(task_ids)}},
            )

    def running_runs_brief(self) -> list[dict[str, Any]]:
        """The runs running now, cluster-wide (the ``status_agent`` index): a few per agent."""
        cursor = self.runs.find(indexed({"status": "running"}), _LATENESS_RUN_FIELDS)
        return read_all(cursor, "read the running runs")

    def runs_brief(self, run_ids: list[str]) -> list[dict[str, Any]]:
        cursor = self.runs.find({"_id": {"$in": list(run_ids)}}, _LATENESS_RUN_FIELDS)
        return read_all(cursor, "read runs")

    def successes_fired_since(self, task_ids: list[str], since: float) -> list[dict[str, Any]]:
        """The succeeded runs of these tasks fired at or after ``since`` (epoch seconds: the
        fire's ``ts``; a range of dates is ten times slower on the embedded server, and so is
        an ``$or``)."""
        if not task_ids:
            return []
        query = {
            "task_id": {"$in": list(task_ids)},
            "status": {"$eq": "succeeded"},
            "ts": {"$gte": float(since), "$lte": 1e12},
        }
        cursor = self.runs.find(query, _LATENESS_RUN_FIELDS)
        return read_all(cursor, "read the tasks' successes")

    def existing_task_ids(self, task_ids: list[str]) -> set[str]:
        cursor = self.tasks.find({"_id": {"$in": list(task_ids)}}, {"_id": 1})
        return {d["_id"] for d in read_all(cursor, "read task ids")}

    # --- alert settings -----------------------------------------------------------------------

    def read_settings_doc(self, key: str) -> dict[str, Any] | None:
        return guard(self.db[SETTINGS].find_one, "read the settings", {"_id": key})

    def write_settings_doc(self, doc: dict[str, Any]) -> None:
        guard(
            self.db[SETTINGS].replace_one,
            "store the settings",
            {"_id": doc["_id"]},
            doc,
            upsert=True,
        )

    # --- failed logins (web.security.LoginThrottle) -------------------------------------------

    def login_failure_times(self, key: str) -> list[Any]:
        doc = guard(self.db[LOGIN_FAILURES].find_one, "read failed logins", {"_id": key})
        return (doc or {}).get("times") or []

    def add_login_failure(
        self, key: str, at: float, keep: int, expires_at: datetime, expires_ts: float
    ) -> None:
        """Note a failed login at ``at`` (epoch s), keeping the last ``keep`` times. MongoDB's
        TTL index drops the document at ``expires_at``; ``expires_ts`` is the same instant as
        a number (see :meth:`sweep_login_failures`)."""
        guard(
            self.db[LOGIN_FAILURES].update_one,
            "note a failed login",
            {"_id": key},
            {
                "$push": {"times": {"$each": [at], "$slice": -keep}},
                "$set": {"expires_at": expires_at, "expires_ts": expires_ts},
            },
            upsert=True,
        )

    def sweep_login_failures(self, now: float) -> None:
        """Delete expired failed logins (servers without a TTL monitor)."""
        guard(
            self.db[LOGIN_FAILURES].delete_many,
            "forget old failed logins",
            {"expires_ts": {"$lt": now}},
        )

    def clear_login_failures(self, key: str) -> None:
        guard(self.db[LOGIN_FAILURES].delete_one, "forget failed logins", {"_id": key})
