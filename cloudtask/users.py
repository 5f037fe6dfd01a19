"""Users, roles, passwords and API tokens (stored in MongoDB's ``users`` collection).

Roles, each including the ones after it: ``admin`` (users, settings), ``operator`` (tasks,
files, runs), ``viewer`` (read only). Passwords are hashed with werkzeug (scrypt); API tokens
are random, shown once, and stored only as their sha256, each with a short random ``id`` (to
list and revoke it), its name, when it was made and when it was last used (noted at most once
a minute per token, so an API request does not cost a write). There is no default password:
the first admin is made with ``cloudtask user add NAME --role admin``.

Guard rails: an admin cannot disable or demote their own account, and the last enabled admin
can never be disabled or demoted (:class:`~cloudtask.exceptions.Conflict`).

The documents are read and written by :mod:`cloudtask.store.users` (always whole, but for a
token's ``last_used_at``).

What pages and the API may show of a user comes from :func:`public` (or :meth:`Users.list`,
:meth:`Users.list_tokens`): never a password hash or a token hash.

Example::

    users = Users(store)
    users.add("alice", "a long passphrase", role="admin")
    user = users.authenticate("alice", "a long passphrase")
    token = users.create_token("alice", "ci")
    token_id, token = users.add_token("alice", "deploy")
    users.revoke_token("alice", token_id)
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import random
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from werkzeug.security import check_password_hash, generate_password_hash

from .clock import to_bson_time, utcnow
from .exceptions import Conflict, NotFound, Problem, ValidationError
from .runmodel import SCHEMA_VERSION
from .store import Store

T = TypeVar("T")

ROLES = ("admin", "operator", "viewer")
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
MIN_PASSWORD = 10
MAX_TOKEN_NAME = 64
MAX_LISTED_USERS = 1000
LAST_USED_EVERY = 60.0  # seconds: how stale a token's last_used_at may get before a write
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def has_role(user_role: str, needed: str) -> bool:
    """Whether ``user_role`` may do what ``needed`` may (admin > operator > viewer)."""
    return ROLE_RANK.get(user_role, -1) >= ROLE_RANK[needed]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token_id() -> str:
    return secrets.token_hex(4)


def public_token(entry: dict[str, Any]) -> dict[str, Any]:
    """A token as it may be shown: id, name, created_at, last_used_at (epoch s or None)."""
    return {
        "id": entry.get("id", ""),
        "name": entry.get("name", ""),
        "created_at": entry.get("created_at"),
        "last_used_at": entry.get("last_used_at"),
    }


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A user as pages and the API may show it: no password hash, no token hashes."""
    return {
        "username": doc["username"],
        "role": doc.get("role", "viewer"),
        "enabled": bool(doc.get("enabled")),
        "created_at": doc.get("created_at"),
        "tokens": [public_token(t) for t in doc.get("tokens") or []],
    }


def token_name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "give the token a name, such as what it is for (ci, backup-script)"
    if len(name) > MAX_TOKEN_NAME:
        return f"at most {MAX_TOKEN_NAME} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "one line of text, without control characters"
    return None


class _Stale(Exception):
    """The user changed between our read and our write."""


