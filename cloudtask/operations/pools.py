"""Concurrency pools: set a pool's size (creating it), delete one no task names."""

from __future__ import annotations

from typing import Any

from ..exceptions import Conflict
from .base import OperationsBase


class PoolOperations(OperationsBase):
    def set_pool(self, actor: str, name: str, size: Any) -> dict[str, Any]:
        """Create pool ``name`` or change its size (ValidationError at name or size)."""
        before = next((p for p in self.store.list_pools() if p["name"] == name), None)
        pool = self.store.set_pool(name, size, by=actor)
        self.audit(
            actor,
            "pool.set",
            f"pool:{name}",
            {"size": before["size"]} if before else None,
            {"size": pool["size"]},
        )
        return pool

    def delete_pool(self, actor: str, name: str) -> None:
        """Delete a pool; refused (Conflict) while a task names it."""
        users = self.store.tasks_using_pool(name)
        if users:
            shown = ", ".join(u["name"] for u in users[:5]) + (" ..." if len(users) > 5 else "")
            raise Conflict(f"pool {name!r} is named by {len(users)} task(s): {shown}")
        pool = self.store.get_pool(name)
        self.store.delete_pool(name)
        self.audit(actor, "pool.delete", f"pool:{name}", {"size": pool["size"]}, None)
