"""What every part of :class:`~cloudtask.operations.Operations` shares: the store, the cluster
connection, the one way to tell the cluster that something changed, and the audit log (every
entry written by :meth:`OperationsBase.audit`, credentials and webhook URLs masked: see
:mod:`cloudtask.operations.audit`)."""

from __future__ import annotations

import logging
from typing import Any

from ..exceptions import NotFound
from ..store import Store
from ..zkpaths import ZkPaths, run_signal, task_signal
from .audit import mask_pair

log = logging.getLogger("cloudtask.operations")


def find_task(store: Any, name_or_id: str) -> dict[str, Any]:
    """The task with this name, else with this id; NotFound if neither."""
    try:
        return store.get_task_by_name(name_or_id)
    except NotFound:
        return store.get_task(name_or_id)


def task_target(task: dict[str, Any]) -> str:
    """How the audit log names a task."""
    return f"task:{task['name']}"


class OperationsBase:
    """``zk`` is None without a cluster (a standalone agent, a command without
    ``zookeeper.hosts``): then a running run cannot be killed, the leading center sees task
    changes at its next resync, and everything else works the same."""

    def __init__(self, store: Store, zk: Any = None, paths: ZkPaths | None = None) -> None:
        self.store = store
        self.zk = zk
        self.paths = paths or ZkPaths()

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
        task_id: str | None = None,
    ) -> None:
        """Record who changed what, credentials and webhook URLs masked (the one writer of
        audit entries: nothing else calls the store's ``add_audit``)."""
        before, after = mask_pair(before, after)
        self.store.add_audit(actor, action, target, before, after, task_id)

    def _signal(self, which: str) -> None:
        """Tell the cluster at once (``tasks``: the leading center reconciles; ``runs``: agents
        look for runs waiting for them). Best effort: the change is stored, and the center and
        the agents also look every resync or poll interval."""
        if self.zk is None:
            return
        bump = task_signal if which == "tasks" else run_signal
        try:
            bump(self.zk, self.paths)()
        except Exception as e:
            log.warning("cannot signal the %s change (picked up at the next resync): %s", which, e)
