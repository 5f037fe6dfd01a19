"""The leader's periodic upkeep after each placement pass: what is not placement.

:class:`Housekeeping` keeps what the chores remember between passes of one leadership, and
:meth:`Housekeeping.upkeep` does one round of them on what a pass saw (a :class:`PassView`).
While a center leads, the rounds run on a thread of their own (:class:`UpkeepThread`): the
placement loop hands each pass's view over and goes on, so a MongoDB that stalls in the
middle of a chore never holds up the next placement (a departed agent's tasks move at once).
A round that is still running when the next view arrives is followed by one round on the
newest view only. Each chore is best effort: a chore MongoDB does not answer is logged and
done again in a later round. Every MongoDB call has a deadline (``CALL_BUDGET``).

* **Verdicts on unheard runs** (:meth:`Housekeeping.judge_unheard_runs`). Runs claimed
  before the agents were read, under sessions not among the registered ones, belong to an
  agent that left ("lost" means lost). A claim still ``queued`` never started: it is
  released at once, for the task's owner to run (and the agents are signalled). A
  ``running`` run is marked ``lost`` only once its heartbeat (written by its agent every few
  seconds) has stayed the same for ``lost_grace`` seconds of the leader's own clock: an
  agent cut off from ZooKeeper but still running its runs keeps beating them, and they are
  not lost. Before any verdict the leader checks that it still leads (the fence, see
  cloudtask/center/writer.py); each verdict is a conditional write (the run as read). Then
  released claims no agent took are recorded: ``skipped`` if their task is paused or gone,
  ``missed`` once past their ``misfire_grace`` (and ``RELEASED_SLACK``).
* **The agents' records** (:meth:`Housekeeping.record_agents`). MongoDB's list of agents
  (online, offline, last seen) for the web site, written when the set of agents changes and
  every ``AGENT_RECORD_INTERVAL`` seconds; ``Store.record_agents`` records the agents that
  joined, left or came back as events.
* **The unassigned tasks** (:meth:`Housekeeping.note_unassigned`,
  :meth:`Housekeeping.publish_status`). ``task.unassigned`` is recorded once per task that
  has had no live agent in its group for ``unassigned_grace`` seconds (a group briefly empty
  while its agent restarts, or while a whole cluster starts, is no alert); then ``/status``
  (the leader, the unassigned tasks, the live agents) is written, fenced, when it changes. A
  new leader starts from the unassigned tasks its predecessor published there
  (:meth:`Housekeeping.take_over`), so a task is not reported again by each leader.
* **Plan items** (:meth:`Housekeeping.follow_plan_items`): an attempt that ended
  ``failed``, ``timed_out`` or ``lost`` with attempts left and no next attempt yet gets it,
  queued for any agent of its type (the agent that saw it end writes it too; a lost one has
  no agent to).
* **The tasks too large to place** (:meth:`Housekeeping.note_too_large`): a
  ``task.unassigned`` event (details: reason ``too_large``, the assignment's bytes and the
  limit) once per revision of a task whose assignment the leader could not write (see
  cloudtask/center/writer.py, ``ASSIGNMENT_MAX_BYTES``); its id names the revision, so the
  next leader does not record it again.
* **Lateness** (cloudtask/center/lateness.py): the alerts of tasks that set ``warn_after``,
  ``deadline`` or ``expect_every`` (``run.slow``, ``task.deadline_missed``, ``task.overdue``
  and their ends), each once across leaders, every few seconds.
* **The purge** (:meth:`Housekeeping.purge_runs`): runs past ``runs.retention_days`` are
  deleted hourly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pymongo
from kazoo.exceptions import KazooException, NoNodeError

from .. import events as ev
from ..clock import to_bson_time, utcnow
from ..config import Config
from ..exceptions import CloudTaskError
from ..registry import LiveAgent
from ..runmodel import BEAT_INTERVAL
from ..store import Store
from ..zkpaths import ZkPaths, decode, run_signal
from .fanin import FanIn
from .lateness import Lateness
from .tasks import TaskRecord
from .writer import ASSIGNMENT_MAX_BYTES, FencedWriter, LeadershipLost

FOLLOW_INTERVAL = 2.0  # seconds between two looks for plan attempts to follow up

log = logging.getLogger(__name__)

PURGE_INTERVAL = 3600.0  # seconds between deletions of runs past their retention
AGENT_RECORD_INTERVAL = 15.0  # seconds between refreshes of the agents collection
CALL_BUDGET = 5.0  # seconds any one MongoDB call of a pass may take
RELEASED_SLACK = 30.0  # seconds past misfire_grace before a released claim nobody took is missed
PURGE_BUDGET = 60.0  # seconds the hourly deletion of old runs may take
MIN_ROUND_GAP = 0.2  # seconds between rounds on the same view (a chore that keeps failing)


@dataclass(frozen=True)
class PassView:
    """What one placement pass saw, for a round of upkeep: the live agents (read at
    ``read_at``), the tasks that should run, the tasks no live agent can run, and the tasks
    not placed because their assignment is too large (task id -> (revision, bytes))."""

    agents: dict[str, LiveAgent]
    read_at: datetime
    tasks: dict[str, TaskRecord]
    unassigned: dict[str, str]
    too_large: dict[str, tuple[int, int]] = field(default_factory=dict)
    # of the unassigned, those no live agent of the group has the labels for: their needs
    unmatched: dict[str, dict[str, str]] = field(default_factory=dict)


class Housekeeping:
    def __init__(
        self,
        config: Config,
        store: Store,
        zk: Any,
        paths: ZkPaths,
        writer: FencedWriter,
        center_id: str,
        *,
        unassigned_grace: float | None = None,
        lost_grace: float | None = None,
    ) -> None:
        self.store = store
        self.zk = zk
        self.paths = paths
        self.writer = writer
        self.center_id = center_id
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
        self.fanin = FanIn(store)  # the fires of tasks that run after others (fanin.py)
        self._followed_at = -FOLLOW_INTERVAL  # when plan items' ends were last looked at
        self._unassigned_reported: set[str] = set()  # recorded as events (or by the last leader)
        self._unassigned_since: dict[str, float] = {}  # not reported yet: since (monotonic)
        self._too_large_reported: set[tuple[str, int]] = set()  # (task id, revision)
        self._published_status: dict[str, Any] | None = None
        self._recorded_agents: set[str] | None = None
        self._agents_recorded_at = 0.0
        self._purged_at = -PURGE_INTERVAL
        self.lateness = Lateness(store)  # slow runs, deadlines, overdue tasks (lateness.py)

    def take_over(self) -> dict[str, Any]:
        """A new leadership: start from the ``/status`` the previous leader left (returned),
        with no run unheard yet."""
        try:
            data, _ = self.zk.get(self.paths.status)
        except NoNodeError:
            published: dict[str, Any] = {}
        else:
            published = decode(data) or {}
        # the tasks whose event the previous leader recorded; the others of its "unassigned"
        # were still in their grace and start it again here (an older leader's /status has
        # no "reported": every task it listed counts as reported, as it did then)
        unassigned = published.get("unassigned") or {}
        reported = published.get("reported", unassigned)
        self._unassigned_reported = set(reported) & set(unassigned)
        self._unassigned_since = {}
        self._unheard = {}
        self.lateness.take_over()
        return published

    def forget_written(self) -> None:
        """The view is rebuilt: ``/status`` and the agents' records are written again."""
        self._published_status = None
        self._recorded_agents = None
        self._agents_recorded_at = 0.0

    def upkeep(self, view: PassView, halted: Callable[[], bool] = lambda: False) -> None:
        """One round of the chores on ``view``, in this order (``task.unassigned`` is recorded
        before ``/status`` says it was), each skipped once ``halted()`` (the leadership is
        ending). LeadershipLost if the fence is gone."""
        chores = (
            lambda: self.note_unassigned(view.unassigned, view.tasks, view.unmatched),
            lambda: self.note_too_large(view.too_large, view.tasks),
            lambda: self.publish_status(view.agents, view.unassigned),
            lambda: self.judge_unheard_runs(view.agents, view.read_at, view.tasks),
            self.follow_plan_items,
            lambda: self.fire_after_tasks(view.tasks),
            lambda: self.lateness.check(view.tasks, self.writer.check_fence),
            lambda: self.record_agents(view.agents),
            self.purge_runs,
        )
        for chore in chores:
            if halted():
                return
            chore()

    def due_in(self) -> float | None:
        """Seconds until a grace ends (a task's before its ``task.unassigned`` event, a
        departed agent's run's before it is lost), or None."""
        now = time.monotonic()
        ends = []
        if self._unassigned_since:
            ends.append(min(self._unassigned_since.values()) + self.unassigned_grace)
        if self._unheard:
            ends.append(min(since for _, since in self._unheard.values()) + self.lost_grace)
        if (lateness := self.lateness.due_in()) is not None:
            ends.append(now + lateness)
        return min((max(0.05, end - now) for end in ends), default=None)

    # --- the unassigned tasks -----------------------------------------------------------------

    def note_unassigned(
        self,
        unassigned: dict[str, str],
        tasks: dict[str, TaskRecord],
        unmatched: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Record ``task.unassigned`` for each task unassigned for ``unassigned_grace``
        seconds and not reported yet: once per transition into unassigned (a task assigned
        again is forgotten, and reported again if it loses its agents again). Recorded before
        ``/status`` is published; if recording fails, the tasks stay due for the next pass.
        A task of ``unmatched`` (its group has live agents, none with the labels it requires)
        is recorded with reason ``no_agent_matches`` and its requirements."""
        now = time.monotonic()
        current = unassigned
        reported = self._unassigned_reported & current.keys()
        since = {t: self._unassigned_since.get(t, now) for t in current if t not in reported}
        due = sorted(t for t, at in since.items() if now - at >= self.unassigned_grace)
        if due:
            events = []
            for task_id in due:
                record = tasks.get(task_id)
                name = record.spec.get("name") if record else None
                needs = (unmatched or {}).get(task_id)
                events.append(ev.unassigned_event(task_id, name, current[task_id], needs))
            try:
                with pymongo.timeout(CALL_BUDGET):
                    self.store.record_events(events)
            except Exception as e:
                log.warning("cannot record %d unassigned tasks (will retry): %s", len(due), e)
            else:
                reported.update(due)
                for task_id in due:
                    del since[task_id]
        self._unassigned_reported, self._unassigned_since = reported, since

    def note_too_large(
        self, too_large: dict[str, tuple[int, int]], tasks: dict[str, TaskRecord]
    ) -> None:
        """Record a ``task.unassigned`` event (reason ``too_large``) once per revision of a
        task the leader did not place because its assignment is larger than ZooKeeper takes;
        if recording fails, the next round tries again."""
        current = {(task_id, revision) for task_id, (revision, _) in too_large.items()}
        self._too_large_reported &= current
        due = sorted(current - self._too_large_reported)
        if not due:
            return
        events = []
        for task_id, revision in due:
            size = too_large[task_id][1]
            record = tasks.get(task_id)
            name = record.spec.get("name") if record else None
            group = record.group if record else None
            events.append(
                ev.event_document(
                    "task.unassigned",
                    f"task {name or task_id} does not run: its assignment is {size:,} bytes, "
                    f"more than the {ASSIGNMENT_MAX_BYTES:,} bytes a ZooKeeper node may hold "
                    "here; make its spec smaller (env, command, http body and headers, "
                    "description)",
                    event_id=f"task.unassigned:{task_id}:{revision}:too_large",
                    task_id=task_id,
                    task_name=name,
                    group=group,
                    details={
                        "reason": "too_large",
                        "bytes": size,
                        "limit": ASSIGNMENT_MAX_BYTES,
                        "revision": revision,
                        "group": group,
                    },
                )
            )
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.record_events(events)
        except Exception as e:
            log.warning("cannot record %d tasks too large to place (will retry): %s", len(due), e)
        else:
            self._too_large_reported.update(due)

    def publish_status(self, agents: dict[str, LiveAgent], unassigned: dict[str, str]) -> None:
        """``/status``: the leader and the tasks no live agent can run (their group is empty),
        for the web site and alerts. Written only when it changes."""
        status = {
            "leader": self.center_id,
            "unassigned": dict(sorted(unassigned.items())),
            # of those, the ones whose task.unassigned is recorded (a next leader goes on)
            "reported": sorted(self._unassigned_reported & unassigned.keys()),
            "agents": sorted(a for a, agent in agents.items() if not agent.leaving),
        }
        if status == self._published_status:
            return
        if self.writer.put_status(status):
            self._published_status = status
            if unassigned:
                log.warning(
                    "%d tasks have no live agent in their group: %s",
                    len(unassigned),
                    ", ".join(sorted(set(unassigned.values()))),
                )

    # --- runs of departed agents --------------------------------------------------------------

    def judge_unheard_runs(
        self, agents: dict[str, LiveAgent], read_at: Any, tasks: dict[str, TaskRecord]
    ) -> None:
        """Runs claimed before the agents were read, under sessions not among theirs: a claim still
        ``queued`` never started and is released at once (the task's owner takes it over); a
        ``running`` run is marked ``lost`` once its heartbeat has not changed for
        ``lost_grace`` seconds (watched from here: clocks need not agree). Then released claims
        no agent took in time are recorded."""
        self.writer.check_fence()  # a deposed leader writes nothing, here either
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
                self._rerun_lost([d for d in verdict if d["status"] != "queued"], tasks)
        self._settle_released_claims(tasks)

    def _rerun_lost(self, lost: list[dict[str, Any]], tasks: dict[str, TaskRecord]) -> None:
        """Runs just marked lost of tasks with ``on_lost: rerun``: their fire is queued again
        as the next attempt (trigger ``retry``) for the task's owner to take, while the
        attempts stay within the task's retries (one rerun at least). A mode ``all`` run is
        its agent's slot, gone with it: not run again. Plan items have their own follow-up."""
        reruns = []
        for doc in lost:
            record = tasks.get(doc.get("task_id", ""))
            if record is None or doc.get("trigger") == "plan" or doc.get("slot") != "one":
                continue
            if record.spec.get("on_lost", "record") != "rerun":
                continue
            if doc.get("attempt", 0) + 1 > max(1, int(record.spec.get("retries") or 0)):
                continue
            reruns.append(doc)
        if not reruns:
            return
        try:
            with pymongo.timeout(CALL_BUDGET):
                queued = self.store.rerun_lost_runs(reruns)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot queue the lost runs to run again: %s", e)
            return
        if queued:
            log.warning("queued %d lost runs to run again (on_lost: rerun)", queued)
            self._signal_waiting_runs()

    def fire_after_tasks(self, tasks: dict[str, TaskRecord]) -> None:
        """Tasks that run after their parents: the dates all their parents succeeded for
        get their fire (cloudtask/center/fanin.py), every FANIN_INTERVAL seconds."""
        if not self.fanin.due():
            return
        self.writer.check_fence()
        try:
            with pymongo.timeout(CALL_BUDGET):
                queued = self.fanin.fire(tasks)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot fire the tasks that run after others: %s", e)
            return
        if queued:
            self._signal_waiting_runs()

    def follow_plan_items(self) -> None:
        """Plan items whose attempt ended ``failed``, ``timed_out`` or ``lost`` with
        attempts left and no next attempt written yet (a lost one always: its agent is gone;
        a failed one when its agent died before writing it): the next attempt is queued
        (the same document whoever writes it, see cloudtask/store/plans.py). At most every
        FOLLOW_INTERVAL seconds: the agents follow their own attempts at once; this is the
        net for the ones whose agent died."""
        if time.monotonic() - self._followed_at < FOLLOW_INTERVAL:
            return
        self._followed_at = time.monotonic()
        self.writer.check_fence()
        try:
            with pymongo.timeout(CALL_BUDGET):
                ended = self.store.unfollowed_ends()
                queued = sum(1 for doc in ended if self.store.follow_item(doc))
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot queue the next attempts of plan items: %s", e)
            return
        if queued:
            log.info("queued the next attempt of %d plan items", queued)
            self._signal_waiting_runs()

    def _signal_waiting_runs(self) -> None:
        try:
            run_signal(self.zk, self.paths, 1.0)()
        except (KazooException, CloudTaskError) as e:
            log.info("cannot signal the agents (they look every few seconds): %s", e)

    def _settle_released_claims(self, tasks: dict[str, TaskRecord]) -> None:
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
            record = tasks.get(doc["task_id"])
            if record is None:
                verdicts.append((doc, "skipped", "its task was paused, finished or deleted"))
                continue
            # a retry (a rerun of a lost run among them) and the fire of an after task are
            # late from when they were queued
            queued = doc.get("trigger") in ("retry", "after")
            since = doc["claimed_at"] if queued else doc["scheduled_for"]
            late = (now - since).total_seconds()
            if doc.get("trigger") == "backfill":
                continue  # asked for, in order: it waits for its turn however long
            if late > record.misfire_grace + RELEASED_SLACK:
                verdicts.append((doc, "missed", "no agent took it over within its misfire grace"))
        if not verdicts:
            return
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.finish_released_claims(verdicts)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot record released claims: %s", e)

    # --- records ------------------------------------------------------------------------------

    def record_agents(self, agents: dict[str, LiveAgent]) -> None:
        """Keep MongoDB's list of agents (online, offline, last seen) for the web site: written
        when the set of agents changes, and every ``AGENT_RECORD_INTERVAL`` seconds."""
        live = {a: agent_record(agent) for a, agent in agents.items()}
        due = time.monotonic() - self._agents_recorded_at >= AGENT_RECORD_INTERVAL
        if live.keys() == self._recorded_agents and not due:
            return
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.record_agents(live)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot record the agents in MongoDB: %s", e)
            return
        self._recorded_agents = set(live)
        self._agents_recorded_at = time.monotonic()

    def purge_runs(self) -> None:
        """Delete runs past ``runs.retention_days``, hourly (only the leader does it)."""
        if time.monotonic() - self._purged_at < PURGE_INTERVAL:
            return
        self._purged_at = time.monotonic()
        try:
            with pymongo.timeout(PURGE_BUDGET):
                self.store.purge_runs()
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot delete old runs: %s", e)


class UpkeepThread:
    """The rounds of upkeep of one leadership, on a thread of their own.

    :meth:`submit` hands over the newest :class:`PassView` and returns at once; the thread
    does one round on the newest view it holds, then waits for the next, or for a grace of
    the chores to end (:meth:`Housekeeping.due_in`). ``deposed`` is set
    (and ``on_deposed`` called) when a round finds the fence gone: the placement loop then
    steps down. :meth:`stop` waits for the round in flight (each MongoDB call is bounded)."""

    def __init__(self, chores: Housekeeping, on_deposed: Any = None) -> None:
        self.chores = chores
        self.on_deposed = on_deposed
        self.deposed = False
        self.rounds = 0
        self._view: PassView | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upkeep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, view: PassView) -> None:
        with self._lock:
            self._view = view
        self._wake.set()

    def stop(self, timeout: float = 3 * CALL_BUDGET) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("a round of upkeep is still waiting for MongoDB; left to end alone")

    def ended(self, stop: threading.Event) -> bool:
        """Wait until the thread has ended (after :meth:`stop`), or ``stop`` is set; whether it
        ended. A center that leads again waits here first, so no round of the earlier
        leadership runs beside the new one's (both hold the same :class:`Housekeeping`)."""
        warn_at = time.monotonic() + CALL_BUDGET
        while self._thread.is_alive() and not stop.is_set():
            self._thread.join(0.2)
            if self._thread.is_alive() and time.monotonic() >= warn_at:
                log.warning("still waiting for the previous leadership's round of upkeep")
                warn_at += 3 * CALL_BUDGET
        return not self._thread.is_alive()

    def _run(self) -> None:
        last: PassView | None = None
        while not self._stop.is_set():
            # a grace that ends (Housekeeping.due_in) is a round on the newest view held: any
            # change of agents or tasks makes a pass, which hands over a newer one
            due = self.chores.due_in() if last is not None else None
            self._wake.wait(None if due is None else max(due, MIN_ROUND_GAP))
            self._wake.clear()
            with self._lock:
                view, self._view = self._view, None
            view = view or last
            if view is None or self._stop.is_set():
                continue
            last = view
            try:
                self.chores.upkeep(view, self._stop.is_set)
            except LeadershipLost as e:
                log.warning("upkeep stopped: %s", e)
                self.deposed = True
                if self.on_deposed is not None:
                    self.on_deposed()
                return
            except (KazooException, CloudTaskError) as e:
                log.warning("a round of upkeep failed; the next pass tries again: %s", e)
            except Exception:
                log.exception("a round of upkeep failed; the next pass tries again")
            self.rounds += 1


def agent_record(agent: LiveAgent) -> dict[str, Any]:
    """An agent as ``Store.record_agents`` keeps it: its registration info, group, leaving
    state and czxid (the registration, so a restart no leader saw is still a departure and a
    return)."""
    return {**agent.info, "group": agent.group, "leaving": agent.leaving, "czxid": agent.joined}
