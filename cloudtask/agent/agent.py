"""The agent: keeps its task set, ticks the scheduler, claims fires in batches, runs them.

In standalone mode (``cloudtask agent --standalone``) the agent reads the tasks of its group
straight from MongoDB every ``poll_interval``; it is one process, so there is no placement.
Every fire is still claimed through the unique run index, so two standalone agents given the
same tasks run each fire once between them. The cluster agent (cluster.py) follows its
assignments in ZooKeeper instead; both hand the loop an :class:`AssignedTask` per task.

The claim protocol (docs/architecture.md, "A fire runs once"):

- A fire is claimed by inserting its run document; the unique index on ``(task, scheduled_for,
  slot, attempt)`` lets one process win it. A claim the agent can start at once is written
  ``running``; one that must wait for a slot is written ``queued`` and moved to ``running`` by
  a conditional write just before its process starts. So a ``queued`` claim has certainly not
  started, and a claim whose agent left before starting it is released by the leader and run
  by the task's new owner instead of being written off (manual.py).
- Nothing starts unless the agent's fence holds: checked after the claim is written, and again
  just before the process starts (for the claim's own session). A fire claimed by an agent
  that lost its fence meanwhile is released, never started late.
- When a claim cannot be written (MongoDB unreachable), its fires wait. Each step first
  settles the claims whose write may have landed (they are ours if stored), then collapses each
  task's backlog like a late tick (claims.py): the newest fire runs (or is caught up, per
  ``misfire``), every older one is recorded ``missed``; ``forbid`` is checked again at claim
  time. No fire is dropped without a record. A step stops at the first chunk that fails.
- A schedule's fires are claimed ahead of their due time (``agent.claim_ahead``), written
  ``claimed``, and kept until then (armed.py): at the due time only local checks and the spawn
  remain, with no MongoDB call. A claim that cannot start then is released or recorded.
- A keepalive start takes its lease first (leases.py): one instance in the whole cluster.
- Every MongoDB call of the loop has a deadline (``CALL_BUDGET``, budget.py); the loop never
  waits longer.

The recipes the loop calls: the task's history when it comes here and the runs another agent
is finishing (handover.py), runs waiting for an agent (manual.py), keepalive leases
(leases.py), an earlier life's leftovers (recovery.py), the run journal (journal.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pymongo

from ..clock import to_bson_time, utcnow
from ..config import Config
from ..exceptions import ConfigError, ValidationError
from ..metrics import AgentMetrics, serve
from ..runmodel import RETRY_STATUSES, RUNNING_STATUSES, new_id
from ..secretbox import SecretBox, SecretError, load_box
from ..store import Store, all_revisions, task_pages
from ..task import TaskSpec, parse_task
from .armed import Armed, StartTimer
from .assigned import AssignedTask
from .budget import CALL_BUDGET, STORE_ERRORS
from .calendarfeed import CalendarFeed
from .claims import Claim, build_documents, collapse, run_tokens, too_late
from .executor import Executor
from .files import FileCache
from .guard import GuardClient
from .handover import HISTORY_BATCH, Arrival, ForeignRuns, read_histories
from .identity import resolve_agent_id
from .journal import Journal
from .leases import LeaseKeeper, lease_name
from .logfiles import LogJanitor
from .manual import FORBID_SKIP, WaitingRuns
from .planitems import PlanQueue
from .pools import DEFAULT_POOL_WAIT, LocalPools, PoolError, PoolTimeout, Sizes
from .proctree import IS_POSIX
from .recovery import EarlierLife
from .run import RunContext
from .runwriter import RunWriter
from .scheduler import Fire, Scheduler, has_fire

log = logging.getLogger(__name__)
# reads of a run's secrets MongoDB may leave unanswered (a second apart) before the run fails
SECRET_READ_TRIES = 30

CLAIM_CHUNK = 250  # fires claimed per round trip; a burst starts running after the first chunk
PURGE_INTERVAL = 3600.0  # seconds between deletions of runs past their retention
STANDALONE_SILENT_AFTER = 60.0  # a standalone agent silent this long has its runs ended
FORBID_CHECK_SLACK = 5.0  # seconds beyond a session length that a new owner double-checks forbid
# seconds a stopping agent keeps trying to store final states (what is not stored then is
# in the run journal, and recorded by the agent's next start)
WRITER_STOP_BUDGET = 5.0
JOURNAL_TIDY_INTERVAL = 10.0  # seconds between looks for run journal segments to delete
LOST_SESSION = "its agent lost its ZooKeeper session before it was due"  # a claim made ahead


class Agent:
    """One agent process's engine. ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        agent_id: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        acfg = config.agent
        self.data_dir = Path(acfg.data_dir)
        self.agent_id = agent_id or resolve_agent_id(acfg.id, self.data_dir)
        self.group = acfg.group
        self.log_dir = Path(acfg.log_dir) if acfg.log_dir else self.data_dir / "logs"
        # calendars and its group's blackouts: read from MongoDB, kept on disk (calendars.py)
        self.calendars = CalendarFeed(
            store, self.group, self.data_dir / "calendars.json", acfg.poll_interval
        )
        self.scheduler = Scheduler(claim_ahead=acfg.claim_ahead, calendars=self.calendars)
        self.writer = RunWriter(store, owner=self.agent_id)
        # on POSIX the runs are started by a guard process that ends them if this agent dies
        # or freezes, and starts nothing under a fence that ran out (see guard.py)
        self.guard = (
            GuardClient(
                fence=self.fence, silent_after=self.silent_after, kill_grace=acfg.kill_grace
            )
            if IS_POSIX
            else None
        )
        # what the runs really did, on this disk: read by a restart after a crash (journal.py)
        self.journal = Journal(self.data_dir / "journal")
        if self.guard is not None:
            self.journal.on_segment = lambda path: self.guard.set_journal(str(path))
        self._journal_tidied = 0.0
        self.executor = Executor(
            agent_id=self.agent_id,
            journal=self.journal,
            log_dir=self.log_dir,
            writer=self.writer,
            max_parallel=acfg.max_parallel,
            kill_grace=acfg.kill_grace,
            on_finished=self._finished,
            begin=self._begin,
            guard=self.guard,
            files=FileCache(store, self.data_dir / "files"),
            work_dir=self.data_dir / "work",
            env_allow=acfg.env_allow,
            run_as=acfg.run_as,
            run_as_allowed=acfg.run_as_allowed,
            docker_host=acfg.docker_host,
        )
        # its Prometheus metrics (cloudtask/metrics), served on agent.metrics_port if set
        self.metrics = self.executor.metrics = AgentMetrics(self.agent_id, self.group)
        self.metrics.watch_agent(self.executor, lambda: len(self._specs), lambda: len(self.armed))
        self.leases = LeaseKeeper(
            store,
            kill=self.executor.kill,
            # a lease is held while its run is with the executor, or its final state unstored
            alive=lambda run_id: self.executor.is_active(run_id) or self.writer.keeps(run_id),
            fence_ok=self.may_claim,
            kill_grace=acfg.kill_grace,
            on_deadline=self.guard.set_deadline if self.guard is not None else None,
        )
        self.janitor = LogJanitor(self.log_dir, acfg.log_retention_days)
        self._specs: dict[str, tuple[int, TaskSpec]] = {}
        # mode-all tasks' (index, total) on this agent, as last assigned (any revision)
        self._shards: dict[str, tuple[int, int]] = {}
        # runs of our tasks that another agent started and may still be finishing (forbid
        # holds across agents; their retries are ours)
        self.foreign = ForeignRuns(
            store,
            self.agent_id,
            poll_interval=acfg.poll_interval,
            spec_of=self._spec,
            retry=self.scheduler.retry,
        )
        # manual runs, and claims the leader released: taken here when they are ours
        self.waiting = WaitingRuns(
            store,
            self.journal,
            self.writer,
            agent_id=self.agent_id,
            group=self.group,
            poll_interval=acfg.poll_interval,
            clock=self.clock,
            may_claim=self.may_claim,
            session=lambda: self.session,
            # (a paused task's released claims are not run: its manual runs are, from the store)
            known=lambda task_id: None if task_id in self._paused else self._specs.get(task_id),
            busy=self._busy,
            kill_task=self.executor.kill_task,
            late_verdict=self.scheduler.late_verdict,
            submit=self._submit,
            arm=self._arm_taken,
        )
        # concurrency pools: one agent alone keeps them here (a cluster agent in ZooKeeper)
        self.pools: Any = LocalPools(Sizes(self._pool_size))
        # plan items of our group, taken while there are free slots (planitems.py)
        self.items = PlanQueue(
            store,
            self.journal,
            self.writer,
            agent_id=self.agent_id,
            group=self.group,
            poll_interval=acfg.poll_interval,
            clock=self.clock,
            may_claim=self.may_claim,
            session=lambda: self.session,
            free_slots=self.executor.free_slots,
            submit=self._submit,
        )
        # an earlier life's leftovers, dealt with at the start (see recover)
        self.earlier = EarlierLife(
            store,
            self.journal,
            self.agent_id,
            kill_grace=acfg.kill_grace,
            docker_host=acfg.docker_host,
        )
        # claims won ahead of their due time, started then by the timer (armed.py); the
        # due-time checks and the loop's changes of the task set take turns (_start_lock)
        self.armed = Armed()
        self._start_lock = threading.RLock()
        self._deferred: list[Claim] = []  # due claims waiting for a look at the runs elsewhere
        self._pending: list[Claim] = []  # fires not claimed yet (MongoDB did not answer)
        self._in_doubt: list[Claim] = []  # claims written without an answer: ours if stored
        self._kill_in_doubt: dict[str, str] = {}  # run id -> why: killed if it landed
        self._claim_error = ""  # why the last claim failed (for the records of a backlog)
        self._done: list[tuple[str, int]] = []  # one-shot tasks that ran, to be marked done
        self._done_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.starter = StartTimer(self.armed, self.clock, self._start_due, self._stop)
        self._leaving_lock = threading.Lock()  # the leaving is announced once (see stop)
        self._left_announced = False
        self._last_sync: datetime | None = None
        self._bad_specs: dict[str, int] = {}
        self._paused: set[str] = set()  # known tasks that are paused (in _specs, unscheduled)
        # tasks new to this process, scheduled once their history is read: id -> changed at
        self._awaiting: dict[str, datetime | str | None] = {}
        self._recovered = False  # an earlier life's leftovers dealt with (see recover)
        self._purged_at = -PURGE_INTERVAL

    # --- task set ---------------------------------------------------------------------------

    def sync_tasks(self, now: datetime) -> None:
        """Bring the scheduler in line with the enabled tasks of this agent's group: read in
        pages, each call with its own deadline, and what a page brought is kept when a later
        one fails (the next sync reads only what is still missing)."""

        def each() -> Any:
            return pymongo.timeout(CALL_BUDGET)

        revisions = all_revisions(self.store, [self.group], each=each)
        wanted = {tid for tid, (_, done) in revisions.items() if not done}
        changed = sorted(t for t in wanted if self._known_revision(t) != revisions[t][0])
        for page in task_pages(self.store, changed, each=each):
            for doc in page:
                self._take(AssignedTask.from_task(doc), now)
        for tid in set(self._specs) - wanted:  # deleted, or a one-shot task that is done
            self._drop(tid, ("skipped", "the task was deleted before it was due"))
        self._last_sync = now

    def _sync_due(self, now: datetime, poll: timedelta) -> bool:
        return self._last_sync is None or now - self._last_sync >= poll

    def _known_revision(self, task_id: str) -> int | None:
        if task_id in self._specs:
            return self._specs[task_id][0]
        return self._bad_specs.get(task_id)

    def _spec(self, task_id: str) -> TaskSpec | None:
        known = self._specs.get(task_id)
        return known[1] if known is not None else None

    def _slot(self, spec: TaskSpec) -> str:
        return self.agent_id if spec.mode == "all" else "one"

    def _take(self, task: AssignedTask, now: datetime) -> None:
        task_id, revision = task.task_id, task.revision
        if task.shard is not None:  # rewritten when the task's agents change, not its revision
            self._shards[task_id] = task.shard
        else:
            self._shards.pop(task_id, None)
        if self._known_revision(task_id) == revision:
            return  # nothing changed
        try:
            spec = parse_task(task.spec)
        except ValidationError as e:
            if self._bad_specs.get(task_id) != revision:
                log.error(
                    "task %s revision %s is not valid, not scheduled: %s", task_id, revision, e
                )
            self._bad_specs[task_id] = revision
            self._drop(task_id, ("skipped", f"revision {revision} of the task is not valid"))
            return
        self._bad_specs.pop(task_id, None)
        # (a standalone agent reads every task of its group: one whose requires its labels do
        # not meet is not its to run; in a cluster the leader assigns only matching agents)
        unmatched = not all(self.config.agent.labels.get(k) == v for k, v in spec.requires.items())
        if not task.enabled or unmatched:
            why = "the task was paused" if task.enabled is False else "its agent lacks the labels"
            self._drop(task_id, ("skipped", f"{why} before it was due"))
            self._specs[task_id] = (revision, spec)
            self._paused.add(task_id)  # known, so it is not re-read every sync
            if unmatched and task.enabled:
                log.info(
                    "task %s (%s) requires labels this agent lacks: not run here",
                    spec.name,
                    task_id,
                )
            return
        previous = self._specs.get(task_id)
        self._paused.discard(task_id)
        self._specs[task_id] = (revision, spec)
        if previous is None:
            # a run may already wait for this task (a manual run signalled before the task
            # reached this agent): look at the next step, not at the next poll
            self.waiting.signal()
        if task_id in self._awaiting or (previous is None and not spec.schedule.keepalive):
            # new to this process: scheduled once its history is read (see _read_histories)
            self._awaiting[task_id] = task.changed_at
            log.info("task %s (%s) revision %s taken", spec.name, task_id, revision)
            return
        # (claims made ahead under the previous revision start if its schedule still has them,
        # see _start_armed; given again by the new one, they are found claimed already)
        self.scheduler.upsert(task_id, spec, revision, now)
        log.info("task %s (%s) revision %s scheduled", spec.name, task_id, revision)
        if previous is not None and previous[1].schedule.keepalive:
            # the running instance makes way for the new definition; its exit starts the next
            self.executor.kill_task(task_id, f"restarted for revision {revision}")

    def _read_histories(self, now: datetime) -> None:
        """Schedule the tasks new to this process from their history (handover.py): fires
        since their last recorded one are caught up or recorded missed, retries still owed are
        made, and runs another agent is finishing are watched. A task whose history cannot be
        read now (MongoDB unreachable) waits unscheduled, rather than lose its record of what
        was missed: the fires could not be claimed meanwhile anyway. Histories are read
        ``HISTORY_BATCH`` tasks at a time; the first failure ends the pass."""
        for task_id in [t for t in self._awaiting if t not in self._specs]:
            del self._awaiting[task_id]
        waiting = list(self._awaiting.items())
        for i in range(0, len(waiting), HISTORY_BATCH):
            arrivals = []
            for task_id, changed_at in waiting[i : i + HISTORY_BATCH]:
                spec = self._specs[task_id][1]
                arrivals.append(Arrival(task_id, spec, self._slot(spec), changed_at))
            try:
                histories = read_histories(self.store, arrivals, now)
                self.foreign.note([a.task_id for a in arrivals if a.spec.mode == "one"])
            except STORE_ERRORS as e:
                log.warning(
                    "cannot read the run histories of %d tasks yet: %s", len(self._awaiting), e
                )
                return
            for arrival in arrivals:
                task_id, spec = arrival.task_id, arrival.spec
                since, retries = histories[task_id]
                revision = self._specs[task_id][0]
                del self._awaiting[task_id]
                self.foreign.came(task_id)
                self.scheduler.upsert(task_id, spec, revision, now, since=since)
                for retry in retries:
                    self.scheduler.retry(task_id, *retry)
                log.info("task %s (%s) revision %s scheduled", spec.name, task_id, revision)

    def _drop(self, task_id: str, unstarted: tuple[str, str] | None = None) -> None:
        """Forget a task. Its claims made ahead of their due time are ``unstarted``: ``(status,
        why)``, by default released for the task's next owner (it moved)."""
        with self._start_lock:  # no claim of it starts from here on (see _start_due)
            self.foreign.forget(task_id)
            self._awaiting.pop(task_id, None)
            self._paused.discard(task_id)
            self._shards.pop(task_id, None)
            known = self._specs.pop(task_id, None)
            armed = self.armed.of_task(task_id)
        status, why = unstarted or ("released", "the task left this agent before it was due")
        for claim in armed:
            self._not_armed(claim, status, why)
        if self.scheduler.remove(task_id):
            log.info("task %s unscheduled", task_id)
        if known is not None and known[1].schedule.keepalive:
            # a service stops with its task; a scheduled run in flight finishes. While the
            # agent stops, the leader moves its tasks away: that is the agent stopping too
            why = (
                "the agent is stopping"
                if self._stop.is_set()
                else "the task was paused, deleted or moved"
            )
            self.executor.kill_task(task_id, why)

    # --- firing -----------------------------------------------------------------------------

    def step(self, now: datetime) -> float:
        """One pass: claim and start what is due at ``now``. Returns seconds until the next fire."""
        self._look_calendars(now)
        if self._awaiting:
            self._read_histories(now)
        if not self._recovered:
            self._recover_quietly(now)
        if self.earlier.watching:
            self.earlier.release_late_claims()
        fires, delay = self.scheduler.tick(now)
        self.dispatch(fires, now)
        self._start_due(now)  # claims that fell due while written (the timer starts them too)
        if self._deferred:
            self._start_deferred(now)
        for then in (self.waiting.look, self.items.look, self.foreign.check, self._mark_done):
            if self._stop.is_set():
                return 0.0  # stopping: no further call may hold the stop up
            then(now)
        self._tidy_journal()
        return delay

    def _look_calendars(self, now: datetime) -> None:
        """Read the calendars and blackouts when they changed; the tasks naming a calendar
        plan their next fire again. A failed read keeps what is known (and on disk)."""
        try:
            with pymongo.timeout(CALL_BUDGET):
                changed = self.calendars.look()
        except STORE_ERRORS as e:
            log.warning("cannot read the calendars now (the known ones hold): %s", e)
            return
        if changed:
            self.scheduler.refresh(now)

    def _tidy_journal(self) -> None:
        if time.monotonic() - self._journal_tidied < JOURNAL_TIDY_INTERVAL:
            return
        self._journal_tidied = time.monotonic()
        doubt = {c.doc["_id"] for c in self._in_doubt}
        self.journal.tidy(
            lambda run_id: (
                run_id in doubt or self.writer.keeps(run_id) or self.executor.is_active(run_id)
            )
        )

    def dispatch(self, fires: list[Fire], now: datetime) -> None:
        """Claim these fires (and the backlog) and start the ones won."""
        tokens = run_tokens(len(fires))
        claims = self._pending
        self._pending = []
        for fire, token in zip(fires, tokens):
            known = self._specs.get(fire.task_id)
            if known is not None:
                claims.append(Claim(fire, known[1], known[0], token, reason=fire.note))
        if self._in_doubt and not self._settle_in_doubt(claims, now):
            self._keep_pending(claims, now)
            return
        if not claims:
            return
        if not self.may_claim():
            # fenced: claim nothing; the fires wait (collapsed) for the fence to return
            self._claim_error = "its agent was not in contact with ZooKeeper"
            self._keep_pending(claims, now)
            return
        claims = self._collapse(claims, now)
        claims = [c for c in claims if self._ready(c, now)]
        self._build_documents(claims, now)
        for i in range(0, len(claims), CLAIM_CHUNK):  # the first runs start after one chunk
            chunk = claims[i : i + CLAIM_CHUNK]
            if not self._claim_chunk(chunk, now):
                self._keep_pending(claims[i + CLAIM_CHUNK :], now)
                return

    def _keep_pending(self, claims: list[Claim], now: datetime) -> None:
        """Fires that could not be claimed wait for the next step, collapsed per task (their
        documents are built again then). Fires of tasks no longer ours are forgotten: claims
        are written in each task's time order (claims.collapse), so none of this agent's
        stored fires of the task is later than them, and the task's next owner finds them
        due after its latest recorded fire (handover.py)."""
        keep = []
        for c in claims:
            if c.spec.schedule.keepalive and c.doc is not None:
                # its start is planned again, lease and all
                self._keepalive_not_started(c.doc["_id"], c.fire.task_id, now)
            elif c.fire.task_id in self._specs:
                c.doc = None
                keep.append(c)
        self._pending = self._collapse(keep, now) if keep else []
        if self._pending:
            log.warning(
                "cannot claim %d fires yet (%s); they wait", len(self._pending), self._claim_error
            )

    def _collapse(self, claims: list[Claim], now: datetime) -> list[Claim]:
        """Fires waiting to be claimed, per task, by the rule of a late tick (claims.py)."""
        return collapse(claims, now, self.scheduler.late_verdict, self._late_reason())

    def _late_reason(self) -> str:
        why = self._claim_error or "the agent was busy or paused"
        return f"not claimed in time: {why}"

    def _ready(self, claim: Claim, now: datetime) -> bool:
        """A keepalive start needs its lease first (one instance in the whole cluster): a lease
        held elsewhere is tried again a little later, without counting a restart."""
        if not claim.spec.schedule.keepalive or claim.fire.status is not None:
            return True
        if claim.doc is not None:
            return True  # written before: its lease was taken then
        run_id = new_id()
        if not self.leases.acquire(lease_name(claim.fire.task_id, self._slot(claim.spec)), run_id):
            self.scheduler.keepalive_retry_at(
                claim.fire.task_id, now + timedelta(seconds=self.leases.retry_delay)
            )
            return False
        claim.doc = {"_id": run_id}  # the document is built around this id
        return True

    def _keepalive_not_started(self, run_id: str, task_id: str, now: datetime) -> None:
        """A keepalive start that did not happen: its lease is given back, and the start is
        planned again after a backoff."""
        self.leases.release(run_id)
        self.scheduler.keepalive_not_started(task_id, now)

    def _build_documents(self, claims: list[Claim], now: datetime) -> None:
        """The run documents that claim these fires (claims.py): recorded ones (missed,
        skipped: forbid checked now) are final at once; of the ones to run, as many as there
        are free slots are claimed ``running``, the rest ``queued``."""
        build_documents(
            claims,
            now,
            free=self.executor.free_slots(),
            busy=self._busy,
            slot_of=self._slot,
            agent_id=self.agent_id,
            session=lambda: self.session,
        )

    def _busy(self, task_id: str) -> bool:
        """Whether a run of this task is going, here or on its former owner."""
        return self.executor.has_active(task_id) or self.foreign.running(task_id)

    def _claim_chunk(self, chunk: list[Claim], now: datetime) -> bool:
        """Write one chunk of claims; start the ones won. False if MongoDB did not answer:
        the chunk is then in doubt (settled first at the next step)."""
        self.journal.claimed([c.doc["_id"] for c in chunk if c.doc["status"] in RUNNING_STATUSES])
        try:
            with pymongo.timeout(CALL_BUDGET * 2):
                won = self.store.claim_runs([c.doc for c in chunk])
        except STORE_ERRORS as e:
            self._claim_error = f"MongoDB did not answer ({type(e).__name__})"
            log.warning("claiming %d fires failed; settled at the next step: %s", len(chunk), e)
            self._in_doubt = chunk
            return False
        self._claim_error = ""
        self._after_claim(chunk, won, now)
        return True

    def _settle_in_doubt(self, claims: list[Claim], now: datetime) -> bool:
        """Claims written without an answer are written again, as they were: each is then
        stored under its own id (it had landed, or lands now) and ours, or the fire is another
        agent's. Reading whether they landed would not settle them: a write held in the
        network can land after the read said it had not, leaving a claim nobody starts or
        ends; written again, a late copy finds its id taken. A landed fire is recorded
        ``missed`` when a newer fire of its task waits too, or when it is now too late, by the
        rule of a late tick (claims.py). False if MongoDB cannot say."""
        docs = [c.doc for c in self._in_doubt]
        try:
            with pymongo.timeout(CALL_BUDGET * 2):
                won = self.store.claim_runs(docs)
        except STORE_ERRORS as e:
            self._claim_error = f"MongoDB did not answer ({type(e).__name__})"
            log.debug("claims still in doubt: %s", e)
            return False
        doubt, self._in_doubt = self._in_doubt, []
        kills, self._kill_in_doubt = self._kill_in_doubt, {}
        landed = [c for c, ok in zip(doubt, won, strict=True) if ok]
        others = [c for c, ok in zip(doubt, won, strict=True) if not ok]
        self._after_claim(others, [False] * len(others), now)
        for c in [c for c in landed if c.doc["_id"] in kills]:  # a kill came meanwhile
            landed.remove(c)
            self._finish_unstarted(c.doc, "killed", f"{kills[c.doc['_id']]} before it started")
            if c.spec.schedule.keepalive:  # its lease back, the service started again later
                self._keepalive_not_started(c.doc["_id"], c.fire.task_id, now)
        if landed:
            log.info("%d claims written while MongoDB did not answer are settled", len(landed))
            late, start = too_late(landed, claims, now, self.scheduler.late_verdict)
            for c in late:
                self._finish_unstarted(c.doc, "missed", self._late_reason())
            self._after_claim(start, [True] * len(start), now)
        return True

    def _after_claim(self, claims: list[Claim], won: list[bool], now: datetime) -> None:
        """Start the claims won, if the fence still holds now that they are written (an agent
        frozen while its claim was in flight must not start it when it wakes up), and if no
        other agent runs the task meanwhile (``forbid``, see :meth:`ForeignRuns.busy`)."""
        fenced = not self.may_claim()
        # (a claim made ahead is checked at its due time)
        now_won = [ok and c.doc["status"] != "claimed" for c, ok in zip(claims, won, strict=True)]
        busy = {} if fenced else self._busy_elsewhere(claims, now_won)
        for claim, ok in zip(claims, won, strict=True):
            fire, spec, doc = claim.fire, claim.spec, claim.doc
            if not ok:
                self.metrics.claim_lost()
                log.debug("fire %s of %s claimed elsewhere", doc["scheduled_for"], spec.name)
                if spec.schedule.keepalive:
                    self._keepalive_not_started(doc["_id"], fire.task_id, now)
                continue
            if doc["status"] not in RUNNING_STATUSES:
                log.info(
                    "task %s fire %s recorded %s", spec.name, doc["scheduled_for"], doc["status"]
                )
                continue
            if fenced or fire.task_id not in self._specs:
                why = (
                    "its agent lost its ZooKeeper session while claiming it"
                    if fenced
                    else "the task left this agent while it was claimed"
                )
                self.writer.track(doc)
                self.writer.release(doc["_id"], why)
                if spec.schedule.keepalive:
                    self._keepalive_not_started(doc["_id"], fire.task_id, now)
                continue
            if doc["_id"] in busy:
                self._finish_unstarted(doc, "skipped", busy[doc["_id"]])
                continue
            if doc["status"] == "claimed":
                self.writer.track(doc)
                self.armed.add([claim])  # started at its due time (_start_due)
                continue
            if spec.concurrency == "replace" and fire.trigger != "retry":
                self.executor.kill_task(fire.task_id, f"replaced by run {doc['_id']}")
            self._submit(doc, spec, claim.revision, claim.token, fire.trigger, fire.attempt)

    def _busy_elsewhere(self, claims: list[Claim], won: list[bool]) -> dict[str, str]:
        """``forbid`` across agents while two may both think a task is theirs: for a session
        length after a task came here, and while this agent may have missed a change of its
        assignments (handover.py). Returns run id -> why it does not start."""
        window = self.silent_after() + FORBID_CHECK_SLACK
        return self.foreign.busy(claims, won, window, self.view_may_be_stale())

    # --- claims made ahead of their due time (armed.py) --------------------------------------

    def _start_due(self, now: datetime) -> None:
        """Start the claims made ahead that are due at ``now`` (called by the start timer and
        by each step: whichever comes first takes a claim out, once)."""
        with self._start_lock:
            for claim in self.armed.due(now):
                try:
                    self._start_armed(claim, now)
                except Exception:  # a bug must not leave a claim nobody starts or records
                    log.exception("starting run %s failed", claim.doc["_id"])
                    self._give_back(claim)

    def _give_back(self, claim: Claim) -> None:
        """Release a claim after an unexpected error (its fate must not be lost with it)."""
        try:
            self._not_armed(claim, "released", "its agent could not start it")
        except Exception:
            log.exception("releasing run %s failed (its journal tells a restart)", claim.doc["_id"])

    def _start_armed(self, claim: Claim, now: datetime, checked: bool = False) -> None:
        """The due-time checks of a claim made ahead, all local, then its start; or why it
        does not start: released for the task's owner when this agent cannot start it (it
        stops, lost its fence, the task left), recorded when the fire is not to run (the task
        changed and its new schedule has no fire then, too late, ``forbid``). ``checked``: the
        runs of other agents were looked at (see :meth:`_start_deferred`)."""
        fire, doc = claim.fire, claim.doc
        if self._stop.is_set():
            return self._not_armed(claim, "released", "its agent stopped before it was due")
        if doc.get("session") != self.session or not self.may_claim():
            return self._not_armed(claim, "released", LOST_SESSION)
        known = self._specs.get(fire.task_id)
        if known is None:
            why = "the task left this agent before it was due"
            return self._not_armed(claim, "released", why)
        if fire.task_id in self._paused:
            return self._not_armed(claim, "skipped", "the task was paused before it was due")
        revision, spec = known
        if revision != claim.revision:
            if not has_fire(spec, fire.scheduled_for, self.calendars.book):
                why = f"the task changed before it was due: revision {revision} has no fire then"
                return self._not_armed(claim, "skipped", why)
            claim.spec, claim.revision = spec, revision
            doc.update(revision=revision, task_name=spec.name)
        verdict = self.scheduler.late_verdict(spec, fire.scheduled_for, now)
        if verdict == "missed":
            why = "not started in time: its agent was busy or paused"
            return self._not_armed(claim, "missed", why)
        if verdict == "catch-up":
            claim.fire = fire = replace(fire, trigger="catch-up")
            doc["trigger"] = "catch-up"
        if spec.concurrency == "forbid":
            if self._busy(fire.task_id):
                return self._not_armed(claim, "skipped", FORBID_SKIP)
            window = self.silent_after() + FORBID_CHECK_SLACK
            stale = self.view_may_be_stale()
            if not checked and self.foreign.checks(spec, fire.task_id, window, stale):
                self._deferred.append(claim)  # the loop reads the other agents' runs
                self._wake.set()
                return None
        if spec.concurrency == "replace":
            self.executor.kill_task(fire.task_id, f"replaced by run {doc['_id']}")
        self._submit(doc, spec, claim.revision, claim.token, fire.trigger, fire.attempt)
        return None

    def _start_deferred(self, now: datetime) -> None:
        """Due claims of ``forbid`` tasks that may also be running on their former owner: its
        runs are read (on the loop: a MongoDB call, which must not hold up the timer's other
        starts), then the claims start or are skipped."""
        with self._start_lock:
            claims, self._deferred = self._deferred, []
        try:
            busy = {} if self._stop.is_set() else self._busy_elsewhere(claims, [True] * len(claims))
        except Exception:
            log.exception("checking %d runs against other agents failed", len(claims))
            busy = None
        with self._start_lock:
            for claim in claims:
                try:
                    if busy is None:
                        self._give_back(claim)
                    elif claim.doc["_id"] in busy:
                        self._not_armed(claim, "skipped", busy[claim.doc["_id"]])
                    else:
                        self._start_armed(claim, now, checked=True)  # (stopping: released)
                except Exception:
                    log.exception("starting run %s failed", claim.doc["_id"])
                    self._give_back(claim)

    def _arm_taken(self, doc: dict, spec: TaskSpec, revision: int, token: str) -> None:
        """A released claim not due yet, taken here as ``claimed`` (manual.py): started at its
        time like a claim made here (the revision it was claimed at is checked then)."""
        claimed_at = doc.get("revision", revision)
        fire = Fire(doc["task_id"], doc["scheduled_for"], "schedule", claimed_at, doc["attempt"])
        self.foreign.forget_run(doc["task_id"], doc["_id"])  # ours now: it holds nothing up
        self.writer.track(doc)
        self.armed.add([Claim(fire, spec, claimed_at, token, doc=doc)])

    def _not_armed(self, claim: Claim, status: str, why: str) -> None:
        """A claim made ahead that does not start: ``released`` (the task's owner takes it over
        as a claim that never started) or finished with ``status`` (skipped, missed, killed)."""
        doc = claim.doc
        log.info("run %s of %s not started: %s", doc["_id"], claim.spec.name, why)
        if status == "released":
            self.writer.track(doc)
            self.writer.release(doc["_id"], why)
        else:
            self._finish_unstarted(doc, status, why)

    def kill_armed(self, run_id: str, reason: str) -> bool:
        """A kill request for a claim made ahead that has not started: recorded ``killed``.
        False if no such claim waits here."""
        with self._start_lock:
            claim = self.armed.take(run_id)
            if claim is None:  # a due claim waiting for the loop's check
                found = [c for c in self._deferred if c.doc["_id"] == run_id]
                self._deferred = [c for c in self._deferred if c.doc["_id"] != run_id]
                claim = found[0] if found else None
        if claim is None:
            # the timer may have started it meanwhile (under the lock taken above)
            return self.executor.kill(run_id, reason)
        self._not_armed(claim, "killed", f"{reason} before it started")
        return True

    def kill_in_doubt(self, run_id: str, reason: str) -> bool:
        """A kill request for a claim written without an answer (the loop's thread): recorded
        ``killed`` if it landed, once that is known (see :meth:`_settle_in_doubt`). False if
        no such claim is in doubt here, or if it is one that never starts (a fire recorded
        ``missed`` or ``skipped`` in the same batch is final as written)."""
        if not any(
            c.doc["_id"] == run_id and c.doc["status"] in RUNNING_STATUSES for c in self._in_doubt
        ):
            return False
        self._kill_in_doubt[run_id] = reason
        return True

    def is_in_doubt(self, run_id: str) -> bool:
        """Whether the claim of this run was written without an answer (the loop's thread)."""
        return any(c.doc["_id"] == run_id for c in self._in_doubt)

    def _release_armed(self, why: str) -> list[str]:
        """Every claim made ahead is released (the agent stops or lost its session). Returns
        their run ids."""
        with self._start_lock:
            claims = self.armed.take_all() + self._deferred
            self._deferred = []
        for claim in claims:
            self._not_armed(claim, "released", why)
        return [c.doc["_id"] for c in claims]

    def _tell_released(self, run_ids: list[str]) -> None:
        """Once the writer has stored these releases (it is woken for them), signal them; a
        few seconds at most (MongoDB may not answer: the owners look every poll anyway)."""
        deadline = time.monotonic() + CALL_BUDGET
        while any(self.writer.keeps(r) for r in run_ids):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        self._signal_released()

    def _signal_released(self) -> None:
        """Claims were released: tell the agents to look for them (in a cluster)."""

    def _finish_unstarted(self, doc: dict, status: str, reason: str) -> None:
        """A claim won that does not start: finished at once, ``status`` with ``reason``."""
        self.writer.finish_unstarted(doc, status, reason, to_bson_time(self.clock()))

    def _submit(
        self, doc: dict, spec: TaskSpec, revision: int, token: str, trigger: str, attempt: int
    ) -> None:
        """Hand a claimed run to the executor. Every start goes through here, from the loop
        and from the start timer: under the lock they share, ``forbid`` is looked at once more
        just before, so two paths cannot both find the task idle and both start it."""
        with self._start_lock:
            self.foreign.forget_run(doc["task_id"], doc["_id"])  # (a released claim taken here)
            if (
                spec.concurrency == "forbid"
                and trigger != "retry"
                and not spec.schedule.keepalive
                and self._busy(doc["task_id"])
            ):
                self._finish_unstarted(doc, "skipped", FORBID_SKIP)
                return
            self._hand_over(doc, spec, revision, token, trigger, attempt)

    def _hand_over(
        self, doc: dict, spec: TaskSpec, revision: int, token: str, trigger: str, attempt: int
    ) -> None:
        self.executor.submit(
            RunContext(
                run_id=doc["_id"],
                task_id=doc["task_id"],
                revision=revision,
                spec=spec,
                scheduled_for=doc["scheduled_for"],
                attempt=attempt,
                trigger=trigger,
                token=token,
                agent=self.agent_id,
                session=doc.get("session"),
                claimed_status=doc["status"],
                plan_id=doc.get("plan_id"),
                params=doc.get("env") if trigger == "manual" else None,
                shard=self._shards.get(doc["task_id"]) if spec.mode == "all" else None,
            ),
            doc,
        )
        self.leases.submitted(doc["_id"])

    def _begin(self, ctx: RunContext) -> tuple[str, str]:
        """Called by the executor just before a run's process starts (on its thread):
        ``("start", "")``, or ``("release", why)`` when the fence that covered its claim is
        gone, ``("drop", why)`` when another agent took it over, ``("later", why)`` when
        MongoDB cannot confirm the start of a claim that waited for its slot."""
        if ctx.session != self.session or not self.may_claim():
            return "release", "its agent lost its ZooKeeper session before starting it"
        if ctx.claimed_status == "queued":
            # one token per run, kept when the start is tried again after a lost answer
            ctx.start_token = ctx.start_token or new_id()
            try:
                with pymongo.timeout(CALL_BUDGET):
                    started = self.store.start_queued_run(
                        ctx.run_id, self.agent_id, ctx.start_token
                    )
            except STORE_ERRORS as e:
                return "later", f"MongoDB did not confirm the start ({type(e).__name__})"
            if not started:
                self.metrics.start_lost()
                return "drop", "it was taken over by another agent"
            ctx.claimed_status = "running"
            if ctx.session != self.session or not self.may_claim():
                return "release", "its agent lost its ZooKeeper session before starting it"
        if ctx.trigger != "manual" and ctx.plan_id is None:  # an operator's run is not held
            blackout = self.calendars.book.blackout_at(ctx.spec.group, self.clock())
            if blackout is not None:
                return "skip", f"blackout {blackout.name}"
        if ctx.secrets is None and ctx.spec.secrets_used():
            action, why = self._open_secrets(ctx)
            if action != "start":
                return action, why
        if ctx.spec.pool and ctx.pool_token is None:
            return self._enter_pool(ctx)
        return "start", ""

    def _enter_pool(self, ctx: RunContext) -> tuple[str, str]:
        """A place in the run's concurrency pool, waited for in order (pools.py): the run is
        ``skipped`` when it waits longer than its task's ``pool_wait``, fails when the pool
        does not exist, and is handed back when its agent stops or loses its fence meanwhile.
        The place is given back when the run ends (:meth:`_finished`)."""
        pool = ctx.spec.pool
        assert pool is not None
        wait = ctx.spec.pool_wait if ctx.spec.pool_wait is not None else DEFAULT_POOL_WAIT
        try:
            ctx.pool_token = self.pools.acquire(
                pool,
                ctx.run_id,
                wait,
                cancelled=lambda: ctx.kill_requested.is_set() or self._stop.is_set(),
            )
        except PoolTimeout as e:
            if self._stop.is_set():
                return "release", f"its agent stopped while it waited for pool {pool!r}"
            return "skip", f"{e}: not run (pool_wait)"
        except PoolError as e:
            return "fail", str(e)
        if ctx.session != self.session or not self.may_claim():
            return "release", "its agent lost its ZooKeeper session while it waited for its pool"
        return "start", ""

    def _pool_size(self, name: str) -> int | None:
        try:
            with pymongo.timeout(CALL_BUDGET):
                return self.store.pool_size(name)
        except STORE_ERRORS as e:
            raise PoolError(f"cannot read the size of pool {name!r}: {e}") from e

    def _open_secrets(self, ctx: RunContext) -> tuple[str, str]:
        """The values of the secrets the run's task uses, read and opened just before it
        starts (never kept between runs: a value replaced is used by the next run). A secret
        that is gone or cannot be opened fails the run, saying which; it never starts without
        them. While MongoDB does not answer, the start waits (SECRET_READ_TRIES seconds)."""
        names = ctx.spec.secrets_used()
        try:
            box = self._secret_box()
            with pymongo.timeout(CALL_BUDGET):
                values = self.store.secret_values(box, names)
        except SecretError as e:
            return "fail", f"cannot open the task's secrets: {e}"
        except STORE_ERRORS as e:
            ctx.secret_tries += 1
            if ctx.secret_tries >= SECRET_READ_TRIES:
                return "fail", (
                    f"MongoDB did not give the task's secrets in {ctx.secret_tries} tries "
                    f"({type(e).__name__})"
                )
            return "later", f"MongoDB did not give the task's secrets ({type(e).__name__})"
        ctx.open_secrets(values)
        return "start", ""

    def _secret_box(self) -> SecretBox | None:
        """The key ring of this agent's ``secrets.keys`` (None: none given); read again
        for every run that needs it, so a ring rotated on disk is used at once."""
        try:
            return load_box(self.config.secrets.keys)
        except ConfigError as e:
            raise SecretError(f"this agent's key ring (secrets.keys) cannot be read: {e}") from e

    # --- what the cluster agent changes -----------------------------------------------------

    def may_claim(self) -> bool:
        """Whether this agent may claim and start fires now (the cluster agent's fence)."""
        return True

    def fence(self) -> tuple[str | None, float]:
        """``(session, until)``: claims of ``session`` may start until the monotonic ``until``
        (for the guard). A standalone agent has no session and no fence."""
        return None, 0.0

    def silent_after(self) -> float:
        """Seconds without a pulse from this agent before its guard ends its runs."""
        return STANDALONE_SILENT_AFTER

    def view_may_be_stale(self) -> bool:
        """Whether this agent may have missed a change of its assignments (a cluster agent
        that has not heard from ZooKeeper for a while)."""
        return False

    @property
    def session(self) -> str | None:
        """The ZooKeeper session claims are made under (None in standalone mode)."""
        return None

    # --- after a run --------------------------------------------------------------------------

    def _finished(self, ctx: RunContext) -> None:
        """After a run: its pool place given back; retries, keepalive restarts, one-shot tasks
        marked done."""
        self.metrics.run_ended(ctx.status)
        if ctx.pool_token is not None:
            token, ctx.pool_token = ctx.pool_token, None
            self.pools.release(token)
        spec = ctx.spec
        finished = ctx.finished_at or self.clock()
        if spec.schedule.keepalive:
            # given back once the final state is stored: history never shows two instances
            self.writer.when_written(ctx.run_id, lambda: self.leases.release(ctx.run_id))
        if ctx.status in ("released", "dropped"):
            if spec.schedule.keepalive and not self._stop.is_set():
                self.scheduler.keepalive_not_started(ctx.task_id, finished)
        elif ctx.trigger == "manual":
            pass  # a manual run is one run: no retry, no restart, a one-shot task stays due
        elif ctx.trigger == "plan":
            pass  # its next attempt (if any) is queued for any agent: below
        elif spec.schedule.keepalive:
            if not self._stop.is_set():  # restarted unless the task was dropped meanwhile
                self.scheduler.keepalive_exited(ctx.task_id, ctx.started_at or finished, finished)
        elif ctx.status in RETRY_STATUSES and ctx.attempt < spec.retries:
            # if the task left this agent meanwhile, its new owner retries (see handover.py)
            due = finished + timedelta(seconds=spec.retry_delay)
            self.scheduler.retry(ctx.task_id, ctx.scheduled_for, ctx.attempt + 1, due)
        elif spec.schedule.is_once:
            with self._done_lock:  # marked by the loop, in batches, off the run threads
                self._done.append((ctx.task_id, ctx.revision))
        if ctx.trigger == "plan":
            self.items.ended(ctx.run_id, ctx.status)
        else:
            self.items.slot_freed()
        self._wake.set()

    def _mark_done(self, now: datetime) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        if not done:
            return
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.mark_tasks_done(done, now)
        except STORE_ERRORS as e:
            log.warning("cannot mark %d one-shot tasks done yet: %s", len(done), e)
            with self._done_lock:
                self._done = done + self._done

    # --- lifecycle --------------------------------------------------------------------------

    def recover(self, now: datetime) -> None:
        """Clean up after an earlier life of this agent that did not stop cleanly: its
        processes are ended and its runs settled by what the run journal knows (recovery.py).
        Raises StoreError or PyMongoError when MongoDB does not answer."""
        self.earlier.recover(now)

    def _close_data_dir(self) -> None:
        """The agent's folders are its own (POSIX): a task run as another user (run_as) may
        pass through the data folder to its run's folder under ``work`` (which it owns),
        and cannot list it, nor read the run journal, the task-file cache or the logs."""
        if not IS_POSIX:
            return
        modes = {
            self.data_dir: 0o711,
            self.data_dir / "work": 0o711,
            self.data_dir / "journal": 0o700,
            self.data_dir / "files": 0o700,
            self.log_dir: 0o750,  # (a group of operators may read them)
        }
        for folder, mode in modes.items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if folder.stat().st_uid == os.geteuid():
                    folder.chmod(mode)
            except OSError as e:
                log.warning("cannot close %s to other users: %s", folder, e)

    def _recover_quietly(self, now: datetime) -> None:
        """:meth:`recover`, tried again on later steps while MongoDB does not answer."""
        try:
            self.recover(now)
            self._recovered = True
        except STORE_ERRORS as e:
            log.warning("cannot check for runs left by an earlier start yet: %s", e)

    def run(self) -> None:
        """Schedule until :meth:`stop`; then stop runs gracefully and flush every write."""
        self._close_data_dir()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.journal.open()
        self._recover_quietly(self.clock())
        self.writer.start()
        if self.guard is not None:
            self.guard.start()
        self.starter.start()
        self.janitor.start()
        self.leases.start()
        acfg = self.config.agent
        metrics = serve(self.metrics.registry, acfg.metrics_host, acfg.metrics_port, "agent")
        log.info("agent %s (group %s) started; logs in %s", self.agent_id, self.group, self.log_dir)
        poll = timedelta(seconds=self.config.agent.poll_interval)
        try:
            while not self._stop.is_set():
                now = self.clock()
                if self._sync_due(now, poll):
                    try:
                        self.sync_tasks(now)
                    except STORE_ERRORS as e:
                        log.warning("cannot read tasks (keeping the ones I have): %s", e)
                        self._last_sync = now
                    except Exception:  # a bug in one task's handling must not stop the agent
                        log.exception("syncing tasks failed")
                        self._last_sync = now
                self._purge_runs()
                try:
                    delay = self.step(self.clock())
                except Exception:
                    log.exception("a scheduling step failed; going on")
                    delay = 1.0
                if self._pending or self._in_doubt:
                    delay = min(delay, 1.0)  # a backlog is tried again within a second
                if self._last_sync is not None:
                    until_sync = (self._last_sync + poll - self.clock()).total_seconds()
                    delay = min(delay, max(until_sync, 0.0))
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            self.starter.join(timeout=5)
            released = self._release_armed("its agent stopped before it was due")
            if released:
                # the tasks' new owners take them at once, not at their next look (not waited
                # for: the stop is bounded, and MongoDB may not answer)
                threading.Thread(
                    target=self._tell_released, args=(released,), name="released", daemon=True
                ).start()
            self._announce_leaving()
            self.executor.shutdown(grace=self.config.agent.kill_grace)
            if self.guard is not None:
                self.guard.stop()
            self._mark_done(self.clock())
            self.leases.stop()
            self.janitor.stop()
            self.writer.stop(timeout=WRITER_STOP_BUDGET)
            self.journal.close()
            self._left()
            if metrics is not None:
                metrics.close()
            log.info("agent %s stopped", self.agent_id)

    def _purge_runs(self) -> None:
        """A standalone agent deletes runs past their retention, hourly (in a cluster the
        leading center does it)."""
        if time.monotonic() - self._purged_at < PURGE_INTERVAL:
            return
        self._purged_at = time.monotonic()
        try:
            with pymongo.timeout(60):
                self.store.purge_runs()
        except STORE_ERRORS as e:
            log.warning("cannot delete old runs: %s", e)

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler). The leaving is announced at once,
        from a thread of its own, so the tasks move within a second even while the loop still
        waits for a call to a dead server to time out."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        threading.Thread(target=self._announce_leaving, name="leaving", daemon=True).start()

    def _announce_leaving(self) -> None:
        with self._leaving_lock:
            if self._left_announced:
                return
            self._left_announced = True
        try:
            self._leaving()
        except Exception:
            log.exception("announcing the stop failed (the loop's end tries again)")
            with self._leaving_lock:
                self._left_announced = False

    def _leaving(self) -> None:
        """Called first when the loop ends, before runs are given their grace."""

    def _left(self) -> None:
        """Called last, when every run has ended and every write is done."""

    def drop_all(self) -> None:
        """Forget every task (a lost session: the leader gives them to others). Claims not
        written yet are forgotten; claims in doubt are still settled (and released)."""
        for task_id in list(self._specs):
            self._drop(task_id, ("released", LOST_SESSION))
        self._release_armed(LOST_SESSION)  # (and the due claims waiting for the loop)
        self._bad_specs.clear()
        self._awaiting.clear()
        self._pending = []
