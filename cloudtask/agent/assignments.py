"""Following an agent's own assignments in ZooKeeper: ``/assignments/<agent_id>/<task_id>``.

One children watch (set once; kazoo re-arms it after a lost session) sees tasks come and go,
and a data watch per task sees its spec change. Nothing here ever blocks the agent loop: the
data watches are asynchronous reads whose answers and watch events arrive on kazoo's threads,
which only record what they saw and wake the loop; a full re-read (every ``resync_interval``,
compared with what the agent actually runs, against a watch that could have been missed) is
made only while connected and waits at most ``READ_BUDGET``. Changes are queued (the latest per
task wins) and taken by the loop with :meth:`drain`, each as an
:class:`~cloudtask.agent.assigned.AssignedTask`, or None for a task no longer assigned.

An assignment counts only if it was last written (``mzxid``) after the agent's current
registration (``registered()``, its ``czxid``): one written for an earlier life of the agent
is stale until the leader rewrites it.

Example::

    watcher = AssignmentWatcher(zk, paths, "a1", wake=event.set, registered=lambda: czxid)
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
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.protocol.states import EventType
from kazoo.recipe.watchers import ChildrenWatch

from ..zkpaths import ZkPaths, bounded, decode
from .assigned import AssignedTask

log = logging.getLogger(__name__)

READ_BUDGET = 3.0  # seconds a full re-read of the assignments may take


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
        self.registered = registered
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._children: set[str] | None = None  # latest list seen by the children watch
        self._watched: set[str] = set()  # tasks with a data watch set (or being set)
        self._rewatch: set[str] = set()  # tasks whose watch could not be set: tried again
        self._lock = threading.Lock()
        self._last_resync = time.monotonic()
        self._generation = 0
        self._started = False

    def start(self) -> None:
        """Set the children watch (once per process; ZooKeeper must be reachable)."""
        if self._started:
            return
        self.zk.ensure_path(self.folder)
        ChildrenWatch(self.zk, self.folder, self._on_children)
        self._started = True

    # --- kazoo's threads: record and wake, nothing else ------------------------------------

    def _on_children(self, children: list[str]) -> None:
        with self._lock:
            self._children = set(children)
        self.wake()

    def _watch(self, task_id: str, generation: int) -> None:
        """Read the assignment and leave a watch on it, asynchronously (never blocks)."""
        path = f"{self.folder}/{task_id}"

        def on_event(event: Any) -> None:
            with self._lock:
                current = generation == self._generation and task_id in self._watched
            if current and event.type != EventType.NONE:
                self._watch(task_id, generation)  # read again (and watch again)

        try:
            result = self.zk.get_async(path, watch=on_event)
        except KazooException:  # closed or closing: the next drain tries again
            with self._lock:
                self._rewatch.add(task_id)
            return
        result.rawlink(lambda r: self._on_data(task_id, generation, r))

    def _on_data(self, task_id: str, generation: int, result: Any) -> None:
        try:
            data, stat = result.get_nowait()
        except NoNodeError:
            data, stat = None, None
        except Exception:  # connection loss or session expiry: set the watch again later
            with self._lock:
                if generation == self._generation:
                    self._rewatch.add(task_id)
            self.wake()
            return
        with self._lock:
            if generation != self._generation:
                return  # a reset happened since: a newer watch follows this task
            if stat is None:
                self._watched.discard(task_id)
                self._pending[task_id] = None
            elif stat.mzxid <= self.registered():
                self._pending[task_id] = None  # stale: not (yet) ours in this life
            else:
                self._pending[task_id] = decode(data) or None
        self.wake()

    # --- the agent loop -------------------------------------------------------------------

    def drain(self, known: Iterable[str] = ()) -> dict[str, AssignedTask | None]:
        """The changes since the last drain: task id -> the task as now assigned, or None (no
        longer assigned, stale, or without a spec). ``known`` is what the agent runs now, so a
        full re-read (every ``resync_interval``) can also remove what should not be there."""
        with self._lock:
            children, self._children = self._children, None
            generation = self._generation
            rewatch, self._rewatch = self._rewatch, set()
            new: set[str] = set()
            if children is not None:
                new = children - self._watched
                for task_id in self._watched - children:
                    self._watched.discard(task_id)
                    self._pending[task_id] = None
                self._watched |= new
            rewatch &= self._watched
        if (new or rewatch) and not self.zk.connected:
            with self._lock:
                self._rewatch |= new | rewatch
        else:
            for task_id in sorted(new | rewatch):
                self._watch(task_id, generation)
        if time.monotonic() - self._last_resync >= self.resync_interval and self.zk.connected:
            self._last_resync = time.monotonic()
            self._resync(set(known))
        with self._lock:
            changes, self._pending = self._pending, {}
        return _assigned(changes)

    def reset(self) -> dict[str, AssignedTask | None]:
        """After a lost session (and a new registration): forget the data watches and read the
        folder afresh. Raises kazoo's errors (or ClusterUnavailable) when it cannot be read
        now; the caller tries again."""
        current = self.snapshot()
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._watched = set(current)
            self._rewatch.clear()
            self._pending.clear()
            self._children = None
        for task_id in sorted(current):
            self._watch(task_id, generation)
        return _assigned(current)

    def snapshot(self) -> dict[str, dict[str, Any] | None]:
        """Every current assignment, read now (pipelined reads), within ``READ_BUDGET``."""
        deadline = time.monotonic() + READ_BUDGET
        try:
            children = bounded(
                self.zk,
                "read the assignments",
                lambda: self.zk.get_children_async(self.folder),
                READ_BUDGET,
            )
        except NoNodeError:
            return {}
        asyncs = {t: self.zk.get_async(f"{self.folder}/{t}") for t in children}
        out: dict[str, dict[str, Any] | None] = {}
        registered = self.registered()
        for task_id, result in asyncs.items():
            try:
                data, stat = result.get(timeout=max(0.01, deadline - time.monotonic()))
            except NoNodeError:
                continue
            out[task_id] = decode(data) if stat.mzxid > registered else None
        return out

    def _resync(self, known: set[str]) -> None:
        try:
            current = self.snapshot()
        except Exception as e:  # ZooKeeper unreachable or slow now: the next resync tries again
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


def _assigned(docs: dict[str, dict[str, Any] | None]) -> dict[str, AssignedTask | None]:
    return {task_id: AssignedTask.from_assignment(task_id, doc) for task_id, doc in docs.items()}