def _retrying(method: Callable[..., T]) -> Callable[..., T]:
    """Run a read-change-write of a user again when another change got in between."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        for attempt in range(10):
            try:
                return method(*args, **kwargs)
            except _Stale:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # let the other one finish
        raise Conflict("the user is being changed by someone else right now; try again")

    return wrapped


class Users:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _check(self, username: str, password: str | None, role: str | None) -> None:
        if problems := self.problems(username, password, role):
            raise ValidationError(problems, source="the user")

    @staticmethod
    def problems(username: str, password: str | None, role: str | None) -> builtins.list[Problem]:
        """What is wrong with a user name, a password and a role (None: not checked)."""
        problems = []
        if not isinstance(username, str) or not _USERNAME.fullmatch(username):
            problems.append(
                Problem("username", "use 1 to 64 letters, digits, '.', '_', '@' or '-'")
            )
        if password is not None and len(password) < MIN_PASSWORD:
            problems.append(Problem("password", f"must be at least {MIN_PASSWORD} characters"))
        if role is not None and role not in ROLES:
            problems.append(Problem("role", f"expected one of {', '.join(ROLES)}, got {role!r}"))
        return problems

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
        self.store.insert_user(doc)
        return doc

    def get(self, username: str) -> dict[str, Any]:
        doc = self.store.find_user(username)
        if doc is None:
            raise NotFound(f"no user named {username!r}")
        return doc

    def count_admins(self) -> int:
        """How many enabled admins there are."""
        return len(self.enabled_admins())

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
        """Write the user back only if nobody changed it since it was read (its ``rev``), so
        two changes at once (a revoke during a password reset) never undo each other: the
        loser raises _Stale and :func:`_retrying` applies it again to the fresh document."""
        rev = doc.get("rev")
        doc["rev"] = (rev or 0) + 1
        if not self.store.replace_user(doc, rev):
            doc["rev"] = rev
            raise _Stale(doc["_id"])

    def set_password(self, username: str, password: str) -> dict[str, Any]:
        """Set a new password; the user's open sessions end (their ``session_epoch`` moves
        on). Returns the updated user."""
        self._check(username, password, None)
        password_hash = generate_password_hash(password)  # slow: outside the retried part
        return self._set_password_hash(username, password_hash)

    @_retrying
    def _set_password_hash(self, username: str, password_hash: str) -> dict[str, Any]:
        doc = self.get(username)
        doc["password_hash"] = password_hash
        doc["session_epoch"] = int(doc.get("session_epoch") or 0) + 1
        self._replace(doc)
        return doc

    @_retrying
    def set_role(self, username: str, role: str, by: str | None = None) -> str:
        """Change the user's role; returns the previous one. ``by`` is the admin doing it:
        nobody demotes their own admin account, and the last enabled admin stays admin."""
        self._check(username, None, role)
        doc = self.get(username)
        old = doc.get("role", "viewer")
        if old == role:
            return old
        if old == "admin":
            self._keep_an_admin(doc, f"change the role of {username!r}")
            if by == username:
                raise Conflict(
                    "you cannot take the admin role from your own account: ask another admin"
                )
        was_enabled_admin = old == "admin" and bool(doc.get("enabled"))
        doc["role"] = role
        self._replace(doc)
        if was_enabled_admin:
            self._verify_an_admin_left(doc, old_role=old)
        return old

    @_retrying
    def set_enabled(self, username: str, enabled: bool, by: str | None = None) -> bool:
        """Enable or disable the account (a disabled user cannot log in, their sessions and
        API tokens stop working); returns the previous state. ``by`` is the admin doing it:
        nobody disables their own account, and the last enabled admin stays enabled."""
        doc = self.get(username)
        old = bool(doc.get("enabled"))
        if old == bool(enabled):
            return old
        if not enabled:
            if doc.get("role") == "admin":
                self._keep_an_admin(doc, f"disable {username!r}")
            if by == username:
                raise Conflict("you cannot disable your own account: ask another admin")
        doc["enabled"] = bool(enabled)
        if not enabled:  # their open sessions end, and stay ended if they are enabled again
            doc["session_epoch"] = int(doc.get("session_epoch") or 0) + 1
        self._replace(doc)
        if not enabled and doc.get("role") == "admin":
            self._verify_an_admin_left(doc, old_enabled=old)
        return old

    def enabled_admins(self) -> builtins.list[str]:
        """The names of the enabled admins (flags read by truthiness, see the module doc)."""
        return self.store.enabled_admin_names()

    def _keep_an_admin(self, doc: dict[str, Any], what: str) -> None:
        if doc.get("enabled") and not [a for a in self.enabled_admins() if a != doc["_id"]]:
            raise Conflict(
                f"cannot {what}: {doc['_id']!r} is the last enabled admin; "
                "make another user admin first"
            )

    def _verify_an_admin_left(self, doc: dict[str, Any], **previous: Any) -> None:
        """After an enabled admin was demoted or disabled. Two admins demoting each other at the
        same moment both pass the check before the write: the one who finds no enabled admin
        left afterwards puts its user back and refuses, so one admin always remains."""
        if self.enabled_admins():
            return
        if "old_role" in previous:
            doc["role"] = previous["old_role"]
        if "old_enabled" in previous:
            doc["enabled"] = previous["old_enabled"]
        self._replace(doc)
        raise Conflict(
            f"cannot change {doc['_id']!r}: no enabled admin would be left "
            "(another admin was changed at the same moment); try again"
        )

    def list(self, limit: int = MAX_LISTED_USERS) -> builtins.list[dict[str, Any]]:
        """Every user (at most ``limit``) by name, as :func:`public` shows them."""
        return [public(d) for d in self.store.list_user_docs(limit)]

    # --- API tokens -------------------------------------------------------------------------

    @_retrying
    def add_token(self, username: str, name: str) -> tuple[str, str]:
        """A new API token for the user: (its id, the token). The token is returned only
        here; only its sha256 is stored."""
        if problem := token_name_problem(name):
            raise ValidationError([Problem("name", problem)], source="the token")
        doc = self.get(username)
        tokens = self._with_ids(doc)
        token = "ct_" + secrets.token_urlsafe(32)
        token_id = new_token_id()
        while any(t["id"] == token_id for t in tokens):
            token_id = new_token_id()
        tokens.append(
            {
                "id": token_id,
                "name": name.strip(),
                "hash": token_hash(token),
                "created_at": to_bson_time(utcnow()),
                "last_used_at": None,
            }
        )
        self._replace(doc)
        return token_id, token

    def create_token(self, username: str, name: str) -> str:
        """A new API token for the user: returned once, stored only as its hash."""
        return self.add_token(username, name)[1]

    @_retrying
    def list_tokens(self, username: str) -> builtins.list[dict[str, Any]]:
        """The user's tokens, oldest first, as :func:`public_token` shows them."""
        doc = self.get(username)
        if any(not t.get("id") for t in doc.get("tokens") or []):
            self._with_ids(doc)
            self._replace(doc)
        return [public_token(t) for t in doc.get("tokens") or []]

    @_retrying
    def revoke_token(self, username: str, token_id: str) -> dict[str, Any]:
        """Delete one of the user's tokens (it stops working at once); returns what it was."""
        doc = self.get(username)
        tokens = self._with_ids(doc)
        kept = [t for t in tokens if t["id"] != token_id]
        if len(kept) == len(tokens):
            raise NotFound(f"{username!r} has no token with id {token_id!r}")
        gone = next(t for t in tokens if t["id"] == token_id)
        doc["tokens"] = kept
        self._replace(doc)
        return public_token(gone)

    @staticmethod
    def _with_ids(doc: dict[str, Any]) -> builtins.list[dict[str, Any]]:
        """The document's token list, giving an id to tokens made before tokens had one."""
        tokens = doc.setdefault("tokens", [])
        for entry in tokens:
            if not entry.get("id"):
                entry["id"] = new_token_id()
        return tokens

    def by_token(self, token: str) -> dict[str, Any] | None:
        """The enabled user owning this API token, or None. Runs on every API request: it
        notes the token's use only when the stored note is over a minute old."""
        hashed = token_hash(token)
        doc = self.store.user_by_token_hash(hashed)
        if doc is None or not doc.get("enabled"):
            return None
        entry = next((t for t in doc.get("tokens") or [] if t.get("hash") == hashed), None)
        if entry is None:
            return None
        self._note_use(doc["_id"], entry)
        return doc

    def _note_use(self, username: str, entry: dict[str, Any]) -> None:
        now = time.time()
        last = entry.get("last_used_at")
        if isinstance(last, (int, float)) and now - last < LAST_USED_EVERY:
            return
        self.store.note_token_use(username, entry["hash"], round(now, 3))
        entry["last_used_at"] = round(now, 3)


_DUMMY_HASH = generate_password_hash("not a password of anyone")


def describe(doc: dict[str, Any]) -> str:
    created = doc.get("created_at")
    when = created.isoformat() if isinstance(created, datetime) else ""
    state = "enabled" if doc.get("enabled") else "disabled"
    return f"{doc['username']}\t{doc['role']}\t{state}\t{when}"
