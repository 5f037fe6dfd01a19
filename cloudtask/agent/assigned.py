"""What an agent is given to run: one :class:`AssignedTask` per task, from either source.

The standalone agent polls MongoDB for its group's tasks and makes one from each changed task
document (:meth:`AssignedTask.from_task`); the cluster agent's watcher makes one from each
changed assignment node in ZooKeeper (:meth:`AssignedTask.from_assignment`, see
assignments.py). The agent takes either the same way (``Agent._take``): a revision it knows
changes nothing; a spec that is not valid is remembered by its revision and not scheduled; a
disabled task is known but not scheduled; any other is scheduled (a task new to the agent
process once its history is read, from ``changed_at`` on).

A task that is no longer the agent's (deleted, done, paused in a cluster, moved, or an
assignment without a spec) is not an AssignedTask: each source reports it as ``None``, or as
missing from its set, and the agent drops it.

Example::

    task = AssignedTask.from_assignment("t1", {"revision": 3, "spec": {...}})
    agent._take(task, now)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class AssignedTask:
    task_id: str
    revision: int
    spec: Mapping[str, Any]  # the task's spec document, as stored (parsed by the agent)
    enabled: bool = True
    # when the task was created or last changed: its fires before this were not due here
    # (an assignment carries it as ISO text)
    changed_at: datetime | str | None = None
    # a mode-all task's (index, total) on this agent, as the leader wrote it: its runs get
    # CLOUDTASK_SHARD_INDEX and CLOUDTASK_SHARD_TOTAL
    shard: tuple[int, int] | None = None

    @classmethod
    def from_task(cls, doc: Mapping[str, Any]) -> AssignedTask:
        """From a task document in MongoDB (the standalone agent's poll)."""
        return cls(
            task_id=doc["_id"],
            revision=doc["revision"],
            spec=doc["spec"],
            enabled=bool(doc.get("enabled")),
            changed_at=doc.get("updated_at"),
        )

    @classmethod
    def from_assignment(cls, task_id: str, doc: Mapping[str, Any] | None) -> AssignedTask | None:
        """From an assignment node's JSON (the cluster agent's watcher): None for one that is
        gone, stale, or holds no spec. An assigned task is enabled: the leader assigns no other."""
        if doc is None or not isinstance(doc.get("spec"), dict):
            return None
        return cls(
            task_id=task_id,
            revision=doc.get("revision", 0),
            spec=doc["spec"],
            enabled=True,
            changed_at=doc.get("updated_at"),
            shard=_shard(doc.get("shard")),
        )


def _shard(value: Any) -> tuple[int, int] | None:
    """``{"index": i, "total": n}`` with ``0 <= i < n``, as a pair; None for anything else."""
    if not isinstance(value, dict):
        return None
    index, total = value.get("index"), value.get("total")
    if type(index) is not int or type(total) is not int or not 0 <= index < total:
        return None
    return index, total
