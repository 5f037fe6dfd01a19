"""The agent in a cluster: registered in ZooKeeper, running what the leading center assigns.

Differences from the standalone agent (:class:`~cloudtask.agent.agent.Agent`):

- its task set comes from ``/assignments/<agent_id>`` (watched; changes apply at once, as
  :class:`~cloudtask.agent.assigned.AssignedTask`), not from MongoDB;
- every claim is fenced by the registration's lease and records the session it was made in;
  a claim starts only while that session's fence holds;
- when the session is lost, every assignment is dropped (keepalive instances are ended; runs
  already started finish) and the agent registers again; only then are its assignments read
  again, and only those the leader wrote for the new registration count;
- no ZooKeeper call of the agent loop waits: reads and writes are bounded, and skipped while
  disconnected (kazoo would queue them for ever);
- a clean stop deletes the registration first, so the leader moves its tasks at once, and
  then lets the runs in flight finish.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psutil
import pymongo
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from .. import __version__
from .. import events as ev
from ..clock import to_bson_time, utcnow
from ..config import Config
from ..exceptions import CloudTaskError
from ..store import Store
from ..zkpaths import ZkPaths, bounded, decode, keep_trying, run_signal, task_signal
from .agent import Agent
from .assignments import AssignmentWatcher
from .budget import CALL_BUDGET, STORE_ERRORS
from .pools import Sizes, ZkPools
from .registration import REGISTERED, STOP_BUDGET, Registration

log = logging.getLogger(__name__)


class ClusterAgent(Agent):
    def __init__(
        self,
        config: Config,
        store: Store,
        zk: KazooClient,
        *,
        agent_id: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(config, store, agent_id=agent_id, clock=clock)
        self.zk = zk
        self.paths = ZkPaths(config.zookeeper.root)
        self.pools = ZkPools(zk, self.paths.pools, Sizes(self._pool_size))  # (pools.py)
        self._lost = threading.Event()
        self._lost_registration = 0  # the czxid of the registration that was lost
        self._kill_requests: set[str] = set()
        self._kills_lock = threading.Lock()
        # kills applied here whose outcome is not stored yet: their requests stay until it is
        self._kills_applied: set[str] = set()
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
        # the first cpu_percent() of a process (or of the machine) answers 0.0: prime both, so
        # the first published figures cover the time since start
        self._process = psutil.Process()
        self._process.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None)
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
        self.metrics.watch_cluster(zk, self.may_claim)
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

    def fence(self) -> tuple[str | None, float]:
        return self.registration.fence()

    def silent_after(self) -> float:
        return self.registration.session_length()

    def view_may_be_stale(self) -> bool:
        return self.registration.out_of_touch()

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
            reg = self.registration
            if not self.zk.connected or not reg.registered_since(self._lost_registration):
                return  # not registered again yet; claims are fenced meanwhile
            try:
                changes = self.watcher.reset()  # compared with the new registration
            except Exception as e:
                log.info("assignments not readable yet after the lost session: %s", e)
                return  # _lost stays set: the next pass tries again
            self._lost.clear()
        else:
            changes = self.watcher.drain(known=set(self._specs) | set(self._bad_specs))
        for task_id, task in changes.items():
            if task is None:  # unassigned, stale, or without a spec
                if task_id in self._specs or task_id in self._bad_specs:
                    self._drop(task_id)
                    self._bad_specs.pop(task_id, None)
                continue
            self._take(task, now)
        self._last_sync = now

    def _on_lost(self) -> None:
        """kazoo's thread or the heartbeat: the session is gone (remember which one)."""
        if not self._lost.is_set():
            self._lost_registration = self.registration.czxid
            self._lost.set()
        self._wake.set()

    def _load(self) -> dict[str, Any]:
        """Load figures for the registration (published every 5 s when they changed), rounded
        so that small changes cause no write: the machine's CPU use since the last figures (to
        5 %) and memory in use (to 1 %), which agents on one machine share, and the agent
        process's own CPU use (to 1 %) and resident memory (to 10 MB), which they do not."""
        return {
            "cpu_percent": round(psutil.cpu_percent(interval=None) / 5) * 5,
            "memory_percent": round(psutil.virtual_memory().percent),
            "agent_cpu_percent": round(self._process.cpu_percent(interval=None)),
            "agent_rss_mb": round(self._process.memory_info().rss / 2**20 / 10) * 10,
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
        """kazoo's event thread: a run waits for an agent; look for it at once."""
        self.waiting.signal()
        self.items.signal()
        self._wake.set()

    def _handle_kills(self) -> None:
        """Apply the kill requests. A request stays in ZooKeeper until the run's outcome is
        stored (or there was nothing to kill): an agent that dies in between finds it again
        when it comes back, and kills the claim its recovery released (``queued``, no agent)."""
        with self._kills_lock:
            requests, self._kill_requests = self._kill_requests, set()
        for run_id in sorted(requests - self._kills_applied):
            path = self.paths.kill(self.agent_id, run_id)
            try:
                data, _ = bounded(
                    self.zk, "read a kill request", lambda p=path: self.zk.get_async(p)
                )
            except NoNodeError:
                continue
            except (KazooException, CloudTaskError) as e:
                log.warning("cannot read the kill request of run %s yet: %s", run_id, e)
                with self._kills_lock:
                    self._kill_requests.add(run_id)
                continue
            reason = str((decode(data) or {}).get("reason") or "killed by request")
            if (
                self.executor.kill(run_id, reason)
                or self.kill_armed(run_id, reason)
                or self.kill_in_doubt(run_id, reason)  # (killed if it landed)
            ):
                log.info("run %s killed on request: %s", run_id, reason)
                self._kills_applied.add(run_id)
            elif self.writer.keeps(run_id):  # it ended here; its outcome is not stored yet
                self._kills_applied.add(run_id)
            elif self._kill_unstarted(run_id, reason):
                self._delete_kill(run_id)
            else:
                with self._kills_lock:
                    self._kill_requests.add(run_id)  # MongoDB did not answer: try again
        for run_id in [r for r in self._kills_applied if not self._unsettled(r)]:
            if self._delete_kill(run_id):
                self._kills_applied.discard(run_id)

    def _unsettled(self, run_id: str) -> bool:
        return self.writer.keeps(run_id) or self.is_in_doubt(run_id)

    def _delete_kill(self, run_id: str) -> bool:
        path = self.paths.kill(self.agent_id, run_id)
        try:
            bounded(self.zk, "delete a kill request", lambda p=path: self.zk.delete_async(p))
        except NoNodeError:
            pass
        except (KazooException, CloudTaskError) as e:
            log.warning("cannot delete the kill request of run %s: %s", run_id, e)
            return False
        return True

    def _kill_unstarted(self, run_id: str, reason: str) -> bool:
        """A kill request for a run this agent does not hold: a claim of ours waiting for a
        slot whose answer was lost, or one released (by an earlier life of this agent, say)
        that no agent has taken yet, is finished ``killed``. True when settled (or nothing to
        do), False when MongoDB could not say."""
        try:
            with pymongo.timeout(CALL_BUDGET):
                if self.store.cancel_pending_run(run_id, reason, agent=self.agent_id):
                    log.info("run %s (claimed, never started) killed on request", run_id)
        except STORE_ERRORS as e:
            log.warning("cannot kill run %s yet: %s", run_id, e)
            return False
        return True

    def step(self, now: datetime) -> float:
        if not self._recovered:  # first: the kill requests see the claims it released
            self._recover_quietly(now)
        if (self._kill_requests or self._kills_applied) and self._recovered and self.zk.connected:
            self._handle_kills()
        return super().step(now)

    def run(self) -> None:
        self.registration.start()
        for folder in (self.watcher.folder, self.paths.kill_dir(self.agent_id)):
            self._ensure(folder)
        self.watcher.start()
        ChildrenWatch(self.zk, self.paths.kill_dir(self.agent_id), self._on_kills)
        DataWatch(self.zk, self.paths.run_signal, self._on_run_signal)
        try:
            super().run()
        finally:
            self.registration.stop()

    def _ensure(self, path: str) -> None:
        """Create ``path`` if it is missing, trying again (bounded) until ZooKeeper answers."""
        keep_trying(
            f"create {path}",
            lambda: bounded(self.zk, f"create {path}", lambda: self.zk.ensure_path_async(path)),
            self._stop,
        )

    def _leaving(self) -> None:
        """Say we are leaving before the runs' grace, so the leader moves our tasks at once
        (without taking the runs that are finishing for lost); services stop now, so their new
        owner can start them."""
        self.registration.leaving()
        try:
            task_signal(self.zk, self.paths, STOP_BUDGET)()
        except (KazooException, CloudTaskError) as e:
            log.info("cannot signal the leader (it sees the registration go): %s", e)
        for task_id, (_, spec) in list(self._specs.items()):
            if spec.schedule.keepalive:
                self.executor.kill_task(task_id, "the agent is stopping")

    def _signal_released(self) -> None:
        try:
            run_signal(self.zk, self.paths, STOP_BUDGET)()
        except (KazooException, CloudTaskError) as e:
            log.info("cannot signal the released claims (agents look every few seconds): %s", e)

    def _left(self) -> None:
        # a clean stop is recorded before the registration goes, with the id the leader gives
        # that departure: a leader that never saw us leaving does not take it for a crash
        reg = self.registration
        if reg.state == REGISTERED:
            info = {**reg.info, "group": self.group}
            try:
                with pymongo.timeout(CALL_BUDGET):
                    event = ev.agent_stopped(self.agent_id, info, reg.czxid, utcnow())
                    self.store.record_event(event)
            except STORE_ERRORS as e:
                log.warning("cannot record this clean stop (the leader decides alone): %s", e)
        reg.stop()
