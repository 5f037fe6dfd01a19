"""Users, roles, passwords and API tokens (stored in MongoDB's ``users`` collection).

Roles, each including the ones after it: ``admin`` (users, settings), ``operator`` (tasks,
files, runs), ``viewer`` (read only). Passwords are hashed with werkzeug (scrypt); API tokens
are random, shown once, and stored only as their sha256, each with a short random ``id`` (to
list and revoke it), its name, when it was made and when it was last used (noted at most once
a minute per token, so an API request does not cost a write). There is no default password:
the first admin is made with ``cloudtask user add NAME --role admin``.

Guard rails: an admin cannot disable, demote or delete their own account, and the last enabled
admin can never be disabled, demoted or deleted (:class:`~cloudtask.exceptions.Conflict`).

Sessions: the web site's sessions are stored on the server (:mod:`cloudtask.store.sessions`).
A new password (set by the user or reset by an admin), a role change, disabling or deleting
the account end every session of the user at once (the web site then renews the one session
that changed its own password); the user's ``session_epoch`` moves on as well, and a session
naming an older epoch is refused, whatever is stored.

API tokens may expire (``expires_at``, epoch seconds) and may be read-only (``scope``
``"read"``: GET and HEAD only, whatever the user's role; ``"all"`` otherwise).
:meth:`Users.token_user` tells an expired token from an unknown one, so the API can say so.

Login timing: :meth:`Users.authenticate` always checks a password hash (a dummy one for an
unknown name) before it looks at anything else, so an unknown user, a disabled one and a wrong
password take the same time.

Directory and OpenID Connect users (``source`` ``"ldap"`` or ``"oidc"``; local accounts have
none, or ``"local"``): the directory or the provider checks who they are, and
:meth:`Users.sign_in_external` creates or updates their record at each login: the role the
groups (or claims) map to, the groups, when they were checked, and for OpenID Connect the
provider's subject (``issuer#sub``), which must not change for a name. Such a record has no
password: :meth:`Users.authenticate` never accepts one for it and :meth:`Users.set_password`
refuses to set one. A local account's name is never taken over: a directory or provider user
of that name is refused. When the directory or the provider no longer vouches for a user (gone,
or in no mapped group), :meth:`Users.refuse_external` marks the record ``refused``: every
session ends at once and its API tokens stop working, until a login is accepted again. An
admin may still disable such a user (which the next login does not undo). Roles given by the
directory are not held to the last-admin guard rail: the directory decides.

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
from datetime import datetime, timezone
from typing import Any, TypeVar

from werkzeug.security import check_password_hash, generate_password_hash

from .clock import to_bson_time, utcnow
from .exceptions import CloudTaskError, Conflict, NotFound, Problem, ValidationError
from .runmodel import SCHEMA_VERSION
from .store import Store

T = TypeVar("T")

ROLES = ("admin", "operator", "viewer")
SOURCES = ("local", "ldap", "oidc")  # who checks a user's password: CloudTask or another
SOURCE_NAMES = {
    "local": "a local account",
    "ldap": "a directory (LDAP) account",
    "oidc": "an OpenID Connect account",
}
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
MIN_PASSWORD = 10
MAX_TOKEN_NAME = 64
MAX_TOKEN_DAYS = 3650  # a token's expiry: at most ten years ahead
TOKEN_SCOPES = ("all", "read")
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


def public_token(entry: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A token as it may be shown: id, name, created_at, last_used_at and expires_at (epoch s
    or None), scope (``all`` or ``read``) and whether it has expired."""
    expires = entry.get("expires_at")
    now = time.time() if now is None else now
    return {
        "id": entry.get("id", ""),
        "name": entry.get("name", ""),
        "created_at": entry.get("created_at"),
        "last_used_at": entry.get("last_used_at"),
        "expires_at": expires,
        "expired": isinstance(expires, (int, float)) and expires <= now,
        "scope": token_scope(entry),
    }


def token_scope(entry: dict[str, Any]) -> str:
    """``read`` for a read-only token, else ``all`` (tokens made before scopes too)."""
    return "read" if entry.get("scope") == "read" else "all"


