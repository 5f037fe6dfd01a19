"""The agent: keeps its task set, ticks the scheduler, claims fires in batches, runs them.

In standalone mode (``cloudtask agent --standalone``) the agent reads the tasks of its group
straight from MongoDB every ``poll_interval``; it is one process, so there is no placement.
Every fire is still claimed through the unique run index, so two standalone agents given the
same tasks run each fire once between them.

The claim protocol (docs/architecture.md, "A fire runs once"):

- A fire is claimed by inserting its run document; the unique index on ``(task, scheduled_for,
  slot, attempt)`` lets one process win it. A claim the agent can start at once is written
  ``running``; one that must wait for a slot is written ``queued`` and moved to ``running`` by
  a conditional write just before its process starts. So a ``queued`` claim has certainly not
  started, and a claim whose agent left before starting it is released by the leader and run
  by the task's new owner instead of being written off.
- Nothing starts unless the agent's fence holds: checked after the claim is written, and again
  just before the process starts (for the claim's own session). A fire claimed by an agent
  that lost its fence meanwhile is released, never started late.
- When a claim cannot be written (MongoDB unreachable), its fires wait. Each step first
  settles the claims whose write may have landed (they are ours if stored), then collapses each
  task's backlog like a late tick: the newest fire runs (or is caught up, per ``misfire``), every
  older one is recorded ``missed``; ``forbid`` is checked again at claim time. No fire is
  dropped without a record. A step stops at the first chunk that fails.
- Every MongoDB call of the loop has a deadline (``CALL_BUDGET``); the loop never waits longer.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError

from ..clock import from_epoch, to_bson_time, utcnow
from ..config import Config
from ..exceptions import CloudTaskError, ValidationError
from ..runmodel import (
    RETRY_STATUSES,
    RUNNING_STATUSES,
    lost_fields,
    new_id,
    new_run_document,
    released_fields,
)
from ..store import Store
from ..task import TaskSpec, parse_task
from .assigned import AssignedTask
from .executor import Executor
from .files import FileCache
from .guard import GuardClient
from .journal import Journal
from .leases import LeaseKeeper
from .logfiles import LogJanitor
from .proctree import IS_POSIX, end_processes, orphans_of_agent
from .run import RunContext
from .runwriter import RunWriter
from .scheduler import Fire, Scheduler

log = logging.getLogger(__name__)

CLAIM_CHUNK = 250  # fires claimed per round trip; a burst starts running after the first chunk
CALL_BUDGET = 2.0  # seconds any one MongoDB call of the agent loop may take
PURGE_INTERVAL = 3600.0  # seconds between deletions of runs past their retention
TOKEN_BYTES = 24  # per-run token: 192 random bits
MAX_MISSED_RECORDS = 1000  # per task and backlog: older missed fires are summed up in one
STANDALONE_SILENT_AFTER = 60.0  # a standalone agent silent this long has its runs ended
STORE_ERRORS = (CloudTaskError, PyMongoError)
FORBID_CHECK_SLACK = 5.0  # seconds beyond a session length that a new owner double-checks forbid
# seconds a stopping agent keeps trying to store final states (what is not stored then is
# in the run journal, and recorded by the agent's next start)
WRITER_STOP_BUDGET = 5.0
JOURNAL_TIDY_INTERVAL = 10.0  # seconds between looks for run journal segments to delete
# An earlier life's claims that were not stored when this life recovered may still land (a
# write held in the network, or by a frozen server, reaches MongoDB after its writer died):
# they are looked for this long, this often, and released if they appear.
LATE_CLAIM_WATCH = 120.0
LATE_CLAIM_LOOK = 3.0
# why a claim of an earlier life that never started is released
STOPPED_BEFORE_START = "its agent stopped before starting it"


def resolve_agent_id(configured: str, data_dir: Path) -> str:
    """The configured id, else the one kept in ``<data_dir>/agent-id``, else a new one kept there."""
    if configured:
        return configured
    path = data_dir / "agent-id"
    try:
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    except FileNotFoundError:
        pass
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40].strip(".-_") or "agent"
    agent_id = f"{host}-{secrets.token_hex(3)}"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(agent_id + "\n", encoding="utf-8")
    return agent_id


def run_tokens(n: int) -> list[str]:
    """``n`` per-run tokens from one read of the system's randomness (each read would let the
    busy run threads take the GIL from the scheduling loop)."""
    raw = secrets.token_bytes(TOKEN_BYTES * n)
    return [
        base64.urlsafe_b64encode(raw[i : i + TOKEN_BYTES]).decode().rstrip("=")
        for i in range(0, len(raw), TOKEN_BYTES)
    ]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def lease_name(task_id: str, slot: str = "one") -> str:
    """One lease per keepalive task; one per agent for mode ``all`` (its slot)."""
    return f"keepalive:{task_id}" if slot == "one" else f"keepalive:{task_id}:{slot}"


@dataclass
class _Claim:
    """A fire on its way to being claimed. ``doc`` is built when it is written; a claim whose
    write may have landed keeps its document (same ``_id``), so it is recognised as ours."""

    fire: Fire
    spec: TaskSpec
    revision: int
    token: str
    doc: dict | None = None
    reason: str | None = None  # why a fire is recorded rather than run


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
        self.scheduler = Scheduler()
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
        )
        self.leases = LeaseKeeper(
            store,
            kill=self.executor.kill,
            alive=self._lease_alive,
            fence_ok=self.may_claim,
            kill_grace=acfg.kill_grace,
            on_deadline=self.guard.set_deadline if self.guard is not None else None,
        )
        self.janitor = LogJanitor(self.log_dir, acfg.log_retention_days)
        self._specs: dict[str, tuple[int, TaskSpec]] = {}
        self._pending: list[_Claim] = []  # fires not claimed yet (MongoDB did not answer)
        self._in_doubt: list[_Claim] = []  # claims written without an answer: ours if stored
        self._claim_error = ""  # why the last claim failed (for the records of a backlog)
        self._starting: set[str] = set()  # keepalive runs between their lease and their start
        self._starting_lock = threading.Lock()
        self._done: list[tuple[str, int]] = []  # one-shot tasks that ran, to be marked done
        self._done_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._leaving_lock = threading.Lock()  # the leaving is announced once (see stop)
        self._left_announced = False
        self._last_sync: datetime | None = None
        self._bad_specs: dict[str, int] = {}
        # tasks new to this process, scheduled once their history is read: id -> changed at
        self._awaiting: dict[str, datetime | str | None] = {}
        self._recovered = False  # an earlier life's leftovers dealt with (see recover)
        # an earlier life's claims, never started, not stored at recovery: id set, watch end
        self._late_claims: tuple[set[str], float] | None = None
        self._late_looked = 0.0
        # task id -> {run id: (scheduled_for, attempt)}: runs of our tasks that another agent
        # started and may still be finishing (forbid holds across agents; their retries are ours)
        self._foreign: dict[str, dict[str, tuple[datetime, int]]] = {}
        self._taken_at: dict[str, float] = {}  # task id -> monotonic time it was scheduled here
        self._foreign_checked = 0.0
        self._pending_checked: float | None = None  # monotonic time of the last look
        self._pending_signal = threading.Event()
        self._purged_at = -PURGE_INTERVAL

    # --- task set ---------------------------------------------------------------------------

    def sync_tasks(self, now: datetime) -> None:
        """Bring the scheduler in line with the enabled tasks of this agent's group."""
        with pymongo.timeout(CALL_BUDGET):
            revisions = self.store.task_revisions(groups=[self.group])
        wanted = {tid for tid, (_, done) in revisions.items() if not done}
        changed = [tid for tid in wanted if self._known_revision(tid) != revisions[tid][0]]
        if changed:
            with pymongo.timeout(CALL_BUDGET):
                docs = self.store.get_tasks(changed)
            for doc in docs:
                self._take(AssignedTask.from_task(doc), now)
        for tid in set(self._specs) - wanted:
            self._drop(tid)  # deleted, or a one-shot task that is done
        self._last_sync = now

    def _sync_due(self, now: datetime, poll: timedelta) -> bool:
        return self._last_sync is None or now - self._last_sync >= poll

    def _known_revision(self, task_id: str) -> int | None:
        if task_id in self._specs:
            return self._specs[task_id][0]
        return self._bad_specs.get(task_id)

    def _slot(self, spec: TaskSpec) -> str:
        return self.agent_id if spec.mode == "all" else "one"

    def _take(self, task: AssignedTask, now: datetime) -> None:
        task_id, revision = task.task_id, task.revision
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
            self._drop(task_id)
            return
        self._bad_specs.pop(task_id, None)
        if not task.enabled:
            self._drop(task_id)
            self._specs[task_id] = (revision, spec)  # known, so it is not re-read every sync
            return
        previous = self._specs.get(task_id)
        self._specs[task_id] = (revision, spec)
        if previous is None:
            # a run may already wait for this task (a manual run signalled before the task
            # reached this agent): look at the next step, not at the next poll
            self._pending_signal.set()
        if task_id in self._awaiting or (previous is None and not spec.schedule.keepalive):
            # new to this process: scheduled once its history is read (see _read_histories)
            self._awaiting[task_id] = task.changed_at
            log.info("task %s (%s) revision %s taken", spec.name, task_id, revision)
            return
        self.scheduler.upsert(task_id, spec, revision, now)
        log.info("task %s (%s) revision %s scheduled", spec.name, task_id, revision)
        if previous is not None and previous[1].schedule.keepalive:
            # the running instance makes way for the new definition; its exit starts the next
            self.executor.kill_task(task_id, f"restarted for revision {revision}")

    def _read_histories(self, now: datetime) -> None:
        """Schedule the tasks new to this process from their history: fires since their last
        recorded one are caught up or recorded missed, retries still owed are made, and runs
        another agent is finishing are watched. A task whose history cannot be read now (MongoDB
        unreachable) waits unscheduled, rather than lose its record of what was missed: the
        fires could not be claimed meanwhile anyway. The first failure ends the pass."""
        for task_id, changed_at in list(self._awaiting.items()):
            known = self._specs.get(task_id)
            if known is None:
                del self._awaiting[task_id]
                continue
            revision, spec = known
            try:
                since, retries = self._history(task_id, spec, changed_at, now)
                if spec.mode == "one":
                    self._note_foreign_runs(task_id)
            except STORE_ERRORS as e:
                log.warning(
                    "cannot read the run history of %s yet (%d tasks wait for theirs): %s",
                    spec.name,
                    len(self._awaiting),
                    e,
                )
                return
            del self._awaiting[task_id]
            self._taken_at[task_id] = time.monotonic()
            self.scheduler.upsert(task_id, spec, revision, now, since=since)
            for retry in retries:
                self.scheduler.retry(task_id, *retry)
            log.info("task %s (%s) revision %s scheduled", spec.name, task_id, revision)

    def _note_foreign_runs(self, task_id: str) -> None:
        """Runs of a task that came to us which another agent started and may be finishing:
        ``forbid`` waits for them, and their retries (if they fail) are made here."""
        elsewhere = {
            d["_id"]: (d["scheduled_for"], d["attempt"]) for d in self._runs_elsewhere([task_id])
        }
        if elsewhere:
            self._foreign[task_id] = elsewhere

    def _runs_elsewhere(self, task_ids: list[str]) -> list[dict]:
        """The unfinished scheduled runs of these tasks (slot ``one``) that other agents hold
        (a manual run is one run and holds nothing up)."""
        with pymongo.timeout(CALL_BUDGET):
            found = self.store.unfinished_runs({"task_id": {"$in": task_ids}, "slot": "one"})
        return [
            d
            for d in found
            if d.get("agent") not in (None, self.agent_id) and d.get("trigger") != "manual"
        ]

    def _history(
        self, task_id: str, spec: TaskSpec, changed_at: datetime | str | None, now: datetime
    ) -> tuple[datetime, list[tuple[datetime, int, datetime]]]:
        """What a task's history says when it comes to this agent process (raises StoreError
        or PyMongoError when it cannot be read).

        First, up to when its fires were handled: its latest recorded fire (any agent, any
        status), or when it was created or last changed, whichever is later. Fires after that
        which are due now were missed (an agent died, or none ran the task) and are caught up
        or recorded per its policy. A mode ``all`` task's history is this agent's own slot: an
        agent's history starts when it first ran the task, so a new agent misses nothing.
        Second, the retries still owed, ``(scheduled_for, attempt, due)``: recent runs that
        failed (or were lost) with attempts left and no next attempt (their agent died or
        stopped before retrying), within the task's ``misfire_grace``.
        """
        if isinstance(changed_at, str):
            try:
                changed_at = datetime.fromisoformat(changed_at)
            except ValueError:
                changed_at = None
        since = changed_at if isinstance(changed_at, datetime) else now
        with pymongo.timeout(CALL_BUDGET):
            last = self.store.last_fire(task_id, self._slot(spec))
            owed = []
            if spec.retries and last is not None:
                horizon = now - timedelta(seconds=spec.misfire_grace)
                owed = self.store.owed_retries(
                    task_id, self._slot(spec), spec.retries, horizon, RETRY_STATUSES
                )
        if last is None:
            return (now if spec.mode == "all" else since), []
        retries = []
        for run in owed:
            finished = run.get("finished_at")
            finished = finished if isinstance(finished, datetime) else now
            due = max(now, finished + timedelta(seconds=spec.retry_delay))
            retries.append((run["scheduled_for"], run["attempt"] + 1, due))
        return max(since, last["scheduled_for"]), retries

    def _drop(self, task_id: str) -> None:
        self._taken_at.pop(task_id, None)
        self._foreign.pop(task_id, None)
        self._awaiting.pop(task_id, None)
        known = self._specs.pop(task_id, None)
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
        if self._awaiting:
            self._read_histories(now)
        if not self._recovered:
            self._recover_quietly(now)
        if self._late_claims is not None:
            self._release_late_claims()
        fires, delay = self.scheduler.tick(now)
        self.dispatch(fires, now)
        for then in (self._take_pending_runs, self._check_foreign_runs, self._mark_done):
            if self._stop.is_set():
                return 0.0  # stopping: no further call may hold the stop up
            then(now)
        self._tidy_journal()
        return delay

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
                claims.append(_Claim(fire, known[1], known[0], token, reason=fire.note))
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

    def _keep_pending(self, claims: list[_Claim], now: datetime) -> None:
        """Fires that could not be claimed wait for the next step, collapsed per task (their
        documents are built again then). Fires of tasks no longer ours are forgotten."""
        keep = []
        for c in claims:
            if c.spec.schedule.keepalive and c.doc is not None:
                self._release_lease(c.doc["_id"])  # its start is planned again, lease and all
                self.scheduler.keepalive_not_started(c.fire.task_id, now)
            elif c.fire.task_id in self._specs:
                c.doc = None
                keep.append(c)
        self._pending = self._collapse(keep, now) if keep else []
        if self._pending:
            log.warning(
                "cannot claim %d fires yet (%s); they wait", len(self._pending), self._claim_error
            )

    def _collapse(self, claims: list[_Claim], now: datetime) -> list[_Claim]:
        """The rule of a late tick, per task, for fires waiting to be claimed: the newest runs
        if it is on time, is caught up within ``misfire_grace`` (``run_once``), or else is
        recorded ``missed``; every older one is recorded ``missed``. Retries and keepalive
        starts are kept as they are. Beyond ``MAX_MISSED_RECORDS`` missed fires of one task,
        the oldest kept record also counts the ones not recorded one by one."""
        by_task: dict[str, list[_Claim]] = {}
        out: list[_Claim] = []
        for c in claims:
            if c.fire.trigger in ("schedule", "catch-up") and not c.spec.schedule.keepalive:
                by_task.setdefault(c.fire.task_id, []).append(c)
            else:
                out.append(c)
        for group in by_task.values():
            group.sort(key=lambda c: c.fire.scheduled_for)
            *older, newest = group
            for c in older:
                self._record_only(c, "missed", c.reason or self._late_reason())
            if newest.fire.status is None:
                verdict = self._late_verdict(newest.spec, newest.fire.scheduled_for, now)
                if verdict == "catch-up":
                    newest.fire = _with(newest.fire, trigger="catch-up")
                elif verdict == "missed":
                    self._record_only(newest, "missed", self._late_reason())
            if len(older) > MAX_MISSED_RECORDS:
                dropped = older[: len(older) - MAX_MISSED_RECORDS]
                older = older[len(dropped) :]
                first = dropped[0].fire.scheduled_for
                older[0].reason = (
                    f"{older[0].reason}; {len(dropped)} earlier fires from {first.isoformat()} "
                    f"were missed too (not recorded one by one)"
                )
            out.extend(older)
            out.append(newest)
        return out

    def _late_verdict(self, spec: TaskSpec, scheduled_for: datetime, now: datetime) -> str:
        """``run`` (on time), ``catch-up`` (late, within ``misfire_grace``, ``run_once``) or
        ``missed``: the rule of a late tick for one fire."""
        late = now - scheduled_for
        if late <= self.scheduler.on_time_tolerance:
            return "run"
        if late <= timedelta(seconds=spec.misfire_grace) and spec.misfire == "run_once":
            return "catch-up"
        return "missed"

    def _late_reason(self) -> str:
        why = self._claim_error or "the agent was busy or paused"
        return f"not claimed in time: {why}"

    @staticmethod
    def _record_only(claim: _Claim, status: str, reason: str) -> None:
        claim.fire = _with(claim.fire, status=status)
        claim.reason = claim.reason or reason

    def _ready(self, claim: _Claim, now: datetime) -> bool:
        """A keepalive start needs its lease first (one instance in the whole cluster): a lease
        held elsewhere is tried again a third of a lease later, without counting a restart."""
        if not claim.spec.schedule.keepalive or claim.fire.status is not None:
            return True
        if claim.doc is not None:
            return True  # written before: its lease was taken then
        run_id = new_id()
        with self._starting_lock:
            self._starting.add(run_id)
        name = lease_name(claim.fire.task_id, self._slot(claim.spec))
        if not self.leases.acquire(name, run_id):
            with self._starting_lock:
                self._starting.discard(run_id)
            self.scheduler.keepalive_retry_at(
                claim.fire.task_id, now + timedelta(seconds=self.leases.ttl / 3)
            )
            return False
        claim.doc = {"_id": run_id}  # the document is built around this id
        return True

    def _lease_alive(self, run_id: str) -> bool:
        with self._starting_lock:
            if run_id in self._starting:
                return True
        return self.executor.is_active(run_id) or self.writer.keeps(run_id)

    def _build_documents(self, claims: list[_Claim], now: datetime) -> None:
        """The run documents that claim these fires: recorded ones (missed, skipped: forbid
        checked now) are final at once; of the ones to run, as many as there are free slots
        are claimed ``running``, the rest ``queued``."""
        free = self.executor.free_slots()
        for claim in claims:
            fire, spec = claim.fire, claim.spec
            status, reason = fire.status or "run", claim.reason
            if (
                status == "run"
                and spec.concurrency == "forbid"
                and not spec.schedule.keepalive
                and fire.trigger != "retry"
                and (
                    self.executor.has_active(fire.task_id) or self._running_elsewhere(fire.task_id)
                )
            ):
                status, reason = (
                    "skipped",
                    "the previous run was still running (concurrency: forbid)",
                )
            if status == "run":
                status = "running" if free > 0 else "queued"
                free -= 1
            run_id = claim.doc["_id"] if claim.doc else None
            claim.doc = new_run_document(
                task_id=fire.task_id,
                task_name=spec.name,
                group=spec.group,
                revision=claim.revision,
                scheduled_for=fire.scheduled_for,
                slot=self._slot(spec),
                attempt=fire.attempt,
                trigger=fire.trigger,
                agent=self.agent_id,
                status=status,
                now=now,
                token_hash=token_hash(claim.token),
                session=self.session,
            )
            if run_id is not None:
                claim.doc["_id"] = run_id
            if reason and status in ("missed", "skipped"):
                claim.doc["error"] = reason

    def _claim_chunk(self, chunk: list[_Claim], now: datetime) -> bool:
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

    def _settle_in_doubt(self, claims: list[_Claim], now: datetime) -> bool:
        """Claims written without an answer are written again, as they were: each is then
        stored under its own id (it had landed, or lands now) and ours, or the fire is another
        agent's. Reading whether they landed would not settle them: a write held in the
        network can land after the read said it had not, leaving a claim nobody starts or
        ends; written again, a late copy finds its id taken. A landed fire is recorded
        ``missed`` when a newer fire of its task waits too, or when it is now too late, by the
        rule of a late tick. False if MongoDB cannot say."""
        docs = [c.doc for c in self._in_doubt]
        try:
            with pymongo.timeout(CALL_BUDGET * 2):
                won = self.store.claim_runs(docs)
        except STORE_ERRORS as e:
            self._claim_error = f"MongoDB did not answer ({type(e).__name__})"
            log.debug("claims still in doubt: %s", e)
            return False
        doubt, self._in_doubt = self._in_doubt, []
        landed = [c for c, ok in zip(doubt, won, strict=True) if ok]
        others = [c for c, ok in zip(doubt, won, strict=True) if not ok]
        self._after_claim(others, [False] * len(others), now)
        if landed:
            log.info("%d claims written while MongoDB did not answer are settled", len(landed))
            newest: dict[str, datetime] = {}
            for c in claims:
                if c.fire.trigger != "retry":
                    t = newest.get(c.fire.task_id)
                    newest[c.fire.task_id] = (
                        max(t, c.fire.scheduled_for) if t else c.fire.scheduled_for
                    )
            start = []
            for c in landed:
                if (
                    c.doc["status"] in RUNNING_STATUSES
                    and not c.spec.schedule.keepalive
                    and c.fire.trigger != "retry"
                    and (
                        newest.get(c.fire.task_id, c.fire.scheduled_for) > c.fire.scheduled_for
                        or self._late_verdict(c.spec, c.fire.scheduled_for, now) == "missed"
                    )
                ):
                    self._finish_unstarted(c.doc, "missed", self._late_reason())
                else:
                    start.append(c)
            self._after_claim(start, [True] * len(start), now)
        return True

    def _after_claim(self, claims: list[_Claim], won: list[bool], now: datetime) -> None:
        """Start the claims won, if the fence still holds now that they are written (an agent
        frozen while its claim was in flight must not start it when it wakes up), and if no
        other agent runs the task meanwhile (``forbid``, see :meth:`_busy_elsewhere`)."""
        fenced = not self.may_claim()
        busy = {} if fenced else self._busy_elsewhere(claims, won)
        for claim, ok in zip(claims, won, strict=True):
            fire, spec, doc = claim.fire, claim.spec, claim.doc
            if not ok:
                log.debug("fire %s of %s claimed elsewhere", doc["scheduled_for"], spec.name)
                if spec.schedule.keepalive:
                    self._release_lease(doc["_id"])
                    self.scheduler.keepalive_not_started(fire.task_id, now)
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
                    self._release_lease(doc["_id"])
                    self.scheduler.keepalive_not_started(fire.task_id, now)
                continue
            if doc["_id"] in busy:
                self._finish_unstarted(doc, "skipped", busy[doc["_id"]])
                continue
            if spec.concurrency == "replace" and fire.trigger != "retry":
                self.executor.kill_task(fire.task_id, f"replaced by run {doc['_id']}")
            self._submit(doc, spec, claim.revision, claim.token, fire.trigger, fire.attempt)

    def _busy_elsewhere(self, claims: list[_Claim], won: list[bool]) -> dict[str, str]:
        """``forbid`` across agents while two may both think a task is theirs: for a session
        length after a task came here, its former owner may not have seen the move yet (it was
        cut off from ZooKeeper) and may still start runs; and while this agent has not heard
        from ZooKeeper for a while, it may itself be that former owner. Then each claim of a
        ``forbid`` task is checked, once written, against the other agents' unfinished runs of
        the task: both claims are written before either check reads, so at least one of the
        two agents sees the other's, and of two that see each other the older fire runs.
        Returns run id -> why it does not start."""
        window = self.silent_after() + FORBID_CHECK_SLACK
        stale = self.view_may_be_stale()
        mine: dict[str, dict] = {}
        for claim, ok in zip(claims, won, strict=True):
            doc, spec = claim.doc, claim.spec
            if (
                ok
                and doc["status"] in RUNNING_STATUSES
                and spec.concurrency == "forbid"
                and spec.mode == "one"
                and not spec.schedule.keepalive
                and claim.fire.trigger != "retry"
                and (stale or time.monotonic() - self._taken_at.get(claim.fire.task_id, 0) < window)
            ):
                mine[doc["_id"]] = doc
        if not mine:
            return {}
        task_ids = sorted({d["task_id"] for d in mine.values()})
        try:
            found = self._runs_elsewhere(task_ids)
        except STORE_ERRORS as e:
            log.warning("cannot check for runs of other agents; not starting %d: %s", len(mine), e)
            why = "its former owner's runs could not be checked (MongoDB did not answer)"
            return {run_id: f"{why}; not started (concurrency: forbid)" for run_id in mine}
        others: dict[str, list[dict]] = {}
        for d in found:
            others.setdefault(d["task_id"], []).append(d)
        out = {}
        for run_id, doc in mine.items():
            for other in others.get(doc["task_id"], ()):
                if (other["scheduled_for"], other["_id"]) < (doc["scheduled_for"], run_id):
                    out[run_id] = (
                        f"the previous run was still running on {other['agent']} "
                        "(concurrency: forbid)"
                    )
                    self._foreign.setdefault(doc["task_id"], {})[other["_id"]] = (
                        other["scheduled_for"],
                        other["attempt"],
                    )
                    break
        return out

    def view_may_be_stale(self) -> bool:
        """Whether this agent may have missed a change of its assignments (a cluster agent
        that has not heard from ZooKeeper for a while)."""
        return False

    def _submit(
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
            ),
            doc,
        )
        with self._starting_lock:
            self._starting.discard(doc["_id"])

    def _begin(self, ctx: RunContext) -> tuple[str, str]:
        """Called by the executor just before a run's process starts (on its thread):
        ``("start", "")``, or ``("release", why)`` when the fence that covered its claim is
        gone, ``("drop", why)`` when another agent took it over, ``("later", why)`` when
        MongoDB cannot confirm the start of a claim that waited for its slot."""
        if ctx.session != self.session or not self.may_claim():
            return "release", "its agent lost its ZooKeeper session before starting it"
        if ctx.claimed_status == "queued":
            try:
                with pymongo.timeout(CALL_BUDGET):
                    started = self.store.start_queued_run(ctx.run_id, self.agent_id)
            except STORE_ERRORS as e:
                return "later", f"MongoDB did not confirm the start ({type(e).__name__})"
            if not started:
                return "drop", "it was taken over by another agent"
            ctx.claimed_status = "running"
            if ctx.session != self.session or not self.may_claim():
                return "release", "its agent lost its ZooKeeper session before starting it"
        return "start", ""

    # --- runs waiting for an agent: "run now", and claims released by the leader -----------

    def _take_pending_runs(self, now: datetime) -> None:
        """Take the runs of our group that wait for an agent (every ``poll_interval``, and at
        once when the cluster signals one): manual runs of our tasks (of a paused or finished
        task, which no agent owns: whichever agent of its group takes it first), and claims
        another agent made and left before starting them (released by the leader)."""
        checked = self._pending_checked
        due = checked is None or time.monotonic() - checked >= self.config.agent.poll_interval
        if not (due or self._pending_signal.is_set()) or not self.may_claim():
            return
        self._pending_signal.clear()
        self._pending_checked = time.monotonic()
        try:
            with pymongo.timeout(CALL_BUDGET):
                pending = self.store.pending_runs(self.group)
        except STORE_ERRORS as e:
            log.warning("cannot look for runs waiting for an agent: %s", e)
            return
        for doc in pending:
            try:
                with pymongo.timeout(CALL_BUDGET):
                    if doc.get("trigger") == "manual":
                        self._take_manual_run(doc)
                    else:
                        self._take_released_claim(doc, now)
            except STORE_ERRORS as e:
                log.warning("cannot take run %s: %s", doc["_id"], e)

    def _manual_spec(self, task_id: str) -> tuple[int, TaskSpec] | None:
        known = self._specs.get(task_id)
        if known is not None:
            return known
        try:
            task = self.store.get_task(task_id)
        except CloudTaskError:
            return None  # deleted: the run waits until someone cancels it
        if task.get("enabled") and not task.get("done_at"):
            return None  # a live task another agent owns: that agent takes it
        try:
            return task["revision"], parse_task(task["spec"])
        except ValidationError:
            return None

    def _take_manual_run(self, doc: dict) -> None:
        known = self._manual_spec(doc["task_id"])
        if known is None:
            return
        revision, spec = known
        token = run_tokens(1)[0]
        self.journal.claimed([doc["_id"]])
        taken = self.store.take_pending_run(
            doc["_id"], self.agent_id, self.session, token_hash(token)
        )
        if taken is None:
            return  # another agent took it, or it was cancelled
        task_id = doc["task_id"]
        busy = self.executor.has_active(task_id) or self._running_elsewhere(task_id)
        if spec.concurrency == "forbid" and busy:
            self._finish_unstarted(
                taken, "skipped", "the previous run was still running (concurrency: forbid)"
            )
            log.info("manual run %s of %s skipped: a run is going", doc["_id"], spec.name)
            return
        if spec.concurrency == "replace":
            self.executor.kill_task(task_id, f"replaced by run {doc['_id']}")
        log.info(
            "manual run %s of %s taken (asked by %s)",
            doc["_id"],
            spec.name,
            doc.get("requested_by"),
        )
        self._submit(taken, spec, revision, token, "manual", 0)

    def _take_released_claim(self, doc: dict, now: datetime) -> None:
        """A claim its agent left before starting it: the task's owner runs it like a late
        fire (on time, a catch-up within ``misfire_grace`` with ``run_once``, or recorded
        ``missed``), so a fire that never started is not written off."""
        known = self._specs.get(doc["task_id"])
        if known is None or doc.get("slot") not in ("one", self.agent_id):
            return  # not ours: the task's owner takes it
        revision, spec = known
        trigger = doc.get("trigger") or "schedule"
        outcome = None
        if spec.schedule.keepalive:
            outcome = ("skipped", "a keepalive start its agent left; the service starts here anew")
        elif trigger != "retry":
            verdict = self._late_verdict(spec, doc["scheduled_for"], now)
            if verdict == "catch-up":
                trigger = "catch-up"
            elif verdict == "missed":
                outcome = ("missed", f"released by {doc.get('released_by')}; too late to run")
        token = run_tokens(1)[0]
        self.journal.claimed([doc["_id"]])
        taken = self.store.take_pending_run(
            doc["_id"], self.agent_id, self.session, token_hash(token), trigger=trigger
        )
        if taken is None:
            return
        task_id = doc["task_id"]
        busy = self.executor.has_active(task_id) or self._running_elsewhere(task_id)
        if outcome is None and spec.concurrency == "forbid" and busy and trigger != "retry":
            outcome = ("skipped", "the previous run was still running (concurrency: forbid)")
        if outcome is not None:
            self._finish_unstarted(taken, *outcome)
            return
        log.info(
            "took over fire %s of %s (released by %s, never started)",
            doc["scheduled_for"],
            spec.name,
            doc.get("released_by"),
        )
        self._submit(taken, spec, revision, token, trigger, taken.get("attempt", 0))

    def _finish_unstarted(self, doc: dict, status: str, reason: str) -> None:
        self.writer.track(doc)
        self.writer.update(
            doc["_id"],
            {
                "status": status,
                "error": reason,
                "finished_at": to_bson_time(self.clock()),
                "duration": 0.0,
            },
            urgent=True,
        )

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

    @property
    def session(self) -> str | None:
        """The ZooKeeper session claims are made under (None in standalone mode)."""
        return None

    # --- runs of our tasks that other agents started ----------------------------------------

    def _running_elsewhere(self, task_id: str) -> bool:
        """Whether a run of this task that its previous owner started is still going (a task
        that moved while a run finished there): ``forbid`` holds across agents too."""
        return bool(self._foreign.get(task_id))

    def _check_foreign_runs(self, now: datetime) -> None:
        """Every ``poll_interval``: which runs of our tasks that other agents started are over.
        One that failed (or was lost) with attempts left is retried here: retries owed by a
        run in flight survive a move or a stop of its agent."""
        if not self._foreign:
            return
        if time.monotonic() - self._foreign_checked < self.config.agent.poll_interval:
            return
        self._foreign_checked = time.monotonic()
        ids = [r for runs in self._foreign.values() for r in runs]
        try:
            with pymongo.timeout(CALL_BUDGET):
                states = self.store.run_states(ids)
        except STORE_ERRORS as e:
            log.debug("cannot check runs finishing elsewhere: %s", e)
            return
        for task_id, runs in list(self._foreign.items()):
            for run_id in list(runs):
                state = states.get(run_id)
                if state is not None and state["status"] in RUNNING_STATUSES:
                    continue
                scheduled_for, attempt = runs.pop(run_id)
                known = self._specs.get(task_id)
                if state is None or known is None:
                    continue
                spec = known[1]
                if state["status"] in RETRY_STATUSES and attempt < spec.retries:
                    finished = state.get("finished_at")
                    finished = finished if isinstance(finished, datetime) else now
                    due = max(now, finished + timedelta(seconds=spec.retry_delay))
                    log.info(
                        "run %s of %s ended %s on another agent: retrying here",
                        run_id,
                        spec.name,
                        state["status"],
                    )
                    self.scheduler.retry(task_id, scheduled_for, attempt + 1, due)
            if not runs:
                del self._foreign[task_id]

    # --- after a run --------------------------------------------------------------------------

    def _release_lease(self, run_id: str) -> None:
        with self._starting_lock:
            self._starting.discard(run_id)
        self.leases.release(run_id)

    def _finished(self, ctx: RunContext) -> None:
        """After a run: retries, keepalive restarts, one-shot tasks marked done."""
        spec = ctx.spec
        finished = ctx.finished_at or self.clock()
        if spec.schedule.keepalive:
            # given back once the final state is stored: history never shows two instances
            self.writer.when_written(ctx.run_id, lambda: self._release_lease(ctx.run_id))
        if ctx.status in ("released", "dropped"):
            if spec.schedule.keepalive and not self._stop.is_set():
                self.scheduler.keepalive_not_started(ctx.task_id, finished)
        elif ctx.trigger == "manual":
            pass  # a manual run is one run: no retry, no restart, a one-shot task stays due
        elif spec.schedule.keepalive:
            if not self._stop.is_set():  # restarted unless the task was dropped meanwhile
                self.scheduler.keepalive_exited(ctx.task_id, ctx.started_at or finished, finished)
        elif ctx.status in RETRY_STATUSES and ctx.attempt < spec.retries:
            # if the task left this agent meanwhile, its new owner retries (see _check_foreign_runs)
            due = finished + timedelta(seconds=spec.retry_delay)
            self.scheduler.retry(ctx.task_id, ctx.scheduled_for, ctx.attempt + 1, due)
        elif spec.schedule.is_once:
            with self._done_lock:  # marked by the loop, in batches, off the run threads
                self._done.append((ctx.task_id, ctx.revision))
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
        """Clean up after an earlier life of this agent that did not stop cleanly.

        Its runs cannot be finished by anyone: their processes (found by the agent id in their
        environment) are ended. Its runs still ``queued`` or ``running``, and the ones the
        leader has marked ``lost`` meanwhile, get what the run journal knows about them: the
        outcome they really had, released (claimed but never started: the task's owner runs
        it as a catch-up, or records it missed), or else ``lost``. Agent ids must be unique
        (the cluster enforces it through ZooKeeper).
        """
        leftovers = orphans_of_agent(self.agent_id)
        if leftovers:
            log.warning("ending %d processes left by an earlier run of this agent", len(leftovers))
            end_processes(leftovers, self.config.agent.kill_grace)
        # read after the leftovers are gone: their guard notes how they ended
        earlier = self.journal.read_earlier()
        known = earlier.claimed | earlier.started | set(earlier.ended)
        with pymongo.timeout(CALL_BUDGET * 5):
            docs = self.store.left_runs(self.agent_id, self.journal.own_claims(), known, now)
            counts: dict[str, int] = {}
            for doc in docs:
                verdict, state = earlier.verdict(doc["_id"])
                if verdict == "ended":
                    doc.update(journal_state(state or {}))
                elif verdict == "never started":
                    doc.update(released_fields(self.agent_id, STOPPED_BEFORE_START))
                elif doc["status"] != "lost":
                    doc.update(
                        lost_fields(doc, "the agent stopped without finishing this run", now)
                    )
                counts[verdict] = counts.get(verdict, 0) + 1
            self.store.save_runs(docs, owner=self.agent_id)
            self.store.free_leases([d["_id"] for d in docs])  # their processes are gone
        unseen = earlier.never_started() - {d["_id"] for d in docs}
        if unseen:
            self._late_claims = (unseen, time.monotonic() + LATE_CLAIM_WATCH)
        self.journal.forget_earlier(earlier)
        if docs:
            log.warning(
                "runs left by an earlier run of this agent: %d ended (outcome recorded), "
                "%d never started (released), %d lost",
                counts.get("ended", 0),
                counts.get("never started", 0),
                counts.get("unknown", 0),
            )

    def _release_late_claims(self) -> None:
        """Claims an earlier life wrote and never started, whose documents were not stored
        when this life recovered: a write held in the network (or by a frozen server) can
        land after its writer died, and would then stay ``running`` under a dead session
        until the leader called it ``lost``. Looked for a while after the start; each one
        that lands is released (the task's owner runs it as a catch-up, or records it
        missed), like the earlier life's other claims that never started."""
        assert self._late_claims is not None
        if time.monotonic() - self._late_looked < LATE_CLAIM_LOOK:
            return
        self._late_looked = time.monotonic()
        ids, until = self._late_claims
        try:
            with pymongo.timeout(CALL_BUDGET):
                docs = self.store.runs_by_id(sorted(ids))
                mine = [
                    d
                    for d in docs
                    if d.get("agent") == self.agent_id
                    and d["status"] in (*RUNNING_STATUSES, "lost")
                ]
                for doc in mine:
                    doc.update(released_fields(self.agent_id, STOPPED_BEFORE_START))
                self.store.save_runs(mine, owner=self.agent_id)
        except STORE_ERRORS as e:
            log.debug("cannot look for late claims of an earlier life: %s", e)
            return
        if mine:
            log.warning(
                "released %d claims of an earlier run of this agent that were stored after it "
                "stopped, never started",
                len(mine),
            )
        ids -= {d["_id"] for d in docs}  # every one found is settled: released, or not ours
        if not ids or time.monotonic() >= until:
            self._late_claims = None

    def _recover_quietly(self, now: datetime) -> None:
        """:meth:`recover`, tried again on later steps while MongoDB does not answer."""
        try:
            self.recover(now)
            self._recovered = True
        except STORE_ERRORS as e:
            log.warning("cannot check for runs left by an earlier start yet: %s", e)

    def run(self) -> None:
        """Schedule until :meth:`stop`; then stop runs gracefully and flush every write."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.journal.open()
        self._recover_quietly(self.clock())
        self.writer.start()
        if self.guard is not None:
            self.guard.start()
        self.janitor.start()
        self.leases.start()
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
            self._drop(task_id)
        self._bad_specs.clear()
        self._awaiting.clear()
        self._pending = []


def journal_state(state: dict) -> dict:
    """A run's final state as the journal keeps it, as run document fields."""
    out = {k: state[k] for k in ("status", "exit_code", "error", "http_status") if k in state}
    for key in ("started_at", "finished_at"):
        if state.get(key) is not None:
            out[key] = to_bson_time(from_epoch(state[key]))
    if state.get("duration") is not None:
        out["duration"] = state["duration"]
    return out


def _with(fire: Fire, **changes: object) -> Fire:
    return replace(fire, **changes)
