"""What every blueprint needs: the store, the audited operations, the cluster view, JSON helpers.

The app keeps one :class:`~cloudtask.store.Store` and (in a cluster) one kazoo client; both
are thread-safe and shared by the server's threads. The cluster view is cached for
``CLUSTER_CACHE_SECONDS`` so a busy page does not read ZooKeeper on every request.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from bson import ObjectId
from flask import current_app
from flask_login import current_user

from cloudtask.clusterview import ClusterView, merge_agents, read_cluster
from cloudtask.exceptions import CloudTaskError
from cloudtask.operations import Operations
from cloudtask.store import Store
from cloudtask.zkpaths import ZkPaths

CLUSTER_CACHE_SECONDS = 2.0
_cluster_lock = threading.Lock()


def store() -> Store:
    return current_app.extensions["cloudtask_store"]()


def zk() -> Any:
    """The app's kazoo client, or None without a cluster (standalone agents)."""
    return current_app.config.get("ZK")


def paths() -> ZkPaths:
    return ZkPaths(current_app.config["CLOUDTASK"].zookeeper.root)


def ops() -> Operations:
    return Operations(store(), zk(), paths())


def actor() -> str:
    """Who acts, for the audit log."""
    return current_user.username if current_user.is_authenticated else "anonymous"


def cluster(fresh: bool = False) -> ClusterView:
    """The cluster as ZooKeeper shows it (cached briefly); ``connected`` is False without one."""
    cache = current_app.extensions.setdefault("cloudtask_cluster", {})
    with _cluster_lock:
        hit = cache.get("view")
        if not fresh and hit and time.monotonic() - hit[0] < CLUSTER_CACHE_SECONDS:
            return hit[1]
    try:
        view = read_cluster(zk(), paths())
    except Exception:  # ZooKeeper unreachable: pages still work, marked disconnected
        view = ClusterView(connected=False)
    with _cluster_lock:
        cache["view"] = (time.monotonic(), view)
    return view


def agents() -> list[dict[str, Any]]:
    """Every agent, live or gone: see :func:`cloudtask.clusterview.merge_agents`."""
    try:
        recorded = store().list_agents()
    except CloudTaskError:
        recorded = []
    return merge_agents(cluster(), recorded)


def jsonable(value: Any) -> Any:
    """Documents as JSON: datetimes in ISO 8601 (UTC), ObjectIds as strings, bytes dropped."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if k != "token_hash"}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, bytes):
        return None
    return value


def task_json(doc: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
    """A task as the API shows it: its definition plus what the cluster knows of it."""
    return jsonable(
        {
            "id": doc["_id"],
            "name": doc["name"],
            "group": doc["group"],
            "enabled": doc.get("enabled", True),
            "done": bool(doc.get("done_at")),
            "revision": doc["revision"],
            "created_at": doc.get("created_at"),
            "updated_at": doc.get("updated_at"),
            "last_run": doc.get("last_run"),
            "owner_agent": owner,
            "spec": doc["spec"],
        }
    )


def run_json(doc: dict[str, Any]) -> dict[str, Any]:
    out = jsonable(doc)
    out["id"] = out.pop("_id")
    return out
