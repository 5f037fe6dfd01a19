"""Operations that touch both MongoDB and ZooKeeper (the CLI uses them; the web will too)."""

from __future__ import annotations

from typing import Any

from .exceptions import Conflict, NotFound
from .store import RUNNING_STATUSES, Store
from .zkpaths import ZkPaths, request_kill


def find_task(store: Store, name_or_id: str) -> dict[str, Any]:
    try:
        return store.get_task_by_name(name_or_id)
    except NotFound:
        return store.get_task(name_or_id)


def delete_task(
    store: Store, zk: Any, paths: ZkPaths, name_or_id: str, kill_running: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Delete a task. Its running runs finish, or are killed with ``kill_running``.

    Returns the deleted task and the ids of the runs asked to be killed.
    """
    task = find_task(store, name_or_id)
    running = store.list_runs(task_id=task["_id"], status=list(RUNNING_STATUSES), limit=10_000)
    store.delete_task(task["_id"])
    killed = []
    if kill_running:
        for run in running:
            request_kill(zk, paths, run["agent"], run["_id"], "the task was deleted")
            killed.append(run["_id"])
    return task, killed


def kill_run(store: Store, zk: Any, paths: ZkPaths, run_id: str, reason: str) -> dict[str, Any]:
    """Ask the run's agent to kill it (and its whole process tree)."""
    run = store.get_run(run_id)
    if run["status"] not in RUNNING_STATUSES:
        raise Conflict(f"run {run_id} is not running (it is {run['status']})")
    request_kill(zk, paths, run["agent"], run_id, reason)
    return run
