"""User accounts and their API tokens (``users`` collection).

The rules (roles, password and token checks, the last-admin guard rails) are
:mod:`cloudtask.users`'; this module only reads and writes. User documents are always written
whole (``replace_one``, conditional on the document's ``rev``): the MongoDB wire server used on
one machine turns booleans and dates written with ``$set`` into numbers and strings. The only
partial write is a token's ``last_used_at``, a plain number (epoch seconds).
"""

from __future__ import annotations

from typing import Any

from pymongo.errors import DuplicateKeyError, PyMongoError

from ..exceptions import Conflict, Problem
from .base import guard, read_all
from .sessions import SessionRecords


class UserRecords(SessionRecords):
    """User documents (and, through :class:`~cloudtask.store.sessions.SessionRecords`, their
    web sessions)."""

    def insert_user(self, doc: dict[str, Any]) -> None:
        """Store a new user; Conflict when the name is taken."""
        try:
            guard(self.users.insert_one, "store the user", doc)
        except DuplicateKeyError:
            message = f"a user named {doc['_id']!r} already exists"
            problem = Problem("username", f"{message}: choose another name")
            raise Conflict(message, [problem]) from None

    def find_user(self, username: str) -> dict[str, Any] | None:
        return guard(self.users.find_one, "read the user", {"_id": username})

    def replace_user(self, doc: dict[str, Any], rev: int | None) -> bool:
        """Write ``doc`` whole if the stored user is still at ``rev``; False if it changed."""
        match = {"_id": doc["_id"], "rev": rev if rev is not None else {"$in": [None]}}
        result = guard(self.users.replace_one, "update the user", match, doc)
        return bool(result.matched_count)

    def delete_user_doc(self, username: str, rev: int | None) -> bool:
        """Delete the user if it is still at ``rev``; False if it changed meanwhile."""
        match = {"_id": username, "rev": rev if rev is not None else {"$in": [None]}}
        result = guard(self.users.delete_one, "delete the user", match)
        return bool(result.deleted_count)

    def enabled_admin_names(self) -> list[str]:
        """The names of the enabled admins, sorted (flags read by truthiness: see above)."""
        cursor = self.users.find({"role": "admin"}, {"enabled": 1})
        return sorted(d["_id"] for d in read_all(cursor, "read the admins") if d.get("enabled"))

    def list_user_docs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The stored users by name (at most ``limit``, if given)."""
        cursor = self.users.find({}).sort("_id", 1).limit(limit or 0)
        return read_all(cursor, "list the users")

    def user_by_token_hash(self, hashed: str) -> dict[str, Any] | None:
        return guard(self.users.find_one, "find the token", {"tokens.hash": hashed})

    def note_token_use(self, username: str, hashed: str, at: float) -> None:
        """Set one token's ``last_used_at``: one number in one array element, atomic, so it never
        undoes a concurrent change of the user (a role, a disable) the way writing back the
        whole document would. Best effort: a failure is ignored."""
        try:
            self.users.update_one(
                {"_id": username, "tokens.hash": hashed},
                {"$set": {"tokens.$.last_used_at": at}},
            )
        except PyMongoError:
            pass  # a convenience: the request goes on without it
