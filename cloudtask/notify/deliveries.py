"""Deliveries (stored by :mod:`cloudtask.store.alerts`): one document per message to send (an event or a digest, on
one channel, to one target), from "pending" to "sent" (or "failed" after its last attempt).

``_id`` is deterministic (``<event id>:mail:<address>``, ``<event id>:webhook:<n>``,
``digest:<task id>:<n>:mail:<address>``), so planning an event again after a crash inserts
nothing new. The message is rendered when the delivery is planned and stored with it, so every
attempt sends the same bytes (a webhook's signature is over the stored body).

Sending one delivery: *claim* it (a whole-document replace conditional on its ``claims``
counter, pushing ``next_at_ts`` past the longest send), send, then mark it sent. A second
notifier cannot claim it meanwhile; a crash after the send repeats at most this one message
once the claim runs out; a crash before it loses nothing. Documents are always written whole
(nx-27017 returns dates and booleans written with ``$set`` changed).
"""

from __future__ import annotations

import logging
from typing import Any

from ..clock import stored_time
from ..runmodel import SCHEMA_VERSION
from ..store import Store

log = logging.getLogger(__name__)

BACKOFF_FIRST = 5.0  # seconds before the first retry; doubled each time
BACKOFF_MAX = 600.0
MAX_ATTEMPTS = 20  # a delivery is given up after at least this many attempts ...
GIVE_UP_AFTER = 86400.0  # ... spread over at least a day since its first failure
CLAIM_SECONDS = 300.0  # longer than any one send (every network call has a timeout)


def backoff(attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: 5, 10, 20 ... capped at 10 minutes."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, min(attempts - 1, 20)))


def new_delivery(
    delivery_id: str,
    *,
    event_id: str,
    kind: str,
    channel: str,
    target: str,
    now: float,
    task_id: str | None = None,
    **content: Any,
) -> dict[str, Any]:
    """A pending delivery due now. ``content``: ``subject`` and ``body`` (mail), or ``body``
    and ``webhook`` (the index of the webhook in the settings) for a webhook."""
    return {
        "_id": delivery_id,
        "version": SCHEMA_VERSION,
        "event_id": event_id,
        "kind": kind,
        "task_id": task_id,
        "channel": channel,
        "target": target,
        "status": "pending",
        "attempts": 0,
        "claims": 0,
        "next_at_ts": float(now),
        "created_ts": float(now),
        "first_failure_ts": None,
        "last_error": None,
        "sent_ts": None,
        "sent_at": None,
        **content,
    }


class Deliveries:
    """The deliveries of the store, with the rules of their life (claim, sent, retried)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def ensure_indexes(self) -> None:
        self.store.ensure_alert_indexes()

    def insert(self, docs: list[dict[str, Any]]) -> int:
        """Insert pending deliveries; those already there are left as they are. Returns how
        many are new."""
        return self.store.insert_deliveries(docs)

    def due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Pending deliveries whose time has come, oldest due first."""
        return self.store.deliveries_due(now, limit)

    def _replace(self, doc: dict[str, Any], new: dict[str, Any], what: str) -> bool:
        return self.store.replace_delivery(doc, new, what)

    def claim(self, doc: dict[str, Any], now: float, holder: str) -> dict[str, Any] | None:
        """Take ``doc`` for sending; None when another notifier took it first."""
        if doc.get("status") != "pending":
            return None
        claimed = {
            **doc,
            "claims": doc["claims"] + 1,
            "next_at_ts": float(now) + CLAIM_SECONDS,
            "claimed_by": holder,
        }
        return claimed if self._replace(doc, claimed, "claim a delivery") else None

    def mark_sent(self, doc: dict[str, Any], now: float) -> None:
        sent = {
            **doc,
            "status": "sent",
            "attempts": doc["attempts"] + 1,
            "sent_ts": float(now),
            "sent_at": stored_time(now),
        }
        if not self._replace(doc, sent, "mark a delivery sent"):
            log.warning("delivery %s was sent, but its claim had run out meanwhile", doc["_id"])

    def mark_failed_attempt(self, doc: dict[str, Any], now: float, error: str) -> str:
        """Record a failed attempt: retried after the backoff, or "failed" for good once it has
        failed MAX_ATTEMPTS times over at least GIVE_UP_AFTER. Returns the new status."""
        attempts = doc["attempts"] + 1
        first = doc.get("first_failure_ts") or float(now)
        # a test mail (``once``) is never retried: its sender waits for this one answer
        give_up = bool(doc.get("once")) or (
            attempts >= MAX_ATTEMPTS and now - first >= GIVE_UP_AFTER
        )
        new = {
            **doc,
            "attempts": attempts,
            "first_failure_ts": first,
            "last_error": error,
            "last_attempt_ts": float(now),
            "status": "failed" if give_up else "pending",
            "next_at_ts": float(now) + backoff(attempts),
        }
        self._replace(doc, new, "record a failed delivery")
        return new["status"]

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        return self.store.get_delivery(delivery_id)

    def for_event(self, event_id: str) -> list[dict[str, Any]]:
        return self.store.deliveries_for_event(event_id)
