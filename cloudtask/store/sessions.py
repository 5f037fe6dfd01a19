"""The web site's logged-in sessions (``sessions`` collection), kept on the server.

The rules (timeouts, ids, what a session holds) are :mod:`web.sessions`'; this module only
reads and writes. A session document is keyed by the sha256 of the random id its cookie
carries (the database never holds a usable cookie), names its ``user`` (so every session of a
user can be ended at once) and holds its data serialized as text. Times are epoch seconds
(numbers compare alike on every server; the wire server used on one machine turns dates
written with ``$set`` into text): ``idle_until`` moves on as the session is used, at most
once a minute; ``absolute_until`` never moves. A TTL index on ``expire_at`` (a date: the
absolute end, written whole with the document) drops what is left at the end, and
:meth:`sweep_sessions` deletes idle ones (servers without a TTL monitor too).

A session is saved only over a stored one (``replace_one`` without upsert): a request that
loaded a session just before it was ended (a logout elsewhere, a password reset) cannot
bring it back by saving it afterwards.
"""

from __future__ import annotations

import threading
from typing import Any

from pymongo import ASCENDING

from .base import StoreBase, guard

SESSIONS = "sessions"


class SessionRecords(StoreBase):
    """Server-side web sessions."""

    _sessions_indexed = False
    _sessions_lock = threading.Lock()

    def _sessions(self) -> Any:
        collection = self.db[SESSIONS]
        if not self._sessions_indexed:
            with self._sessions_lock:
                if not self._sessions_indexed:
                    guard(
                        collection.create_index,
                        "index the sessions",
                        [("expire_at", ASCENDING)],
                        expireAfterSeconds=0,
                        name="expire",
                    )
                    guard(
                        collection.create_index,
                        "index the sessions",
                        [("user", ASCENDING)],
                        name="user",
                    )
                    self._sessions_indexed = True
        return collection

    def insert_session(self, doc: dict[str, Any]) -> None:
        guard(self._sessions().insert_one, "store the session", doc)

    def find_session(self, key: str) -> dict[str, Any] | None:
        return guard(self._sessions().find_one, "read the session", {"_id": key})

    def replace_session(self, doc: dict[str, Any]) -> bool:
        """Write the session whole if it is still stored; False if it was ended meanwhile."""
        result = guard(self._sessions().replace_one, "store the session", {"_id": doc["_id"]}, doc)
        return bool(result.matched_count)

    def touch_session(self, key: str, seen: float, idle_until: float) -> bool:
        """Note the session's use (numbers only); False if it was ended meanwhile."""
        result = guard(
            self._sessions().update_one,
            "note the session's use",
            {"_id": key},
            {"$set": {"seen": seen, "idle_until": idle_until}},
        )
        return bool(result.matched_count)

    def delete_session(self, key: str) -> None:
        guard(self._sessions().delete_one, "end the session", {"_id": key})

    def delete_user_sessions(self, username: str, keep: str | None = None) -> int:
        """End every session of ``username`` (but the one keyed ``keep``); how many ended."""
        query: dict[str, Any] = {"user": {"$eq": username}}
        if keep:
            query["_id"] = {"$ne": keep}
        result = guard(self._sessions().delete_many, "end the user's sessions", query)
        return int(result.deleted_count)

    def sweep_sessions(self, now: float) -> None:
        """Delete sessions past their idle or absolute end."""
        guard(
            self._sessions().delete_many,
            "delete expired sessions",
            {"$or": [{"idle_until": {"$lt": now}}, {"absolute_until": {"$lt": now}}]},
        )
