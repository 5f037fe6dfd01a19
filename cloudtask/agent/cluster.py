"""The agent in a cluster: registered in ZooKeeper, running what the leading center assigns.

Differences from the standalone agent (:class:`~cloudtask.agent.agent.Agent`):

- its task set comes from ``/assignments/<agent_id>`` (watched; changes apply at once), not
  from MongoDB;
- every claim is fenced by the registration's lease and records the session it was made in;
- when the session is lost, every assignment is dropped (keepalive instances are ended; runs
  already started finish) and the agent registers again; the leader then places tasks anew;
- a clean stop deletes the registration first, so the leader moves its tasks at once, and
  then lets the runs in flight finish.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from datetime import datetime, timedelta
from typing import Any

import psutil
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from .. import __version__
from ..config import Config
from ..store import Store, to_bson_time, utcnow
from ..zkpaths import ZkPaths, decode, task_signal
from .agent import Agent
from .assignments import AssignmentWatcher
from .registration import Registration

log = logging.getLogger(__name__)


class ClusterAgent(Agent):
    def __init__(
        self,
        config: Config,
        store: Store,
        zk: KazooClient,
        *,
        agent_id: str | None = None,
    ) -> None:
        super().__init__(config, store, agent_id=agent_id)
        self.zk = zk
        self.paths = ZkPaths(config.zookeeper.root)
        self._lost = threading.Event()
        self._kill_requests: set[str] = set()
        self._kills_lock = threading.Lock()
        acfg = config.agent
        info: dict[str, Any] = {
            "agent_id": self.agent_id,
            "group": self.group,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "platform": platform.system(),
            "cores": os.cpu_count() or 1,
            "weight": acfg.weight,
            "labels": acfg.labels,
            "max_parallel": acfg.max_parallel,
            "started_at": to_bson_time(utcnow()).isoformat(),
        }
        self.registration = Registration(
            zk,
            self.paths,
            self.agent_id,
            self.group,
            info,
            session_timeout=config.zookeeper.session_timeout,
            load=self._load,
            on_lost=self._on_lost,
        )
        self.watcher = AssignmentWatcher(
            zk,
            self.paths,
            self.agent_id,
            wake=self._wake.set,
            registered=lambda: self.registration.czxid,
        )

    # --- hooks of the agent loop ------------------------------------------------------------

    def may_claim(self) -> bool:
        return self.registration.may_claim()

    @property
    def session(self) -> str | None:
        return self.registration.session_id

    def _sync_due(self, now: datetime, poll: timedelta) -> bool:
        return True  # draining the watcher's queue is cheap: every pass

    def sync_tasks(self, now: datetime) -> None:
        if self._lost.is_set():
            if self._specs or self._bad_specs:
                log.warning("ZooKeeper session lost: dropping every assignment until placed again")
                self.drop_all()
            if not self.zk.connected:
                return  # no new session yet; claims are fenced meanwhile
            try:
                changes = self.watcher.reset()
            except KazooException as e:
                log.info("assignments not readable yet after the lost session: %s", e)
                return  # _lost stays set: the next pass tries again
            self._lost.clear()
        else:
            changes = self.watcher.drain(known=set(self._specs) | set(self._bad_specs))
        for task_id, doc in changes.items():
            if doc is None or not isinstance(doc.get("spec"), dict):
                if task_id in self._specs or task_id in self._bad_specs:
                    self._drop(task_id)
                    self._bad_specs.pop(task_id, None)
                continue
            self._take(
                {
                    "_id": task_id,
                    "revision": doc.get("revision", 0),
                    "spec": doc["spec"],
                    "enabled": True,
                    "updated_at": doc.get("updated_at"),
                },
                now,
            )
        self._last_sync = now

    def _on_lost(self) -> None:
        self._lost.set()
        self._wake.set()

    def _load(self) -> dict[str, Any]:
        """Load figures for the registration, rounded so that small changes cause no write."""
        return {
            "cpu_percent": round(psutil.cpu_percent(interval=None) / 10) * 10,
            "memory_percent": round(psutil.virtual_memory().percent / 10) * 10,
            "running": self.executor.running_count(),
        }

    # --- lifecycle --------------------------------------------------------------------------

    def _on_kills(self, run_ids: list[str]) -> None:
        """kazoo's event thread: note the kill requests and wake the loop."""
        with self._kills_lock:
            self._kill_requests = set(run_ids)
        self._wake.set()

    def _purge_runs(self) -> None:
        """In a cluster the leading center deletes old runs."""

    def _on_run_signal(self, *_: Any) -> None:
        """kazoo's event thread: a manual run waits; look for it at once."""
        self._manual_signal.set()
        self._wake.set()

    def _handle_kills(self) -> None:
        with self._kills_lock:
            requests, self._kill_requests = self._kill_requests, set()
        for run_id in sorted(requests):
            path = self.paths.kill(self.agent_id, run_id)
            try:
                doc = decode(self.zk.get(path)[0]) or {}
            except NoNodeError:
                continue
            reason = str(doc.get("reason") or "killed by request")
            if self.executor.kill(run_id, reason):
                log.info("run %s killed on request: %s", run_id, reason)
            try:
                self.zk.delete(path)
            except NoNodeError:
                pass

    def step(self, now: datetime) -> float:
        if self._kill_requests:
            try:
                self._handle_kills()
            except KazooException as e:
                log.warning("cannot read kill requests yet: %s", e)
        return super().step(now)

    def run(self) -> None:
        self.registration.start()
        self.watcher.start()
        self.zk.ensure_path(self.paths.kill_dir(self.agent_id))
        ChildrenWatch(self.zk, self.paths.kill_dir(self.agent_id), self._on_kills)
        DataWatch(self.zk, self.paths.run_signal, self._on_run_signal)
        try:
            super().run()
        finally:
            self.registration.stop()

    def _leaving(self) -> None:
        """Say we are leaving before the runs' grace, so the leader moves our tasks at once
        (without taking the runs that are finishing for lost); services stop now, so their new
        owner can start them."""
        self.registration.leaving()
        try:
            task_signal(self.zk, self.paths)()
        except KazooException as e:
            log.debug("cannot signal the leader: %s", e)
        for task_id, (_, spec) in list(self._specs.items()):
            if spec.schedule.keepalive:
                self.executor.kill_task(task_id, "the agent is stopping")

    def _left(self) -> None:
        self.registration.stop()
