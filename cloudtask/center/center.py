"""The center: any number run, one leads (kazoo Election); the leader places tasks on agents.

The leader's loop is level-triggered. Woken by a change of agents (watches on
``/agents/<group>``), by a task change (``/signals/tasks``) or by the periodic resync, it
computes the desired placement from the enabled tasks in MongoDB and the live agents in
ZooKeeper, compares it with the assignments in ZooKeeper and writes only the difference, in
transactions. Followers only wait. A new leader rebuilds its view from ZooKeeper and MongoDB
before it writes anything; nothing is carried in memory across leaderships.

Fencing: every write transaction also checks that the leader's own election node still
exists. A leader that was paused past its session and wakes up cannot write: its node went
with its session, so its transactions fail, and it steps down.

Runs of agents that are no longer registered are judged by the leader ("lost" means lost):
a claim still ``queued`` never started, so it is released at once for the task's owner to run;
a ``running`` run is marked ``lost`` only once its heartbeat (written by its agent every few
seconds) has stayed the same for ``lost_grace`` seconds of the leader's own clock: an agent
cut off from ZooKeeper but still running its runs keeps beating them, and they are not lost.
Released claims no agent takes within their ``misfire_grace`` are recorded ``missed``.

Every MongoDB call of a pass has a deadline; placement goes on from the tasks it read last when
MongoDB does not answer (a dead agent's tasks move all the same), and a failed pass is tried
again within seconds, not at the next resync.

Events (cloudtask/events.py) the leader records: ``center.leader`` when it starts leading,
the agents that joined, left or came back (through ``Store.record_agents``), and
``task.unassigned`` once per task that has had no live agent in its group for
``unassigned_grace`` seconds (a group briefly empty while its agent restarts, or while a
whole cluster starts, is no alert). A new leader starts from the unassigned tasks its
predecessor published in ``/status``, so a task is not reported again by each leader.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    KazooException,
    NodeExistsError,
    NoNodeError,
    RolledBackError,
)
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from .. import __version__
from .. import events as ev
from ..clock import to_bson_time, utcnow
from ..config import Config
from ..exceptions import CloudTaskError, ValidationError
from ..notify import NotifierThread
from ..registry import LiveAgent, read_agents
from ..runmodel import BEAT_INTERVAL
from ..store import Store
from ..task import parse_task
from ..zkpaths import ZkPaths, decode, encode, keep_trying, run_signal
from .placement import AgentInfo, Assignment, place_group, ring_epoch

log = logging.getLogger(__name__)

TXN_MAX_OPS = 200  # operations per ZooKeeper transaction
TXN_MAX_BYTES = 512 * 1024  # well under ZooKeeper's 1 MB request limit
GARBAGE_AFTER = 60.0  # seconds before the assignments left by a departed agent are deleted
PURGE_INTERVAL = 3600.0  # seconds between deletions of runs past their retention
AGENT_RECORD_INTERVAL = 15.0  # seconds between refreshes of the agents collection
CALL_BUDGET = 5.0  # seconds any one MongoDB call of a pass may take
QUICK_READ = 0.5  # seconds a pass waits for the task read when it has tasks read before
RETRY_AFTER = (1.0, 2.0, 4.0)  # seconds before a failed pass is tried again, then every 4 s
RELEASED_SLACK = 30.0  # seconds past misfire_grace before a released claim nobody took is missed


class LeadershipLost(CloudTaskError):
    """This center is no longer the leader (its session or election node is gone)."""


@dataclass
class Placed:
    """One assignment as it is in ZooKeeper.

    ``valid_for`` is the registration (czxid) of the agent it was written for: an agent acts
    only on assignments written after it registered, so one written for an earlier life of a
    restarted agent is stale and is rewritten (or deleted), never trusted. ``mzxid`` is set
    when the node was read rather than written by this leader; ``valid_for`` is then resolved
    against the agent's registration when the agent is next seen.
    """

    revision: int
    epoch: int
    valid_for: int | None = None
    mzxid: int = 0

    def valid(self, joined: int) -> bool:
        if self.valid_for is None:
            self.valid_for = joined if self.mzxid > joined else -1
        return self.valid_for == joined


@dataclass
class TaskRecord:
    task_id: str
    group: str
    mode: str
    revision: int
    spec: dict[str, Any]
    updated_at: str | None = None
    misfire_grace: float = 0.0


class Center:
    def __init__(
        self,
        config: Config,
        store: Store,
        zk: KazooClient,
        *,
        center_id: str | None = None,
        resync_interval: float = 30.0,
        garbage_after: float = GARBAGE_AFTER,
        unassigned_grace: float | None = None,
        lost_grace: float | None = None,
        notify: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.zk = zk
        self.paths = ZkPaths(config.zookeeper.root)
        self.center_id = center_id or f"{socket.gethostname()}-{os.getpid()}"
        self.resync_interval = resync_interval
        self.garbage_after = garbage_after
        # seconds a task stays unassigned before it is an event (default: the agents' session
        # timeout, within which a restarted agent is back)
        self.unassigned_grace = (
            config.zookeeper.session_timeout if unassigned_grace is None else unassigned_grace
        )
        # seconds a departed agent's run must go without a heartbeat before it is lost: two
        # beats, the kill grace its guard gives the run's processes, and a second
        self.lost_grace = (
            2 * BEAT_INTERVAL + config.agent.kill_grace + 1.0 if lost_grace is None else lost_grace
        )
        self._unheard: dict[str, tuple[Any, float]] = {}  # run id -> (beat, since: monotonic)
        self._failed_passes = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connection_lost = threading.Event()
        self._election = zk.Election(self.paths.election, self.center_id)
        self.leading = False
        self.reconciles = 0
        self.writes = 0  # ZooKeeper write operations made while leading (for tests and benches)
        self.garbage_deleted = 0  # assignments of departed agents deleted later
        # alerts are sent by the leader only; deliveries are claimed in MongoDB before each
        # send, so a leader that has not yet noticed it lost its session cannot double one
        self.notifier = NotifierThread(store, config, is_leader=self.notifies) if notify else None
        self._fence: str | None = None
        self._tasks: dict[str, TaskRecord] = {}
        self._tasks_read = False  # read from MongoDB at least once in this leadership
        self._placed: dict[str, dict[str, Placed]] = {}  # agent id -> task id -> placed
        # assignments left by departed agents: agent id -> (since, task ids); deleted later,
        # off the failover path, or rewritten if the agent comes back first
        self._garbage: dict[str, tuple[float, set[str]]] = {}
        self._watched_groups: set[str] = set()
        self._seen_groups: set[str] = set()
        self._groups_lock = threading.Lock()
        self.unassigned: dict[str, str] = {}  # task id -> group, for tasks with no live agent
        self._unassigned_reported: set[str] = set()  # recorded as events (or by the last leader)
        self._unassigned_since: dict[str, float] = {}  # not reported yet: since (monotonic)
        self._published_status: dict[str, Any] | None = None
        self._recorded_agents: set[str] | None = None
        self._agents_recorded_at = 0.0
        self._purged_at = -PURGE_INTERVAL

    # --- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Contend for leadership until :meth:`stop`; lead whenever elected."""
        if not keep_trying("create its folders and register", self._start_up, self._stop):
            return
        self.zk.add_listener(self._on_state)
        self._watch()
        if self.notifier is not None:
            self.notifier.start()
        try:
            while not self._stop.is_set():
                self._connection_lost.clear()
                try:
                    self._election.run(self._lead)
                except KazooException as e:
                    log.warning("election interrupted: %s", e)
                if not self._stop.is_set():
                    time.sleep(0.2)
        finally:
            if self.notifier is not None:
                self.notifier.stop()
            self.zk.remove_listener(self._on_state)
            try:
                self.zk.delete(self.paths.center(self.center_id))
            except (KazooException, NoNodeError):
                pass

    def notifies(self) -> bool:
        """Whether this center sends alerts now: it leads and its session holds."""
        return self.leading and not self._connection_lost.is_set() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._election.cancel()

    def _start_up(self) -> None:
        for path in self.paths.persistent_folders():
            self.zk.ensure_path(path)
        self._register()

    def _register(self) -> None:
        doc = {
            "center_id": self.center_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": to_bson_time(utcnow()).isoformat(),
        }
        try:
            self.zk.create(self.paths.center(self.center_id), encode(doc), ephemeral=True)
        except NodeExistsError:
            self.zk.set(self.paths.center(self.center_id), encode(doc))

    def _on_state(self, state: str) -> None:
        if state in (KazooState.LOST, KazooState.SUSPENDED):
            self._connection_lost.set()
            self._wake.set()
        elif state == KazooState.CONNECTED:
            self._connection_lost.clear()  # the fence check tells whether we still lead

    # --- leading ----------------------------------------------------------------------------

    def _lead(self) -> None:
        lock = self._election.lock
        self._fence = f"{lock.path}/{lock.node}"
        self.leading = True
        self._connection_lost.clear()
        log.info("center %s leads", self.center_id)
        try:
            published = self._read_status()  # as the previous leader left it
            self._unassigned_reported = set(published.get("unassigned") or {})
            self._unassigned_since = {}
            self._record_leadership(str(lock.node), published.get("leader"))
            self._rebuild()
            self._unheard = {}
            self._failed_passes = 0
            while not self._stop.is_set() and not self._connection_lost.is_set():
                try:
                    self.reconcile()
                    self._failed_passes = 0
                except LeadershipLost as e:
                    log.warning("stepping down: %s", e)
                    return
                except (KazooException, CloudTaskError) as e:
                    self._failed_passes += 1
                    log.warning("reconcile failed, will retry: %s", e)
                except Exception:
                    self._failed_passes += 1
                    log.exception("reconcile failed, will retry")
                self._wake.wait(self._next_pass_in())
                self._wake.clear()
            if self._connection_lost.is_set():
                log.warning("connection to ZooKeeper suspended or lost: stepping down")
        finally:
            self.leading = False

    def _next_pass_in(self) -> float:
        """Seconds until the next pass: the resync interval, or sooner when a task's grace
        before its ``task.unassigned`` event ends earlier."""
        wait = self.resync_interval
        if self._failed_passes:
            wait = RETRY_AFTER[min(self._failed_passes, len(RETRY_AFTER)) - 1]
        if self._unassigned_since:
            ends = min(self._unassigned_since.values()) + self.unassigned_grace
            wait = min(wait, max(0.05, ends - time.monotonic()))
        if self._unheard:  # a departed agent's run becomes lost when its grace ends
            ends = min(since for _, since in self._unheard.values()) + self.lost_grace
            wait = min(wait, max(0.05, ends - time.monotonic()))
        return wait

    def _read_status(self) -> dict[str, Any]:
        try:
            data, _ = self.zk.get(self.paths.status)
        except NoNodeError:
            return {}
        return decode(data) or {}

    def _record_leadership(self, node: str, previous: Any) -> None:
        """The ``center.leader`` event; its id names our election node, so it is recorded
        once per leadership. A failure is logged: leading does not wait for MongoDB."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__}
        event = ev.leader_event(
            self.center_id, node, previous if isinstance(previous, str) else None, info
        )
        try:
            self.store.record_event(event)
        except Exception as e:
            log.warning("cannot record the leadership event: %s", e)

    def _watch(self) -> None:
        """Watches set once per process. Their callbacks run on kazoo's event thread: they
        only record and wake; the loop sets the per-group watches (see :meth:`_watch_groups`)."""

        def groups_changed(groups: list[str]) -> None:
            with self._groups_lock:
                self._seen_groups = set(groups)
            self._wake.set()

        ChildrenWatch(self.zk, self.paths.agents, groups_changed)
        DataWatch(self.zk, self.paths.task_signal, lambda *_: self._wake.set())

    def _watch_groups(self) -> None:
        with self._groups_lock:
            new = self._seen_groups - self._watched_groups
            self._watched_groups |= new
        for group in sorted(new):
            ChildrenWatch(self.zk, self.paths.agent_group(group), lambda _c: self._wake.set())

    def _rebuild(self) -> None:
        """Read every assignment from ZooKeeper: the only view a new leader starts from."""
        self._placed = {}
        self._garbage = {}
        self._tasks = {}
        self._tasks_read = False
        self._published_status = None
        self._recorded_agents = None
        self._agents_recorded_at = 0.0
        for agent_id in self.zk.get_children(self.paths.assignments):
            folder = self.paths.assignment_dir(agent_id)
            try:
                children = self.zk.get_children(folder)
            except NoNodeError:
                continue
            reads = {t: self.zk.get_async(f"{folder}/{t}") for t in children}
            placed: dict[str, Placed] = {}
            for task_id, result in reads.items():
                try:
                    data, stat = result.get()
                except NoNodeError:
                    continue
                doc = decode(data) or {}
                placed[task_id] = Placed(
                    int(doc.get("revision", 0)), int(doc.get("epoch", 0)), mzxid=stat.mzxid
                )
            self._placed[agent_id] = placed
        log.info(
            "rebuilt the placement of %d tasks on %d agents from ZooKeeper",
            sum(len(p) for p in self._placed.values()),
            len(self._placed),
        )

    def live_agents(self) -> dict[str, LiveAgent]:
        """The registered agents (see :mod:`cloudtask.registry`)."""
        return read_agents(self.zk, self.paths)

    def _refresh_tasks(self) -> None:
        """Bring the task cache in line with MongoDB, reading full specs only for changes."""
        revisions = self.store.task_revisions()
        wanted = {tid for tid, (_, done) in revisions.items() if not done}
        for task_id in set(self._tasks) - wanted:
            del self._tasks[task_id]
        changed = [
            t for t in wanted if t not in self._tasks or self._tasks[t].revision != revisions[t][0]
        ]
        for doc in self.store.get_tasks(changed) if changed else ():
            if not doc.get("enabled") or doc.get("done_at"):
                self._tasks.pop(doc["_id"], None)
                continue
            try:
                spec = parse_task(doc["spec"])
            except ValidationError as e:
                log.error("task %s is not valid and is not placed: %s", doc["_id"], e)
                self._tasks.pop(doc["_id"], None)
                continue
            updated = doc.get("updated_at")
            self._tasks[doc["_id"]] = TaskRecord(
                doc["_id"],
                spec.group,
                spec.mode,
                doc["revision"],
                doc["spec"],
                updated.isoformat() if isinstance(updated, datetime) else None,
                spec.misfire_grace,
            )
        self._tasks_read = True

    def desired(self, agents: dict[str, LiveAgent]) -> dict[str, dict[str, int]]:
        """agent id -> task id -> epoch, for every live agent (pure, given the caches)."""
        by_group: dict[str, list[LiveAgent]] = {}
        for agent in agents.values():
            if not agent.leaving:
                by_group.setdefault(agent.group, []).append(agent)
        out: dict[str, dict[str, int]] = {a: {} for a, agent in agents.items() if not agent.leaving}
        self.unassigned = {}
        one: dict[str, list[str]] = {}
        for task in self._tasks.values():
            members = by_group.get(task.group, [])
            if not members:
                self.unassigned[task.task_id] = task.group
            elif task.mode == "all":
                epoch = ring_epoch(_infos(members))
                for agent in members:
                    out[agent.agent_id][task.task_id] = epoch
            else:
                one.setdefault(task.group, []).append(task.task_id)
        current = {
            task_id: Assignment(agent_id, where.epoch)
            for agent_id, placed in self._placed.items()
            for task_id, where in placed.items()
            if task_id in self._tasks
            and self._tasks[task_id].mode == "one"
            and agent_id in agents
            and where.valid(agents[agent_id].joined)
        }
        for group, task_ids in one.items():
            infos = _infos(by_group[group])
            epoch = ring_epoch(infos)
            placement = place_group(task_ids, infos, current)
            for task_id, agent_id in placement.items():
                kept = current.get(task_id)
                same = kept is not None and kept.agent_id == agent_id
                out[agent_id][task_id] = kept.epoch if same else epoch
        return out

    def reconcile(self) -> int:
        """One level-triggered pass. Returns how many assignments were written."""
        self._watch_groups()
        stale_tasks = None
        # with tasks in hand a pass waits briefly for MongoDB: a departed agent's tasks move at
        # once even while it stalls (the pass after a failed one waits the whole budget)
        quick = self._tasks_read and not self._failed_passes
        try:
            with pymongo.timeout(QUICK_READ if quick else CALL_BUDGET):
                self._refresh_tasks()
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            if not self._tasks_read:
                raise
            stale_tasks = e  # place what we know: a dead agent's tasks move all the same
            log.warning("cannot read tasks; placing the ones read last: %s", e)
        agents_read_at = utcnow()
        agents = self.live_agents()
        desired = self.desired(agents)
        self._note_unassigned()
        self._sort_departed(agents)
        ops: list[tuple[str, str, str, bytes | None]] = []  # (kind, agent, task, data)
        for agent_id, tasks in desired.items():
            placed = self._placed.get(agent_id, {})
            joined = agents[agent_id].joined
            for task_id, epoch in tasks.items():
                record = self._tasks[task_id]
                where = placed.get(task_id)
                if where is None:
                    ops.append(
                        ("create", agent_id, task_id, self._assignment(record, epoch, joined))
                    )
                elif not where.valid(joined) or where.revision != record.revision:
                    ops.append(("set", agent_id, task_id, self._assignment(record, epoch, joined)))
        for agent_id, placed in self._placed.items():
            keep = desired.get(agent_id, {})
            for task_id in placed:
                if task_id not in keep:
                    ops.append(("delete", agent_id, task_id, None))
        # deletions first: a moved task leaves its old agent no later than it reaches the new one
        ops.sort(key=lambda op: op[0] != "delete")
        self._write(ops, desired)
        self._publish_status(agents)
        self._collect_garbage()
        self._judge_unheard_runs(agents, agents_read_at)
        self._record_agents(agents)
        self._purge_runs()
        self.reconciles += 1
        if ops:
            log.info("placement: %d changes written", len(ops))
        if stale_tasks is not None:
            raise CloudTaskError(f"placed from the tasks read last: {stale_tasks}")
        return len(ops)

    def _fenced(self) -> Any:
        """A transaction that applies only while our election node exists (we still lead)."""
        assert self._fence is not None
        txn = self.zk.transaction()
        txn.check(self._fence, 0)
        return txn

    @staticmethod
    def _commit_fenced(txn: Any) -> list[Any]:
        """Commit; LeadershipLost if the fence failed (other failures are the caller's)."""
        results = txn.commit()
        if isinstance(results[0], (NoNodeError, BadVersionError)):
            raise LeadershipLost("the election node is gone: another center may lead")
        return results

    def _publish_status(self, agents: dict[str, LiveAgent]) -> None:
        """``/status``: the leader and the tasks no live agent can run (their group is empty),
        for the web site and alerts. Written only when it changes."""
        status = {
            "leader": self.center_id,
            "unassigned": dict(sorted(self.unassigned.items())),
            "agents": sorted(a for a, agent in agents.items() if not agent.leaving),
        }
        if status == self._published_status:
            return
        txn = self._fenced()
        if self.zk.exists(self.paths.status):
            txn.set_data(self.paths.status, encode(status))
        else:
            txn.create(self.paths.status, encode(status))
        if not any(isinstance(r, Exception) for r in self._commit_fenced(txn)):
            self._published_status = status
            if self.unassigned:
                log.warning(
                    "%d tasks have no live agent in their group: %s",
                    len(self.unassigned),
                    ", ".join(sorted(set(self.unassigned.values()))),
                )

    def _note_unassigned(self) -> None:
        """Record ``task.unassigned`` for each task unassigned for ``unassigned_grace``
        seconds and not reported yet: once per transition into unassigned (a task assigned
        again is forgotten, and reported again if it loses its agents again). Recorded before
        ``/status`` is published; if recording fails, the tasks stay due for the next pass."""
        now = time.monotonic()
        current = self.unassigned
        reported = self._unassigned_reported & current.keys()
        since = {t: self._unassigned_since.get(t, now) for t in current if t not in reported}
        due = sorted(t for t, at in since.items() if now - at >= self.unassigned_grace)
        if due:
            events = []
            for task_id in due:
                record = self._tasks.get(task_id)
                name = record.spec.get("name") if record else None
                events.append(ev.unassigned_event(task_id, name, current[task_id]))
            try:
                self.store.record_events(events)
            except Exception as e:
                log.warning("cannot record %d unassigned tasks (will retry): %s", len(due), e)
            else:
                reported.update(due)
                for task_id in due:
                    del since[task_id]
        self._unassigned_reported, self._unassigned_since = reported, since

    def _sort_departed(self, agents: dict[str, LiveAgent]) -> None:
        """Assignments of agents that are gone (or leaving) become garbage, not deletions: the
        agents that take over their tasks are written first, and the rest is deleted later. A
        returning agent's garbage is placed again as stale (rewritten or deleted now)."""
        now = time.monotonic()
        for agent_id in list(self._placed):
            agent = agents.get(agent_id)
            if agent is None or agent.leaving:
                since, tasks = self._garbage.get(agent_id, (now, set()))
                self._garbage[agent_id] = (since, tasks | set(self._placed.pop(agent_id)))
        for agent_id in list(self._garbage):
            agent = agents.get(agent_id)
            if agent is not None and not agent.leaving:
                _, tasks = self._garbage.pop(agent_id)
                placed = self._placed.setdefault(agent_id, {})
                for task_id in tasks:
                    placed.setdefault(task_id, Placed(0, 0, valid_for=-1))

    def _collect_garbage(self) -> None:
        due = [
            a
            for a, (since, _) in self._garbage.items()
            if time.monotonic() - since >= self.garbage_after
        ]
        for agent_id in due:
            _, tasks = self._garbage[agent_id]
            ops = [("delete", agent_id, task_id, None) for task_id in sorted(tasks)]
            for i in range(0, len(ops), TXN_MAX_OPS):
                self._commit_garbage(ops[i : i + TXN_MAX_OPS])
            try:
                self.zk.delete(self.paths.assignment_dir(agent_id))
            except (NoNodeError, KazooException):
                pass  # not empty (the agent is back) or gone already
            self._garbage.pop(agent_id, None)

    def _commit_garbage(self, ops: list[tuple[str, str, str, bytes | None]]) -> None:
        txn = self._fenced()
        for _, agent_id, task_id, _ in ops:
            txn.delete(self.paths.assignment(agent_id, task_id))
        if any(
            isinstance(r, Exception) for r in self._commit_fenced(txn)
        ):  # some were gone already: one by one
            for _, agent_id, task_id, _ in ops:
                try:
                    self.zk.delete(self.paths.assignment(agent_id, task_id))
                except NoNodeError:
                    pass
        self.garbage_deleted += len(ops)

    def _assignment(self, record: TaskRecord, epoch: int, joined: int) -> bytes:
        return encode(
            {
                "task_id": record.task_id,
                "revision": record.revision,
                "epoch": epoch,
                "for_agent": joined,
                "updated_at": record.updated_at,
                "spec": record.spec,
            }
        )

    def _write(
        self, ops: list[tuple[str, str, str, bytes | None]], desired: dict[str, dict[str, int]]
    ) -> None:
        if not ops:
            return
        for agent_id in {op[1] for op in ops if op[0] == "create"}:
            if agent_id not in self._placed:
                self.zk.ensure_path(self.paths.assignment_dir(agent_id))
                self._placed[agent_id] = {}
        batch: list[tuple[str, str, str, bytes | None]] = []
        size = 0
        for op in ops:
            batch.append(op)
            size += len(op[3] or b"") + 200
            if len(batch) >= TXN_MAX_OPS or size >= TXN_MAX_BYTES:
                self._commit(batch, desired)
                batch, size = [], 0
        if batch:
            self._commit(batch, desired)

    def _commit(
        self, batch: list[tuple[str, str, str, bytes | None]], desired: dict[str, dict[str, int]]
    ) -> None:
        txn = self._fenced()
        for kind, agent_id, task_id, data in batch:
            path = self.paths.assignment(agent_id, task_id)
            if kind == "create":
                txn.create(path, data)
            elif kind == "set":
                txn.set_data(path, data)
            else:
                txn.delete(path)
        results = self._commit_fenced(txn)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            failures = [r for r in failures if not isinstance(r, RolledBackError)] or failures
            # the view was stale (a node already there or gone): read it again and retry
            self._rebuild()
            raise CloudTaskError(f"assignments changed under the leader: {failures[0]!r}")
        self.writes += len(batch)
        for kind, agent_id, task_id, data in batch:
            placed = self._placed.setdefault(agent_id, {})
            if kind == "delete":
                placed.pop(task_id, None)
            else:
                doc = decode(data) or {}
                placed[task_id] = Placed(
                    int(doc["revision"]), int(doc["epoch"]), valid_for=int(doc["for_agent"])
                )

    def _purge_runs(self) -> None:
        """Delete runs past ``runs.retention_days``, hourly (only the leader does it)."""
        if time.monotonic() - self._purged_at < PURGE_INTERVAL:
            return
        self._purged_at = time.monotonic()
        try:
            self.store.purge_runs()
        except CloudTaskError as e:
            log.warning("cannot delete old runs: %s", e)

    def _record_agents(self, agents: dict[str, LiveAgent]) -> None:
        """Keep MongoDB's list of agents (online, offline, last seen) for the web site: written
        when the set of agents changes, and every ``AGENT_RECORD_INTERVAL`` seconds."""
        live = {a: _agent_record(agent) for a, agent in agents.items()}
        due = time.monotonic() - self._agents_recorded_at >= AGENT_RECORD_INTERVAL
        if live.keys() == self._recorded_agents and not due:
            return
        try:
            self.store.record_agents(live)
        except CloudTaskError as e:
            log.warning("cannot record the agents in MongoDB: %s", e)
            return
        self._recorded_agents = set(live)
        self._agents_recorded_at = time.monotonic()

    def _judge_unheard_runs(self, agents: dict[str, LiveAgent], read_at: Any) -> None:
        """Runs claimed before the agents were read, under sessions not among theirs: a claim still
        ``queued`` never started and is released at once (the task's owner takes it over); a
        ``running`` run is marked ``lost`` once its heartbeat has not changed for
        ``lost_grace`` seconds (watched from here: clocks need not agree). Then released claims
        no agent took in time are recorded."""
        assert self._fence is not None
        if not self.zk.exists(self._fence):  # a deposed leader writes nothing, here either
            raise LeadershipLost("the election node is gone: another center may lead")
        try:
            with pymongo.timeout(CALL_BUDGET):
                # runs claimed under a session that is not registered now: their agent left, or
                # came back with a new session after an earlier life (a run waiting for an
                # agent, manual or released, has agent None: not lost)
                # (read by status alone, the rest picked here: exact, and on the embedded
                # server a "$nin" scans every run, seconds once they are many)
                sessions = {f"{agent.session:x}" for agent in agents.values()}
                read_at = to_bson_time(read_at)
                docs = [
                    d
                    for d in self.store.unfinished_runs({})
                    if d.get("agent") is not None
                    and d.get("session") not in sessions
                    and d["claimed_at"] < read_at
                ]
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot check for lost runs: %s", e)
            return
        now = time.monotonic()
        verdict, unheard = [], {}
        for doc in docs:
            if doc["status"] == "queued":
                verdict.append(doc)
                continue
            beat = doc.get("beat")
            seen = self._unheard.get(doc["_id"])
            if seen is None or seen[0] != beat:
                seen = (beat, now)
            if now - seen[1] >= self.lost_grace:
                verdict.append(doc)
            else:
                unheard[doc["_id"]] = seen
        self._unheard = unheard
        if verdict:
            try:
                with pymongo.timeout(CALL_BUDGET):
                    self.store.finish_unheard_runs(
                        verdict, "its agent left the cluster before the run finished"
                    )
            except (CloudTaskError, pymongo.errors.PyMongoError) as e:
                log.warning("cannot mark runs of departed agents: %s", e)
                return
            released = sum(1 for d in verdict if d["status"] == "queued")
            if released:
                log.warning("released %d claims their departed agents never started", released)
                self._signal_waiting_runs()
            if len(verdict) > released:
                log.warning("marked %d runs of departed agents lost", len(verdict) - released)
        self._settle_released_claims()

    def _signal_waiting_runs(self) -> None:
        try:
            run_signal(self.zk, self.paths, 1.0)()
        except (KazooException, CloudTaskError) as e:
            log.info("cannot signal the agents (they look every few seconds): %s", e)

    def _settle_released_claims(self) -> None:
        """Released claims (never started) that no agent took: of a task that is paused or
        gone they are ``skipped``; past their ``misfire_grace`` (and a slack) ``missed``."""
        try:
            with pymongo.timeout(CALL_BUDGET):
                waiting = self.store.released_claims()
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot check released claims: %s", e)
            return
        now = utcnow()
        verdicts: list[tuple[dict[str, Any], str, str]] = []
        for doc in waiting:
            record = self._tasks.get(doc["task_id"])
            if record is None:
                verdicts.append((doc, "skipped", "its task was paused, finished or deleted"))
                continue
            late = (now - doc["scheduled_for"]).total_seconds()
            if late > record.misfire_grace + RELEASED_SLACK:
                verdicts.append((doc, "missed", "no agent took it over within its misfire grace"))
        if not verdicts:
            return
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.finish_released_claims(verdicts)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot record released claims: %s", e)


def _agent_record(agent: LiveAgent) -> dict[str, Any]:
    # czxid: the registration, so a restart no leader saw is still a departure and a return
    return {**agent.info, "group": agent.group, "leaving": agent.leaving, "czxid": agent.joined}


def _infos(agents: Iterable[LiveAgent]) -> list[AgentInfo]:
    return [AgentInfo(a.agent_id, a.weight, a.joined) for a in agents]
