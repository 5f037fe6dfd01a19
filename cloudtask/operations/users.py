"""User accounts and API tokens: add, change a role, enable or disable, set a password, delete,
make and revoke tokens; and what happens at the door: logins, failed logins, lockouts and
logouts. The rules (roles, passwords, the last admin, which sessions end) are
:class:`~cloudtask.users.Users`'; here each change is made and audited.

The door's entries: ``auth.login`` (actor and target the user), ``auth.login_failed`` (actor
``anonymous``; target the user when the name given is one, else ``user:(unknown)``: a
password typed into the name field never reaches the log), ``auth.lockout`` (the throttle
started refusing a user or an address, and why) and ``auth.logout``; each notes the client's
address.
"""

from __future__ import annotations

from typing import Any

from ..users import Users
from .base import OperationsBase

UNKNOWN_USER = "user:(unknown)"


class UserOperations(OperationsBase):
    @property
    def users(self) -> Users:
        return Users(self.store)

    def add_user(self, actor: str, username: str, password: str, role: str) -> dict[str, Any]:
        """ValidationError for a bad name, password or role; Conflict (at ``username``) when
        the name is taken."""
        doc = self.users.add(username, password, role)
        after = {"username": username, "role": role, "enabled": True}
        self.audit(actor, "user.create", f"user:{username}", None, after)
        return doc

    def set_role(self, actor: str, username: str, role: str, by: str | None = None) -> str:
        """Change the role; returns the previous one (``by``: the admin doing it, who cannot
        demote themselves). The user's sessions end."""
        old = self.users.set_role(username, role, by=by)
        if old != role:
            self.audit(actor, "user.role", f"user:{username}", {"role": old}, {"role": role})
        return old

    def set_user_enabled(
        self, actor: str, username: str, enabled: bool, by: str | None = None
    ) -> bool:
        """Enable or disable an account; returns the previous state."""
        old = self.users.set_enabled(username, enabled, by=by)
        if old != enabled:
            action = "user.enable" if enabled else "user.disable"
            self.audit(actor, action, f"user:{username}", {"enabled": old}, {"enabled": enabled})
        return old

    def set_password(self, actor: str, username: str, password: str) -> dict[str, Any]:
        """Set a new password: every session of the user ends. Returns the user."""
        doc = self.users.set_password(username, password)
        self.audit(actor, "user.password", f"user:{username}", None, {"password_changed": True})
        return doc

    def delete_user(self, actor: str, username: str, by: str | None = None) -> dict[str, Any]:
        """Delete an account with its API tokens and sessions (``by``: the admin doing it, who
        cannot delete themselves; the last enabled admin stays)."""
        doc = self.users.delete(username, by=by)
        before = {
            "username": username,
            "role": doc.get("role"),
            "enabled": bool(doc.get("enabled")),
            "tokens": len(doc.get("tokens") or []),
        }
        self.audit(actor, "user.delete", f"user:{username}", before, None)
        return doc

    def add_token(
        self,
        actor: str,
        username: str,
        name: str,
        *,
        expires_in_days: Any = None,
        expires_at: Any = None,
        scope: str = "all",
    ) -> tuple[str, str]:
        """A new API token for the user: (its id, the token), shown once; it may expire and
        may be read-only (see :meth:`Users.add_token`)."""
        token_id, token = self.users.add_token(
            username, name, expires_in_days=expires_in_days, expires_at=expires_at, scope=scope
        )
        entry = next(t for t in self.users.list_tokens(username) if t["id"] == token_id)
        after = {
            "token_id": token_id,
            "name": name,
            "scope": entry["scope"],
            "expires_at": entry["expires_at"],
        }
        self.audit(actor, "token.create", f"user:{username}", None, after)
        return token_id, token

    def revoke_token(self, actor: str, username: str, token_id: str) -> dict[str, Any]:
        gone = self.users.revoke_token(username, token_id)
        before = {"token_id": token_id, "name": gone["name"]}
        self.audit(actor, "token.revoke", f"user:{username}", before, None)
        return gone

    # --- the door ---------------------------------------------------------------------------

    def note_login(self, username: str, address: str) -> None:
        self.audit(username, "auth.login", f"user:{username}", None, {"address": address})

    def note_logout(self, username: str, address: str) -> None:
        self.audit(username, "auth.logout", f"user:{username}", None, {"address": address})

    def _door_target(self, username: str) -> str:
        """``user:<name>`` when the name is a user's, else :data:`UNKNOWN_USER` (what was
        typed may be a password)."""
        if isinstance(username, str) and username and self.store.find_user(username):
            return f"user:{username}"
        return UNKNOWN_USER

    def note_login_failure(
        self, username: str, address: str, what: str = "login", actor: str = "anonymous"
    ) -> None:
        """A wrong password (or name), at the login (``what``) or a password change."""
        after = {"address": address, "during": what}
        self.audit(actor, "auth.login_failed", self._door_target(username), None, after)

    def note_lockout(
        self,
        username: str,
        address: str,
        reason: str,
        seconds: float,
        actor: str = "anonymous",
    ) -> None:
        """The throttle started refusing: ``reason`` is ``address`` (too many failures from
        it), ``pair`` (for this user from this address) or ``account`` (the user's backoff,
        for addresses that have been failing)."""
        after = {"address": address, "reason": reason, "seconds": round(max(seconds, 0))}
        self.audit(actor, "auth.lockout", self._door_target(username), None, after)
