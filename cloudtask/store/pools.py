"""Concurrency pools: ``pools`` holds ``{_id: name, size, updated_at, updated_by}``; the
places themselves are in ZooKeeper (cloudtask/agent/pools.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING

from ..clock import stored_time, to_bson_time, utcnow
from ..exceptions import NotFound, Problem, ValidationError
from ..schedules import NAME_PATTERN, NAME_RULE
from .base import StoreBase, guard, read_all

MAX_POOL_SIZE = 10_000


class PoolRecords(StoreBase):
    """Pool sizes."""

    @property
    def pools(self) -> Any:
        return self.db["pools"]

    def set_pool(self, name: str, size: Any, by: str, now: datetime | None = None) -> dict:
        """Create a pool or change its size (ValidationError at ``name`` or ``size``)."""
        problems = []
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            problems.append(Problem("name", f"a pool's name: {NAME_RULE}"))
        if type(size) is not int or not 1 <= size <= MAX_POOL_SIZE:
            problems.append(Problem("size", f"expected a whole number from 1 to {MAX_POOL_SIZE}"))
        if problems:
            raise ValidationError(problems)
        when = to_bson_time(now or utcnow())
        guard(
            self.pools.update_one,
            "store the pool",
            {"_id": name},
            {"$set": {"size": size, "updated_at": when, "updated_by": by}},
            upsert=True,
        )
        return self.get_pool(name)

    def get_pool(self, name: str) -> dict[str, Any]:
        doc = guard(self.pools.find_one, "read the pool", {"_id": name})
        if doc is None:
            raise NotFound(f"no pool named {name!r}")
        return _pool(doc)

    def pool_size(self, name: str) -> int | None:
        doc = guard(self.pools.find_one, "read the pool", {"_id": name}, {"size": 1})
        return int(doc["size"]) if doc is not None else None

    def pool_names(self, names: list[str]) -> set[str]:
        """Which of ``names`` are pools."""
        if not names:
            return set()
        docs = read_all(
            self.pools.find({"_id": {"$in": sorted(set(names))}}, {"_id": 1}), "read pools"
        )
        return {d["_id"] for d in docs}

    def list_pools(self) -> list[dict[str, Any]]:
        docs = read_all(self.pools.find({}).sort("_id", ASCENDING), "list pools")
        return [_pool(d) for d in docs]

    def delete_pool(self, name: str) -> None:
        result = guard(self.pools.delete_one, "delete the pool", {"_id": name})
        if result.deleted_count == 0:
            raise NotFound(f"no pool named {name!r}")

    def tasks_using_pool(self, name: str) -> list[dict[str, str]]:
        docs = read_all(
            self.tasks.find({"spec.pool": {"$eq": name}}, {"name": 1}), "find the pool's tasks"
        )
        return [{"id": d["_id"], "name": d["name"]} for d in docs]


def _pool(doc: dict[str, Any]) -> dict[str, Any]:
    out = {"name": doc["_id"], "size": int(doc.get("size", 0)), "updated_by": doc.get("updated_by")}
    out["updated_at"] = stored_time(doc["updated_at"]) if doc.get("updated_at") else None
    return out
