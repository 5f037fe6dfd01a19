"""Stored secrets: set (or replace), delete, rotate. Nobody reads a value back through here:
the audit entry of a change names the secret and the key it was sealed under, never the
value (``secret.set``, ``secret.delete``, ``secrets.rotate``)."""

from __future__ import annotations

from typing import Any

from ..exceptions import NotFound, ValidationError
from ..secretbox import SecretBox, SecretError
from ..store.secrets import secret_problems
from .base import OperationsBase


def _target(name: Any) -> str:
    return f"secret:{name if isinstance(name, str) else repr(name)}"[:200]


def _shown(info: dict[str, Any] | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "description": info.get("description", ""),
        "key_id": info.get("key_id"),
        "revision": info.get("revision"),  # a new value: the entry says so, never what
    }


class SecretOperations(OperationsBase):
    def set_secret(
        self,
        actor: str,
        box: SecretBox | None,
        name: str,
        value: str,
        description: str | None = None,
    ) -> dict[str, Any]:
        """Seal and store ``value`` as ``name`` (new, or replacing the old value). The input
        is checked first (ValidationError at ``name``, ``value``, ``description``), then
        whether this process has a key ring (SecretError)."""
        if problems := secret_problems(name, value, description):
            raise ValidationError(problems, source="the secret")
        if box is None:
            raise SecretError(
                "this process has no key ring (secrets.keys): it cannot store secrets"
            )
        try:
            before = self.store.get_secret_info(name)
        except NotFound:
            before = None
        info = self.store.put_secret(box, name, value, by=actor, description=description)
        self.audit(actor, "secret.set", _target(name), _shown(before), _shown(info))
        return info

    def delete_secret(self, actor: str, name: str) -> None:
        """Delete ``name``: NotFound, or Conflict while a task uses it."""
        before = self.store.get_secret_info(name)
        self.store.delete_secret(name)
        self.audit(actor, "secret.delete", _target(name), _shown(before), None)

    def rotate_secrets(self, actor: str, box: SecretBox | None) -> int:
        """Seal every value again under the key ring's primary key."""
        if box is None:
            raise SecretError("this process has no key ring (secrets.keys)")
        count = self.store.rotate_secrets(box)
        self.audit(actor, "secrets.rotate", f"key:{box.primary}", None, {"rewritten": count})
        return count
