"""What every blueprint needs: the app's CloudTask extension (the store, ZooKeeper, the login
throttle, the caches), the audited operations, the cluster view, JSON helpers.

:class:`CloudTaskExtension` is made once per app by :func:`web.create_app` and kept in
``app.extensions["cloudtask"]``. It holds one :class:`~cloudtask.store.Store` (made on first
use from the config unless one is given) and, in a cluster, one kazoo client; both are
thread-safe and shared by the server's threads. Its caches keep what is costly to read for a
while: the cluster view for ``CLUSTER_CACHE_SECONDS`` (so a busy page does not read ZooKeeper
on every request), the dashboard's figures, the OpenAPI document. The functions below
(:func:`store`, :func:`zk`, :func:`paths`, :func:`ops`, :func:`cluster` ...) read the current
app's extension.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from bson import ObjectId
from flask import current_app
from flask_login import current_user

from cloudtask.clusterview import ClusterView, merge_agents, read_cluster
from cloudtask.config import Config
from cloudtask.exceptions import CloudTaskError, ConfigError
from cloudtask.operations import Operations
from cloudtask.secretbox import SecretBox, load_box
from cloudtask.store import Store
from cloudtask.zkpaths import ZkPaths

from .security import LoginThrottle

CLUSTER_CACHE_SECONDS = 2.0
T = TypeVar("T")


class CloudTaskExtension:
    """The app's CloudTask state: the store, the ZooKeeper client (None without a cluster) and
    its paths, the login throttle, and the caches."""

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        zk: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock  # the caches' clock (injected by tests)
        self.zk = zk
        self.paths = ZkPaths(config.zookeeper.root)
        self._store = store
        self._store_lock = threading.Lock()
        self.throttle = LoginThrottle(self.store)
        self._cache: dict[str, tuple[float, Any]] = {}
        self._cache_lock = threading.Lock()
        self._box: tuple[SecretBox | None, str] | None = None
        self.sso: Any = None  # directory and OpenID Connect login (web/sso.py), if configured

    def box(self) -> tuple[SecretBox | None, str]:
        """The key ring this process seals new secrets with (``secrets.keys``, read once), or
        None and why: the web process seals values, it never opens one."""
        if self._box is None:
            try:
                ring = load_box(self.config.secrets.keys)
            except ConfigError as e:
                self._box = None, f"its key ring cannot be read: {e}"
            else:
                why = (
                    ""
                    if ring is not None
                    else "this web process has no key ring: secrets.keys is not set in its "
                    "configuration (set it to 'file:/path' or 'env:VARIABLE', the same ring "
                    "as the agents and centers, and restart it; or use 'cloudtask secrets set' "
                    "where the ring is)"
                )
                self._box = ring, why
        return self._box

    def store(self) -> Store:
        """The store given, or one on ``mongodb.uri`` made on first use."""
        with self._store_lock:
            if self._store is None:
                mongodb = self.config.mongodb
                self._store = Store(mongodb.uri, mongodb.database, server_selection_timeout_ms=2000)
            return self._store

    def ops(self) -> Operations:
        return Operations(self.store(), self.zk, self.paths)

    def cached(self, key: str, ttl: float, read: Callable[[], T], fresh: bool = False) -> T:
        """What ``read()`` gave at most ``ttl`` seconds ago (``fresh``: read now in any case).
        Two requests may both read when the value is stale; the later one is kept."""
        with self._cache_lock:
            hit = self._cache.get(key)
        if not fresh and hit and self.clock() - hit[0] < ttl:
            return hit[1]
        value = read()
        with self._cache_lock:
            self._cache[key] = (self.clock(), value)
        return value

    def cluster(self, fresh: bool = False) -> ClusterView:
        """The cluster as ZooKeeper shows it (cached for ``CLUSTER_CACHE_SECONDS``);
        ``connected`` is False without one, or when ZooKeeper cannot be read."""
        return self.cached("cluster", CLUSTER_CACHE_SECONDS, self._read_cluster, fresh)

    def _read_cluster(self) -> ClusterView:
        try:
            return read_cluster(self.zk, self.paths)
        except Exception:  # ZooKeeper unreachable: pages still work, marked disconnected
            return ClusterView(connected=False)


def extension() -> CloudTaskExtension:
    """The current app's extension."""
    return current_app.extensions["cloudtask"]


def store() -> Store:
    return extension().store()


def zk() -> Any:
    """The app's kazoo client, or None without a cluster (standalone agents)."""
    return extension().zk


def paths() -> ZkPaths:
    return extension().paths


def ops() -> Operations:
    return extension().ops()


def throttle() -> LoginThrottle:
    return extension().throttle


def secret_box() -> tuple[SecretBox | None, str]:
    """The key ring new secrets are sealed with, or None and why secrets cannot be stored."""
    return extension().box()


def actor() -> str:
    """Who acts, for the audit log."""
    return current_user.username if current_user.is_authenticated else "anonymous"


def cluster(fresh: bool = False) -> ClusterView:
    """The cluster as ZooKeeper shows it (cached briefly); ``connected`` is False without one."""
    return extension().cluster(fresh)


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
