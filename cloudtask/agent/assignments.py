"""Following an agent's own assignments in ZooKeeper: ``/assignments/<agent_id>/<task_id>``.

A children watch sees tasks come and go; a data watch per task sees its spec change. Changes
are queued (the latest per task wins) and taken by the agent's loop, which is woken at once,
so a change made by the leader takes effect within milliseconds, without a restart. A full
re-read every ``resync_interval`` guards against anything a watch could have missed.

Example::

    watcher = AssignmentWatcher(zk, paths, "a1", wake=event.set)
    watcher.start()
    changes = watcher.drain()   # {task_id: assignment document, or None if removed}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from ..zkpaths import ZkPaths, decode

log = logging.getLogger(__name__)


class AssignmentWatcher:
    def __init__(
        self,
        zk: KazooClient,
        paths: ZkPaths,
        agent_id: str,
        wake: Callable[[], None],
        resync_interval: float = 30.0,
    ) -> None:
        self.zk = zk
        self.paths = paths
        self.agent_id = agent_id
        self.folder = paths.assignment_dir(agent_id)
        self.wake = wake
        self.resync_interval = resync_interval
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._last_resync = time.monotonic()
        self._generation = 0

    def start(self) -> None:
        self.zk.ensure_path(self.folder)
        ChildrenWatch(self.zk, self.folder, self._on_children)

    def _on_children(self, children: list[str]) -> None:
        with self._lock:
            known = set(self._watched)
            generation = self._generation
        for task_id in set(children) - known:
            with self._lock:
                self._watched.add(task_id)
            DataWatch(
                self.zk,
                f"{self.folder}/{task_id}",
                lambda data, stat, event=None, t=task_id, g=generation: self._on_data(
                    t, g, data, stat
                ),
            )

    def _on_data(self, task_id: str, generation: int, data: bytes | None, stat: Any) -> bool | None:
        with self._lock:
            if generation != self._generation:
                return False  # a reset happened since: a newer watch follows this task
            if stat is None:
                self._watched.discard(task_id)
                self._pending[task_id] = None
                stop = True
            else:
                self._pending[task_id] = decode(data) or None
                stop = False
        self.wake()
        return False if stop else None

    def drain(self) -> dict[str, dict[str, Any] | None]:
        """The changes since the last drain (and, now and then, a full re-read)."""
        if time.monotonic() - self._last_resync >= self.resync_interval:
            self._last_resync = time.monotonic()
            try:
                self._resync()
            except KazooException as e:
                log.debug("assignment resync failed: %s", e)
        with self._lock:
            changes, self._pending = self._pending, {}
        return changes

    def reset(self) -> dict[str, dict[str, Any] | None]:
        """After a lost session: forget every watch and read the folder afresh."""
        with self._lock:
            self._generation += 1
            self._watched.clear()
            self._pending.clear()
        self.start()
        return self.snapshot()

    def snapshot(self) -> dict[str, dict[str, Any] | None]:
        """Every current assignment, read now (pipelined reads)."""
        try:
            children = self.zk.get_children(self.folder)
        except NoNodeError:
            return {}
        asyncs = {t: self.zk.get_async(f"{self.folder}/{t}") for t in children}
        out: dict[str, dict[str, Any] | None] = {}
        for task_id, result in asyncs.items():
            try:
                data, _ = result.get()
                out[task_id] = decode(data)
            except NoNodeError:
                continue
        return out

    def _resync(self) -> None:
        current = self.snapshot()
        with self._lock:
            for task_id in self._watched - set(current):
                self._pending.setdefault(task_id, None)
            for task_id, doc in current.items():
                self._pending.setdefault(task_id, doc)