def token_expiry_problem(
    expires_in_days: Any = None, expires_at: Any = None, now: float | None = None
) -> tuple[float | None, str | None]:
    """(the expiry as epoch seconds or None, a problem or None) from ``expires_in_days`` (a
    whole number of days from now, 1 to MAX_TOKEN_DAYS) or ``expires_at`` (epoch seconds or a
    datetime, in the future); give at most one."""
    now = time.time() if now is None else now
    if expires_in_days in (None, "") and expires_at in (None, ""):
        return None, None
    if expires_in_days not in (None, "") and expires_at not in (None, ""):
        return None, "give expires_in (days) or expires_at, not both"
    if expires_in_days not in (None, ""):
        days = expires_in_days
        if isinstance(days, str) and days.strip().isdigit():
            days = int(days.strip())
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_TOKEN_DAYS:
            return None, f"expires_in: a whole number of days from 1 to {MAX_TOKEN_DAYS}"
        return round(now + days * 86400.0, 3), None
    when = expires_at
    if isinstance(when, datetime):
        when = when.timestamp() if when.tzinfo else when.replace(tzinfo=timezone.utc).timestamp()
    if isinstance(when, bool) or not isinstance(when, (int, float)) or when != when:
        return None, "expires_at: a time (epoch seconds)"
    if when <= now:
        return None, "expires_at: must be in the future"
    if when > now + MAX_TOKEN_DAYS * 86400.0:
        return None, f"expires_at: at most {MAX_TOKEN_DAYS} days ahead"
    return round(float(when), 3), None


