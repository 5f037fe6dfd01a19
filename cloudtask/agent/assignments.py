"""Following an agent's own assignments in ZooKeeper: ``/assignments/<agent_id>/<task_id>``.

One children watch (set once; kazoo re-arms it after a lost session) sees tasks come and go,
and a data watch per task sees its spec change. The watch callbacks run on kazoo's event
thread, so they only record what they saw and wake the agent loop; every ZooKeeper call
(setting a new data watch, a re-read) happens on the loop, in :meth:`drain`. Changes are
queued (the latest per task wins). A full re-read every ``resync_interval``, compared with
what the agent actually runs, guards against anything a watch could have missed.

Example::

    watcher = AssignmentWatcher(zk, paths, "a1", wake=event.set)
    watcher.start()
    changes = watcher.drain(known=set_of_task_ids_the_agent_runs)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
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
        registered: Callable[[], int] = lambda: 0,
    ) -> None:
        self.zk = zk
        self.paths = paths
        self.agent_id = agent_id
        self.folder = paths.assignment_dir(agent_id)
        self.wake = wake
        self.resync_interval = resync_interval
        # the zxid of our registration: an assignment last written before it was meant for an
        # earlier life of this agent, and is ignored until the leader rewrites it
        self.registered = registered
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._children: set[str] | None = None  # latest list seen by the children watch
        self._watched: set[str] = set()  # tasks with a live data watch
        self._lock = threading.Lock()
        self._last_resync = time.monotonic()
        self._generation = 0
        self._started = False

    def start(self) -> None:
        """Set the children watch (once per process)."""
        if self._started:
            return
        self.zk.ensure_path(self.folder)
        ChildrenWatch(self.zk, self.folder, self._on_children)
        self._started = True

    # --- kazoo's event thread: record and wake, nothing else ------------------------------

    def _on_children(self, children: list[str]) -> None:
        with self._lock:
            self._children = set(children)
        self.wake()

    def _on_data(self, task_id: str, generation: int, data: bytes | None, stat: Any) -> bool | None:
        with self._lock:
            if generation != self._generation:
                return False  # a reset happened since: a newer watch follows this task
            if stat is None:
                self._watched.discard(task_id)
                self._pending[task_id] = None
            elif stat.mzxid <= self.registered():
                self._pending[task_id] = None  # stale: not (yet) ours in this life
            else:
                self._pending[task_id] = decode(data) or None
        self.wake()
        return False if stat is None else None

    # --- the agent loop -------------------------------------------------------------------

    def drain(self, known: Iterable[str] = ()) -> dict[str, dict[str, Any] | None]:
        """The changes since the last drain. ``known`` is what the agent runs now, so a full
        re-read (every ``resync_interval``) can also remove what should not be there."""
        with self._lock:
            children, self._children = self._children, None
            generation = self._generation
        if children is not None:
            with self._lock:
                new = children - self._watched
                gone = self._watched - children
                self._watched |= new
                for task_id in gone:
                    self._watched.discard(task_id)
                    self._pending[task_id] = None
            for task_id in sorted(new):
                self._watch(task_id, generation)
        if time.monotonic() - self._last_resync >= self.resync_interval:
            self._last_resync = time.monotonic()
            self._resync(set(known))
        with self._lock:
            changes, self._pending = self._pending, {}
        return changes

    def _watch(self, task_id: str, generation: int) -> None:
        DataWatch(
            self.zk,
            f"{self.folder}/{task_id}",
            lambda data, stat, event=None: self._on_data(task_id, generation, data, stat),
        )

    def reset(self) -> dict[str, dict[str, Any] | None]:
        """After a lost session: forget the data watches and read the folder afresh.

        Raises kazoo's errors while the new session is not there yet; the caller retries.
        """
        current = self.snapshot()
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._watched = set(current)
            self._pending.clear()
            self._children = None
        for task_id in sorted(current):
            self._watch(task_id, generation)
        return current

    def snapshot(self) -> dict[str, dict[str, Any] | None]:
        """Every current assignment, read now (pipelined reads)."""
        try:
            children = self.zk.get_children(self.folder)
        except NoNodeError:
            return {}
        asyncs = {t: self.zk.get_async(f"{self.folder}/{t}") for t in children}
        out: dict[str, dict[str, Any] | None] = {}
        registered = self.registered()
        for task_id, result in asyncs.items():
            try:
                data, stat = result.get()
            except NoNodeError:
                continue
            out[task_id] = decode(data) if stat.mzxid > registered else None
        return out

    def _resync(self, known: set[str]) -> None:
        try:
            current = self.snapshot()
        except Exception as e:  # ZooKeeper unreachable now: the next resync tries again
            log.debug("assignment resync failed: %s", e)
            return
        with self._lock:
            generation = self._generation
            missing = set(current) - self._watched
            self._watched |= missing
            for task_id in known - set(current):
                self._pending.setdefault(task_id, None)
            for task_id, doc in current.items():
                self._pending.setdefault(task_id, doc)
        for task_id in sorted(missing):
            self._watch(task_id, generation)
