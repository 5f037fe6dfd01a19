"""User accounts and API tokens: add, change a role, enable or disable, set a password, make
and revoke tokens. The rules (roles, passwords, the last admin) are :class:`~cloudtask.users.Users`';
here each change is made and audited."""

from __future__ import annotations

from typing import Any

from ..users import Users
from .base import OperationsBase


class UserOperations(OperationsBase):
    @property
    def users(self) -> Users:
        return Users(self.store)

    def add_user(self, actor: str, username: str, password: str, role: str) -> dict[str, Any]:
        """ValidationError for a bad name, password or role; Conflict (at ``username``) when
        the name is taken."""
        doc = self.users.add(username, password, role)
        after = {"username": username, "role": role, "enabled": True}
        self.store.add_audit(actor, "user.create", f"user:{username}", None, after)
        return doc

    def set_role(self, actor: str, username: str, role: str, by: str | None = None) -> str:
        """Change the role; returns the previous one (``by``: the admin doing it, who cannot
        demote themselves)."""
        old = self.users.set_role(username, role, by=by)
        if old != role:
            self.store.add_audit(
                actor, "user.role", f"user:{username}", {"role": old}, {"role": role}
            )
        return old

    def set_user_enabled(
        self, actor: str, username: str, enabled: bool, by: str | None = None
    ) -> bool:
        """Enable or disable an account; returns the previous state."""
        old = self.users.set_enabled(username, enabled, by=by)
        if old != enabled:
            action = "user.enable" if enabled else "user.disable"
            self.store.add_audit(
                actor, action, f"user:{username}", {"enabled": old}, {"enabled": enabled}
            )
        return old

    def set_password(self, actor: str, username: str, password: str) -> None:
        self.users.set_password(username, password)
        self.store.add_audit(
            actor, "user.password", f"user:{username}", None, {"password_changed": True}
        )

    def add_token(self, actor: str, username: str, name: str) -> tuple[str, str]:
        """A new API token for the user: (its id, the token), shown once."""
        token_id, token = self.users.add_token(username, name)
        after = {"token_id": token_id, "name": name}
        self.store.add_audit(actor, "token.create", f"user:{username}", None, after)
        return token_id, token

    def revoke_token(self, actor: str, username: str, token_id: str) -> dict[str, Any]:
        gone = self.users.revoke_token(username, token_id)
        before = {"token_id": token_id, "name": gone["name"]}
        self.store.add_audit(actor, "token.revoke", f"user:{username}", before, None)
        return gone
