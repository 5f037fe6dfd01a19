"""The center: any number run, one leads (kazoo Election); the leader places tasks on agents.

The leader's loop is level-triggered. Woken by a change of agents (watches on
``/agents/<group>``), by a task change (``/signals/tasks``) or by the periodic resync, it
computes the desired placement from the enabled tasks in MongoDB (cloudtask/center/tasks.py)
and the live agents in ZooKeeper (cloudtask/registry.py), compares it with the assignments in
ZooKeeper and writes only the difference (placement: cloudtask/center/placement.py, which also
says how a task's ``requires`` and the agents' labels and running runs are used). Each
assignment of a ``mode: all`` task carries its agent's shard (index by sorted agent id among
the matching agents, and their total), rewritten when they change. Followers only wait (and
keep the tasks read). A new leader rebuilds its view of the assignments from
ZooKeeper and places from a read of the tasks begun after it was elected, before it writes
anything; no view of the assignments is carried across leaderships.

Every write transaction is fenced (cloudtask/center/writer.py): it also checks that the
leader's own election node still exists. A leader that was paused past its session and wakes
up cannot write: its node went with its session, so its transactions fail, and it steps down.
A transaction that fails because the view was stale makes the leader read every assignment
again before it writes anything else.

A task whose assignment would be larger than a ZooKeeper request may be
(``ASSIGNMENT_MAX_BYTES``, see cloudtask/center/writer.py) is not placed: its assignments are
deleted, the error is logged and recorded as a ``task.unassigned`` event (reason
``too_large``) naming the task and the size, and the other tasks are placed as ever. It is
tried again when its spec changes.

After the placement each pass deletes the garbage of departed agents and hands what it saw
to the leader's upkeep (cloudtask/center/housekeeping.py), which runs on a thread of its own:
``/status`` and the ``task.unassigned`` events, the verdicts on the runs of agents that left
(released or ``lost``), the agents' records in MongoDB and the purge of old runs. The leader
also records ``center.leader`` when it starts leading.

The placement never waits for MongoDB: the tasks are read by the center's task feed, a
thread of its own for the center's whole life (cloudtask/center/tasks.py), and a pass takes
its latest snapshot, so while MongoDB stalls a dead agent's tasks move all the same. A new
leader places nothing until a read begun after its leadership began has ended (a standby's
warm cache makes that read the cheap one: the changes). A failed pass is tried again within
seconds, not at the next resync.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from .. import __version__
from .. import events as ev
from ..clock import to_bson_time, utcnow
from ..config import Config
from ..exceptions import CloudTaskError
from ..metrics import CenterMetrics, serve
from ..notify import NotifierThread
from ..registry import LiveAgent, read_agents
from ..store import Store
from ..zkpaths import ZkPaths, encode, keep_trying
from .housekeeping import CALL_BUDGET, Housekeeping, PassView, UpkeepThread
from .placement import AgentInfo, Assignment, agent_info, plan_group, ring_epoch, shards
from .tasks import TaskFeed, TaskRecord
from .writer import (
    ASSIGNMENT_MAX_BYTES,
    GARBAGE_AFTER,
    FencedWriter,
    LeadershipLost,
    Op,
    StaleView,
    assignment_data,
)

log = logging.getLogger(__name__)

# seconds a new leader's pass waits for a read begun after it was elected (one that fails
# ends the wait: the pass is tried again within seconds)
FIRST_READ_WAIT = 60.0
RETRY_AFTER = (1.0, 2.0, 4.0)  # seconds before a failed pass is tried again, then every 4 s
# seconds after a pass that took tasks away for good (deleted, paused, done) until the next:
# their agents release the claims they made ahead, and that pass records them skipped
RELEASES_SETTLE_AFTER = 3.0


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
        self._failed_passes = 0
        self._settle_released_at: float | None = None  # a pass soon for released claims
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connection_lost = threading.Event()
        self._election = zk.Election(self.paths.election, self.center_id)
        self.leading = False
        self.reconciles = 0
        # alerts are sent by the leader only; deliveries are claimed in MongoDB before each
        # send, so a leader that has not yet noticed it lost its session cannot double one
        self.notifier = NotifierThread(store, config, is_leader=self.notifies) if notify else None
        self.writer = FencedWriter(zk, self.paths, garbage_after)
        self.chores = Housekeeping(
            config,
            store,
            zk,
            self.paths,
            self.writer,
            self.center_id,
            unassigned_grace=unassigned_grace,
            lost_grace=lost_grace,
        )
        self.upkeep: UpkeepThread | None = None  # while leading: the chores' thread
        self._last_upkeep: UpkeepThread | None = None  # waited for before leading again
        # the tasks, read by a thread of their own; a pass places from its latest snapshot
        self.feed = TaskFeed(
            store, interval=resync_interval, on_change=self._wake.set, budget=CALL_BUDGET
        )
        self._tasks: dict[str, TaskRecord] = {}  # the snapshot the current pass places
        self._led_since = 0.0  # monotonic time this leadership began
        self._watched_groups: set[str] = set()
        self._seen_groups: set[str] = set()
        self._groups_lock = threading.Lock()
        self.unassigned: dict[str, str] = {}  # task id -> group, for tasks with no live agent
        # of those, the tasks whose group has live agents but none with the labels they
        # require: task id -> its requirements (the event's reason: no_agent_matches)
        self.unmatched: dict[str, dict[str, str]] = {}
        # agent id -> task id -> (index, total): the shard of each agent of a mode-all task
        self.shards: dict[str, dict[str, tuple[int, int]]] = {}
        # task id -> (revision, bytes): tasks not placed, their assignment too large to write
        # (tried again once their revision changes)
        self.too_large: dict[str, tuple[int, int]] = {}
        # its Prometheus metrics (cloudtask/metrics), served on center.metrics_port if set
        self.metrics = CenterMetrics(self)

    @property
    def writes(self) -> int:
        """Assignment writes made while leading (for tests and benches)."""
        return self.writer.writes

    @property
    def garbage_deleted(self) -> int:
        """Assignments of departed agents deleted later."""
        return self.writer.garbage_deleted

    @property
    def garbage_after(self) -> float:
        return self.writer.garbage_after

    @garbage_after.setter
    def garbage_after(self, seconds: float) -> None:
        self.writer.garbage_after = seconds

    # --- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Contend for leadership until :meth:`stop`; lead whenever elected."""
        if not keep_trying("create its folders and register", self._start_up, self._stop):
            return
        self.zk.add_listener(self._on_state)
        ccfg = self.config.center
        metrics = serve(self.metrics.registry, ccfg.metrics_host, ccfg.metrics_port, "center")
        self.feed.start()  # standing by too: a new leader starts from a warm cache
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
            self.feed.stop()
            if self.notifier is not None:
                self.notifier.stop()
            self.zk.remove_listener(self._on_state)
            try:
                self.zk.delete(self.paths.center(self.center_id))
            except (KazooException, NoNodeError):
                pass
            if metrics is not None:
                metrics.close()

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
        # a round of an earlier leadership of this center may still wait for a call; it ends
        # before the fence is renewed (until then its writes meet the old, deleted fence)
        if self._last_upkeep is not None and not self._last_upkeep.ended(self._stop):
            return  # stopping meanwhile: lead no more
        lock = self._election.lock
        self.writer.fence = f"{lock.path}/{lock.node}"
        self._led_since = time.monotonic()
        self.feed.ask()  # a read begun now: the first one this leadership may place from
        self.leading = True
        self._connection_lost.clear()
        log.info("center %s leads", self.center_id)
        self.upkeep = self._last_upkeep = UpkeepThread(self.chores, on_deposed=self._wake.set)
        try:
            published = self.chores.take_over()  # /status as the previous leader left it
            self._record_leadership(str(lock.node), published.get("leader"))
            self._rebuild()
            self._failed_passes = 0
            self.upkeep.start()
            while not self._stop.is_set() and not self._connection_lost.is_set():
                try:
                    with self.metrics.placement_pass():  # counted and timed
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
            self.upkeep.stop()  # a new leadership starts its chores from scratch
            self.upkeep = None

    def _next_pass_in(self) -> float:
        """Seconds until the next pass: the resync interval, sooner after a failed pass. (The
        graces of the housekeeping are kept by the upkeep thread.)"""
        if self._failed_passes:
            return RETRY_AFTER[min(self._failed_passes, len(RETRY_AFTER)) - 1]
        if self._settle_released_at is not None:
            wait = self._settle_released_at - time.monotonic()
            self._settle_released_at = None
            return max(0.0, min(self.resync_interval, wait))
        return self.resync_interval

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
        DataWatch(self.zk, self.paths.task_signal, self._task_signal)

    def _task_signal(self, _data: Any, _stat: Any, event: Any = None) -> None:
        """A task changed, or an agent announced it is leaving (it bumps the same signal): a
        pass now, on the tasks read last, and a read of the tasks (a pass again if they
        changed). Not the watch's first call (``event`` None): a read begun then, before
        this center is elected, would not do for its first pass (see TaskFeed)."""
        if event is not None:
            self.feed.ask()
        self._wake.set()

    def _watch_groups(self) -> None:
        with self._groups_lock:
            new = self._seen_groups - self._watched_groups
            self._watched_groups |= new
        for group in sorted(new):
            ChildrenWatch(self.zk, self.paths.agent_group(group), lambda _c: self._wake.set())

    def _rebuild(self) -> None:
        """Forget every cache of the assignments and read them all from ZooKeeper: the only
        view a new leader starts from (and the one a stale view is replaced by). The tasks are
        the feed's: a new leader places from a read begun after it was elected."""
        self.chores.forget_written()
        self.writer.rebuild()

    def live_agents(self) -> dict[str, LiveAgent]:
        """The registered agents (see :mod:`cloudtask.registry`)."""
        return read_agents(self.zk, self.paths)

    def _take_tasks(self) -> None:
        """The feed's latest tasks, read since this leadership began (waiting up to
        ``FIRST_READ_WAIT`` for the first such read); CloudTaskError if there is none yet.
        The pass asks the feed for a read, which it does not wait for: tasks written straight
        to the store (no task signal) are placed as soon as any pass runs, as when a pass read
        them itself. Without the feed's thread (a pass called on its own, as tests do) the pass reads them
        itself."""
        if not self.feed.running:
            self.feed.read_once()
        else:  # every pass asks for a read too (a pass again if it brings changes)
            self.feed.ask()
        tasks = self.feed.snapshot(self._led_since) or self.feed.wait(
            self._led_since, FIRST_READ_WAIT
        )
        if tasks is None:
            why = f": {self.feed.error}" if self.feed.error is not None else ""
            raise CloudTaskError(f"the tasks are not read yet since this center leads{why}")
        self._tasks = tasks

    def desired(self, agents: dict[str, LiveAgent]) -> dict[str, dict[str, int]]:
        """agent id -> task id -> epoch, for every live agent (pure, given the caches)."""
        by_group: dict[str, list[LiveAgent]] = {}
        for agent in agents.values():
            if not agent.leaving:
                by_group.setdefault(agent.group, []).append(agent)
        out: dict[str, dict[str, int]] = {a: {} for a, agent in agents.items() if not agent.leaving}
        self.unassigned, self.unmatched, self.shards = {}, {}, {}
        one: dict[str, list[str]] = {}
        needs: dict[str, dict[str, str]] = {}
        infos_of = {g: {i.agent_id: i for i in _infos(m)} for g, m in by_group.items()}
        for task in self._tasks.values():
            if task.task_id in self.too_large:  # its assignment cannot be written: nowhere
                continue
            members = by_group.get(task.group, [])
            if not members:
                self.unassigned[task.task_id] = task.group
            elif task.mode == "all":
                infos = infos_of[task.group]
                matching = [a for a in members if infos[a.agent_id].matches(task.requires)]
                if not matching:
                    self.unassigned[task.task_id] = task.group
                    self.unmatched[task.task_id] = dict(task.requires)
                    continue
                epoch = ring_epoch(infos.values())
                shard = shards(a.agent_id for a in matching)  # by sorted id, at this pass
                for agent in matching:
                    where = self.writer.placed.get(agent.agent_id, {}).get(task.task_id)
                    kept = where is not None and where.valid(agent.joined)
                    out[agent.agent_id][task.task_id] = where.epoch if kept else epoch
                    self.shards.setdefault(agent.agent_id, {})[task.task_id] = shard[agent.agent_id]
            else:
                one.setdefault(task.group, []).append(task.task_id)
                if task.requires:
                    needs[task.task_id] = task.requires
        current = {
            task_id: Assignment(agent_id, where.epoch)
            for agent_id, placed in self.writer.placed.items()
            for task_id, where in placed.items()
            if task_id in self._tasks
            and self._tasks[task_id].mode == "one"
            and agent_id in agents
            and where.valid(agents[agent_id].joined)
        }
        for group, task_ids in one.items():
            infos = list(infos_of[group].values())
            epoch = ring_epoch(infos)
            plan = plan_group(task_ids, infos, current, requires=needs)
            for task_id, wanted in plan.unmatched.items():
                self.unassigned[task_id] = group
                self.unmatched[task_id] = wanted
            for task_id, agent_id in plan.placement.items():
                kept = current.get(task_id)
                same = kept is not None and kept.agent_id == agent_id
                redate = not same or task_id in plan.redated
                out[agent_id][task_id] = epoch if redate else kept.epoch
        return out

    def reconcile(self) -> int:
        """One level-triggered pass. Returns how many assignments were written.

        The upkeep of the pass runs on the upkeep thread while leading (see :meth:`_lead`),
        in this call otherwise."""
        if self.upkeep is not None and self.upkeep.deposed:
            raise LeadershipLost("the upkeep found the election node gone")
        self._watch_groups()
        self._take_tasks()
        self.too_large = {  # a task changed since is tried again
            task_id: (revision, size)
            for task_id, (revision, size) in self.too_large.items()
            if task_id in self._tasks and self._tasks[task_id].revision == revision
        }
        agents_read_at = utcnow()
        agents = self.live_agents()
        desired = self.desired(agents)
        self.writer.sort_departed(agents)
        ops = self._changes(desired, agents)
        if any(kind == "delete" and task_id not in self._tasks for kind, _, task_id, _ in ops):
            self._settle_released_at = time.monotonic() + RELEASES_SETTLE_AFTER
        try:
            self.writer.write(ops)  # deletions first
        except StaleView:
            self._rebuild()  # read it again; the next pass places on what is there
            raise
        self.writer.collect_garbage()
        view = PassView(
            agents, agents_read_at, self._tasks, self.unassigned, self.too_large, self.unmatched
        )
        if self.upkeep is not None:
            self.upkeep.submit(view)
        else:
            self.chores.upkeep(view)
        self.reconciles += 1
        if ops:
            log.info("placement: %d changes written", len(ops))
        return len(ops)

    def _changes(
        self, desired: dict[str, dict[str, int]], agents: dict[str, LiveAgent]
    ) -> list[Op]:
        """What to write for ``desired``: a create for each assignment missing, a set for each
        one written for another life of its agent, another revision of its task or another
        epoch (re-dated), a delete for each one not desired (the assignments of departed
        agents are garbage already). A task whose assignment is larger than
        ``ASSIGNMENT_MAX_BYTES`` gets no create or set, and its assignments are deleted (see
        :meth:`_refuse`)."""
        ops: list[Op] = []
        refused: dict[str, tuple[int, int]] = {}
        for agent_id, tasks in desired.items():
            placed = self.writer.placed.get(agent_id, {})
            joined = agents[agent_id].joined
            shards_here = self.shards.get(agent_id, {})
            for task_id, epoch in tasks.items():
                record = self._tasks[task_id]
                where = placed.get(task_id)
                shard = shards_here.get(task_id)
                if where is None:
                    kind = "create"
                elif (
                    not where.valid(joined)
                    or where.revision != record.revision
                    or where.epoch != epoch
                    or where.shard != shard
                ):
                    kind = "set"
                else:
                    continue
                data = assignment_data(record, epoch, joined, shard)
                if len(data) > ASSIGNMENT_MAX_BYTES:
                    refused[task_id] = (record.revision, len(data))
                    continue
                ops.append((kind, agent_id, task_id, data))
        if refused:
            self._refuse(refused)
            ops = [op for op in ops if op[2] not in refused]  # on every agent (mode all)
        for agent_id, placed in self.writer.placed.items():
            keep = desired.get(agent_id, {})
            for task_id in placed:
                if task_id not in keep or task_id in self.too_large:
                    ops.append(("delete", agent_id, task_id, None))
        return ops

    def _refuse(self, refused: dict[str, tuple[int, int]]) -> None:
        """Place no more the tasks of ``refused`` (task id -> (revision, bytes of its
        assignment)) until their revision changes: written, such an assignment would make
        ZooKeeper drop the leader's connection, and the pass would fail again and again. The
        upkeep records each as a ``task.unassigned`` event."""
        for task_id, (revision, size) in sorted(refused.items()):
            record = self._tasks[task_id]
            log.error(
                "task %s (%s, revision %d) is not placed: its assignment is %d bytes, more "
                "than the %d bytes a ZooKeeper request may carry; make its spec smaller",
                record.spec.get("name") or task_id,
                task_id,
                revision,
                size,
                ASSIGNMENT_MAX_BYTES,
            )
        self.too_large.update(refused)


def _infos(agents: Iterable[LiveAgent]) -> list[AgentInfo]:
    """What placement takes of each registration: its id, weight, registration, labels and
    running runs (see :func:`cloudtask.center.placement.agent_info`)."""
    return [agent_info(a.agent_id, a.weight, a.joined, a.info) for a in agents]