def source_of(doc: dict[str, Any]) -> str:
    """Who checks the user's password: ``local`` (CloudTask), ``ldap`` or ``oidc``."""
    source = doc.get("source")
    return source if source in SOURCES else "local"


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A user as pages and the API may show it: no password hash, no token hashes."""
    return {
        "username": doc["username"],
        "role": doc.get("role", "viewer"),
        "enabled": bool(doc.get("enabled")),
        "created_at": doc.get("created_at"),
        "tokens": [public_token(t) for t in doc.get("tokens") or []],
        "source": source_of(doc),
        "refused": bool(doc.get("refused")),
    }


class ExternalRefusal(CloudTaskError):
    """A directory or provider user who may not log in here; ``reason`` is a short code for
    the audit log (``local_account``, ``other_source``, ``other_subject``, ``disabled``,
    ``bad_name``), the message says it to the user."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
        """The user, if the password is right and the account enabled; else None. A hash is
        checked in every case (a dummy one for an unknown name, the stored one for a disabled
        account), so the answer takes the same time whatever was wrong."""
        try:
            doc: dict[str, Any] | None = self.get(username) if isinstance(username, str) else None
        except NotFound:
            doc = None
        stored = (doc or {}).get("password_hash")
        if not isinstance(stored, str) or not stored:
            stored = _DUMMY_HASH
        try:
            right = check_password_hash(stored, password if isinstance(password, str) else "")
        except (ValueError, TypeError):  # a damaged stored hash: never a login
            right = False
        if doc is None or not right or not doc.get("enabled") or stored is _DUMMY_HASH:
            return None
        if source_of(doc) != "local":  # the directory or the provider checks this one
            return None
        return doc

    @staticmethod
    def _local_only(doc: dict[str, Any], what: str) -> None:
        source = source_of(doc)
        if source != "local":
            where = "the directory (LDAP)" if source == "ldap" else "the OpenID Connect provider"
            raise ValidationError(
                [
                    Problem(
                        "password",
                        f"cannot {what} for {doc['_id']!r}: {SOURCE_NAMES[source]}, whose "
                        f"password is kept by {where}; change it there",
                    )
                ],
                source="the user",
            )

    # --- directory and OpenID Connect users ---------------------------------------------------

    def sign_in_external(
        self,
        username: str,
        source: str,
        role: str,
        *,
        subject: str = "",
        groups: builtins.list[str] | tuple[str, ...] = (),
        create: bool = True,
        now: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Create or update the record of a user the directory or provider (``source``)
        vouched for, with the ``role`` their groups map to: (the user, what changed:
        ``created`` and ``role``, the old and new role when it changed). A role change ends
        the user's other sessions. ``create=False``: only update (a re-check). Raises
        :class:`ExternalRefusal` for a name that is a local account's (or another source's),
        an OpenID Connect subject other than the one the name was first seen with, a
        disabled account, or a name that cannot be a user's."""
        if source not in ("ldap", "oidc"):
            raise ValueError(f"not a source of external users: {source!r}")
        if role not in ROLES:
            raise ValueError(f"not a role: {role!r}")
        if not isinstance(username, str) or not _USERNAME.fullmatch(username):
            raise ExternalRefusal(
                f"the name {username!r} cannot be a CloudTask user name (1 to 64 letters, "
                "digits, '.', '_', '@' or '-'); ask an admin",
                "bad_name",
            )
        now = time.time() if now is None else now
        doc, changes = self._sign_in_external(
            username, source, role, subject, builtins.list(groups), create, now
        )
        if changes.get("role"):
            self.end_sessions(username)
        return doc, changes

    @_retrying
    def _sign_in_external(
        self,
        username: str,
        source: str,
        role: str,
        subject: str,
        groups: builtins.list[str],
        create: bool,
        now: float,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        doc = self.store.find_user(username)
        if doc is None:
            if not create:
                raise NotFound(f"no user named {username!r}")
            doc = {
                "_id": username,
                "version": SCHEMA_VERSION,
                "username": username,
                "source": source,
                "subject": subject,
                "role": role,
                "enabled": True,
                "created_at": to_bson_time(utcnow()),
                "tokens": [],
                "groups": groups,
                "checked_at": round(now, 3),
            }
            try:
                self.store.insert_user(doc)
            except Conflict:
                raise _Stale(username) from None  # made at the same moment: update it
            return doc, {"created": True, "role": None}
        have = source_of(doc)
        if have != source:
            if have == "local":
                message = (
                    f"{username!r} is a local CloudTask account: it logs in with its own "
                    "password, not through "
                    + ("the directory" if source == "ldap" else "single sign-on")
                )
                raise ExternalRefusal(message, "local_account")
            raise ExternalRefusal(
                f"{username!r} is {SOURCE_NAMES[have]}: log in the way it was made", "other_source"
            )
        if subject and doc.get("subject") and doc.get("subject") != subject:
            raise ExternalRefusal(
                f"the name {username!r} belongs to another account of the provider; ask an admin",
                "other_subject",
            )
        if not doc.get("enabled"):
            raise ExternalRefusal(
                f"the account {username!r} is disabled in CloudTask; ask an admin", "disabled"
            )
        old = doc.get("role")
        doc["role"] = role
        doc["groups"] = groups
        doc["checked_at"] = round(now, 3)
        if subject:
            doc["subject"] = subject
        was_refused = bool(doc.pop("refused", None))
        if old != role:
            doc["session_epoch"] = int(doc.get("session_epoch") or 0) + 1
        self._replace(doc)
        changes: dict[str, Any] = {"created": False, "role": (old, role) if old != role else None}
        changes["restored"] = was_refused
        return doc, changes

    def refuse_external(self, username: str, source: str, reason: str) -> bool:
        """The directory or provider (``source``) no longer vouches for the user (``reason``,
        in words): the record is marked ``refused``, every session of the user ends and their
        API tokens stop working, until a login is accepted again. Returns True when the user
        had not been refused already (so the caller audits it once); False also when there
        is no such user of that source."""
        try:
            changed = self._refuse_external(username, source, reason)
        except NotFound:
            return False
        self.end_sessions(username)
        return changed

    @_retrying
    def _refuse_external(self, username: str, source: str, reason: str) -> bool:
        doc = self.get(username)
        if source_of(doc) != source:
            return False
        changed = not doc.get("refused")
        doc["refused"] = {"at": round(time.time(), 3), "reason": reason}
        doc["session_epoch"] = int(doc.get("session_epoch") or 0) + 1
        self._replace(doc)
        return changed

    def end_sessions(self, username: str, keep: str | None = None) -> int:
        """End the user's web sessions at once (all but the one keyed ``keep``)."""
        return self.store.delete_user_sessions(username, keep)

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
        self._local_only(self.get(username), "set a password")
        password_hash = generate_password_hash(password)  # slow: outside the retried part
        return self._set_password_hash(username, password_hash)

    def _set_password_hash(self, username: str, password_hash: str) -> dict[str, Any]:
        doc = self._write_password_hash(username, password_hash)
        self.end_sessions(username)
        return doc

    @_retrying
    def _write_password_hash(self, username: str, password_hash: str) -> dict[str, Any]:
        doc = self.get(username)
        doc["password_hash"] = password_hash
        doc["session_epoch"] = int(doc.get("session_epoch") or 0) + 1
        self._replace(doc)
        return doc

    def set_role(self, username: str, role: str, by: str | None = None) -> str:
        """Change the user's role; returns the previous one. ``by`` is the admin doing it:
        nobody demotes their own admin account, and the last enabled admin stays admin. A
        change ends the user's sessions (they log in again under the new role)."""
        old = self._set_role(username, role, by)
        if old != role:
            self.end_sessions(username)
        return old

    @_retrying
    def _set_role(self, username: str, role: str, by: str | None) -> str:
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
        doc["session_epoch"] = int(doc.get("session_epoch") or 0) + 1
        self._replace(doc)
        if was_enabled_admin:
            self._verify_an_admin_left(doc, old_role=old)
        return old

    def set_enabled(self, username: str, enabled: bool, by: str | None = None) -> bool:
        """Enable or disable the account (a disabled user cannot log in, their sessions end
        and their API tokens stop working); returns the previous state. ``by`` is the admin
        doing it: nobody disables their own account, and the last enabled admin stays
        enabled."""
        old = self._set_enabled(username, enabled, by)
        if not enabled:
            self.end_sessions(username)
        return old

    @_retrying
    def _set_enabled(self, username: str, enabled: bool, by: str | None) -> bool:
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

    def delete(self, username: str, by: str | None = None) -> dict[str, Any]:
        """Delete the account, its API tokens and its sessions; returns what it was. ``by`` is
        the admin doing it: nobody deletes their own account, and the last enabled admin
        stays."""
        doc = self._delete(username, by)
        self.end_sessions(username)
        return doc

    @_retrying
    def _delete(self, username: str, by: str | None) -> dict[str, Any]:
        doc = self.get(username)
        if by == username:
            raise Conflict("you cannot delete your own account: ask another admin")
        if doc.get("role") == "admin":
            self._keep_an_admin(doc, f"delete {username!r}")
        if not self.store.delete_user_doc(username, doc.get("rev")):
            raise _Stale(username)
        if doc.get("role") == "admin" and doc.get("enabled") and not self.enabled_admins():
            self.store.insert_user(doc)  # another admin went at the same moment: put it back
            raise Conflict(
                f"cannot delete {username!r}: no enabled admin would be left "
                "(another admin was changed at the same moment); try again"
            )
        return doc

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

    def add_token(
        self,
        username: str,
        name: str,
        *,
        expires_in_days: Any = None,
        expires_at: Any = None,
        scope: str = "all",
    ) -> tuple[str, str]:
        """A new API token for the user: (its id, the token). The token is returned only
        here; only its sha256 is stored. ``expires_in_days`` (days from now) or
        ``expires_at`` (epoch seconds) make it expire; ``scope`` ``"read"`` makes it
        read-only (GET and HEAD)."""
        problems = []
        if problem := token_name_problem(name):
            problems.append(Problem("name", problem))
        expires, problem = token_expiry_problem(expires_in_days, expires_at)
        if problem:
            path, _, message = problem.partition(": ")
            problems.append(Problem(path if message else "expires_in", message or problem))
        if scope not in TOKEN_SCOPES:
            problems.append(
                Problem("scope", f"expected one of {', '.join(TOKEN_SCOPES)}, got {scope!r}")
            )
        if problems:
            raise ValidationError(problems, source="the token")
        return self._add_token(username, name, expires, scope)

    @_retrying
    def _add_token(
        self, username: str, name: str, expires: float | None, scope: str
    ) -> tuple[str, str]:
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
                "expires_at": expires,
                "scope": scope,
            }
        )
        self._replace(doc)
        return token_id, token

    def create_token(self, username: str, name: str, **options: Any) -> str:
        """A new API token for the user: returned once, stored only as its hash (``options``:
        see :meth:`add_token`)."""
        return self.add_token(username, name, **options)[1]

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
        """The enabled user owning this API token, if it has not expired; else None."""
        doc, _, _ = self.token_user(token)
        return doc

    def token_user(
        self, token: str, now: float | None = None
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
        """(the enabled user owning this API token, the token's entry, None), or (None, None,
        why it is refused). Runs on every API request: it notes the token's use only when the
        stored note is over a minute old. An expired token says when it expired."""
        refused = "the API token is not valid (unknown, revoked, or its user is disabled)"
        if not isinstance(token, str) or not token or len(token) > 512:
            return None, None, refused
        hashed = token_hash(token)
        doc = self.store.user_by_token_hash(hashed)
        if doc is None or not doc.get("enabled") or doc.get("refused"):
            return None, None, refused
        entry = next((t for t in doc.get("tokens") or [] if t.get("hash") == hashed), None)
        if entry is None:
            return None, None, refused
        expires = entry.get("expires_at")
        now = time.time() if now is None else now
        if isinstance(expires, (int, float)) and expires <= now:
            when = datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            name, token_id = entry.get("name", ""), entry.get("id", "")
            expired = f"the API token {name!r} ({token_id}) expired at {when} UTC"
            return None, None, f"{expired}: ask an admin for a new one"
        self._note_use(doc["_id"], entry)
        return doc, entry, None

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
