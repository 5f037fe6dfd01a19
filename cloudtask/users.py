"""Users, roles, passwords and API tokens (stored in MongoDB's ``users`` collection).

Roles, each including the ones after it: ``admin`` (users, settings), ``operator`` (tasks,
files, runs), ``viewer`` (read only). Passwords are hashed with werkzeug (scrypt); API tokens
are random, shown once, and stored only as their sha256. There is no default password: the
first admin is made with ``cloudtask user add NAME --role admin``.

Example::

    users = Users(store)
    users.add("alice", "a long passphrase", role="admin")
    user = users.authenticate("alice", "a long passphrase")
    token = users.create_token("alice", "ci")
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Any

from pymongo.errors import DuplicateKeyError
from werkzeug.security import check_password_hash, generate_password_hash

from .exceptions import Conflict, NotFound, Problem, ValidationError
from .store import SCHEMA_VERSION, Store, to_bson_time, utcnow

ROLES = ("admin", "operator", "viewer")
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
MIN_PASSWORD = 10
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def has_role(user_role: str, needed: str) -> bool:
    """Whether ``user_role`` may do what ``needed`` may (admin > operator > viewer)."""
    return ROLE_RANK.get(user_role, -1) >= ROLE_RANK[needed]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.users = store.users

    def _check(self, username: str, password: str | None, role: str | None) -> None:
        problems = []
        if not _USERNAME.match(username or ""):
            problems.append(
                Problem("username", "use 1 to 64 letters, digits, '.', '_', '@' or '-'")
            )
        if password is not None and len(password) < MIN_PASSWORD:
            problems.append(Problem("password", f"must be at least {MIN_PASSWORD} characters"))
        if role is not None and role not in ROLES:
            problems.append(Problem("role", f"expected one of {', '.join(ROLES)}, got {role!r}"))
        if problems:
            raise ValidationError(problems, source="the user")

    def add(self, username: str, password: str, role: str = "viewer") -> dict[str, Any]:
        self._check(username, password, role)
        now = to_bson_time(utcnow())
        doc = {
            "_id": username,
            "version": SCHEMA_VERSION,
            "username": username,
            "password_hash": generate_password_hash(password),
            "role": role,
            "enabled": True,
            "created_at": now,
            "tokens": [],
        }
        try:
            self.store._guard(self.users.insert_one, "store the user", doc)
        except DuplicateKeyError:
            raise Conflict(f"a user named {username!r} already exists") from None
        return doc

    def get(self, username: str) -> dict[str, Any]:
        doc = self.store._guard(self.users.find_one, "read the user", {"_id": username})
        if doc is None:
            raise NotFound(f"no user named {username!r}")
        return doc

    def count_admins(self) -> int:
        return self.store._guard(
            self.users.count_documents, "count users", {"role": "admin", "enabled": True}
        )

    def authenticate(self, username: str, password: str) -> dict[str, Any] | None:
        """The user, if the password is right and the account enabled; else None."""
        try:
            doc = self.get(username)
        except NotFound:
            check_password_hash(_DUMMY_HASH, password)  # same time whether or not it exists
            return None
        if not doc.get("enabled") or not check_password_hash(doc["password_hash"], password):
            return None
        return doc

    def _replace(self, doc: dict[str, Any]) -> None:
        self.store._guard(self.users.replace_one, "update the user", {"_id": doc["_id"]}, doc)

    def set_password(self, username: str, password: str) -> None:
        self._check(username, password, None)
        doc = self.get(username)
        doc["password_hash"] = generate_password_hash(password)
        self._replace(doc)

    def set_role(self, username: str, role: str) -> None:
        self._check(username, None, role)
        doc = self.get(username)
        doc["role"] = role
        self._replace(doc)

    def set_enabled(self, username: str, enabled: bool) -> None:
        doc = self.get(username)
        doc["enabled"] = enabled
        self._replace(doc)

    def create_token(self, username: str, name: str) -> str:
        """A new API token for the user: returned once, stored only as its hash."""
        doc = self.get(username)
        token = "ct_" + secrets.token_urlsafe(32)
        doc.setdefault("tokens", []).append(
            {"name": name, "hash": token_hash(token), "created_at": to_bson_time(utcnow())}
        )
        self._replace(doc)
        return token

    def by_token(self, token: str) -> dict[str, Any] | None:
        """The enabled user owning this API token, or None."""
        doc = self.store._guard(
            self.users.find_one, "find the token", {"tokens.hash": token_hash(token)}
        )
        return doc if doc is not None and doc.get("enabled") else None


_DUMMY_HASH = generate_password_hash("not a password of anyone")


def describe(doc: dict[str, Any]) -> str:
    created = doc.get("created_at")
    when = created.isoformat() if isinstance(created, datetime) else ""
    state = "enabled" if doc.get("enabled") else "disabled"
    return f"{doc['username']}\t{doc['role']}\t{state}\t{when}"
