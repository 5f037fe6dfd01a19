"""The agent: keeps its task set, ticks the scheduler, claims fires in batches, runs them.

In standalone mode (``cloudtask agent --standalone``) the agent reads the tasks of its group
straight from MongoDB every ``poll_interval``; it is one process, so there is no placement.
Every fire is still claimed through the unique run index, so two standalone agents given the
same tasks run each fire once between them.

A claim that fails because MongoDB is unreachable is retried on the next steps; a fire that
cannot be claimed within its task's ``misfire_grace`` is dropped with a warning (it never runs
unclaimed: once-only comes before liveness).
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from ..config import Config
from ..exceptions import CloudTaskError, StoreError, ValidationError
from ..store import RUNNING_STATUSES, Store, new_run_document, utcnow
from ..task import TaskSpec, parse_task
from .executor import Executor, RunContext
from .files import FileCache
from .logfiles import LogJanitor
from .proctree import end_processes, orphans_of_agent
from .runwriter import RunWriter
from .scheduler import Fire, Scheduler

log = logging.getLogger(__name__)

CLAIM_CHUNK = 250
PURGE_INTERVAL = 3600.0  # seconds between deletions of runs past their retention
TOKEN_BYTES = 24  # per-run token: 192 random bits
LEASE_TTL = 30.0  # keepalive lease life (s); renewed every third of it
LEASE_MARGIN = 5.0  # an instance is ended this long before its unrenewed lease expires  # fires claimed per round trip; a burst starts running after the first chunk


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


def lease_name(task_id: str) -> str:
    return f"keepalive:{task_id}"


@dataclass
class _Claim:
    """A fire on its way to being claimed: the document is built once and reused on retry, so
    a claim whose first insert landed but whose answer was lost is recognised as ours."""

    fire: Fire
    spec: TaskSpec
    revision: int
    token: str
    doc: dict


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
        self.writer = RunWriter(store)
        self.executor = Executor(
            agent_id=self.agent_id,
            log_dir=self.log_dir,
            writer=self.writer,
            max_parallel=acfg.max_parallel,
            kill_grace=acfg.kill_grace,
            on_finished=self._finished,
            files=FileCache(store, self.data_dir / "files"),
            work_dir=self.data_dir / "work",
        )
        self.janitor = LogJanitor(self.log_dir, acfg.log_retention_days)
        self._specs: dict[str, tuple[int, TaskSpec]] = {}
        self._unclaimed: list[_Claim] = []
        self._done: list[tuple[str, int]] = []  # one-shot tasks that ran, to be marked done
        self._done_lock = threading.Lock()
        self._leases: dict[str, tuple[str, float]] = {}  # run id -> (task id, last renewal)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_sync: datetime | None = None
        self._bad_specs: dict[str, int] = {}
        # task id -> a run of it another agent started and may still be finishing (forbid)
        self._foreign_runs: dict[str, str] = {}
        self._manual_checked: float | None = None  # monotonic time of the last look
        self._manual_signal = threading.Event()
        self._purged_at = -PURGE_INTERVAL

    # --- task set ---------------------------------------------------------------------------

    def sync_tasks(self, now: datetime) -> None:
        """Bring the scheduler in line with the enabled tasks of this agent's group."""
        revisions = self.store.task_revisions(groups=[self.group])
        wanted = {tid for tid, (_, done) in revisions.items() if not done}
        changed = [tid for tid in wanted if self._known_revision(tid) != revisions[tid][0]]
        if changed:
            for doc in self.store.get_tasks(changed):
                self._take(doc, now)
        for tid in set(self._specs) - wanted:
            self._drop(tid)  # deleted, or a one-shot task that is done
        self._last_sync = now

    def _sync_due(self, now: datetime, poll: timedelta) -> bool:
        return self._last_sync is None or now - self._last_sync >= poll

    def _known_revision(self, task_id: str) -> int | None:
        if task_id in self._specs:
            return self._specs[task_id][0]
        return self._bad_specs.get(task_id)

    def _take(self, doc: dict, now: datetime) -> None:
        task_id, revision = doc["_id"], doc["revision"]
        if self._known_revision(task_id) == revision:
            return  # nothing changed
        try:
            spec = parse_task(doc["spec"])
        except ValidationError as e:
            if self._bad_specs.get(task_id) != revision:
                log.error(
                    "task %s revision %s is not valid, not scheduled: %s", task_id, revision, e
                )
            self._bad_specs[task_id] = revision
            self._drop(task_id)
            return
        self._bad_specs.pop(task_id, None)
        if not doc.get("enabled"):
            self._drop(task_id)
            self._specs[task_id] = (revision, spec)  # known, so it is not re-read every sync
            return
        previous = self._specs.get(task_id)
        self._specs[task_id] = (revision, spec)
        since, retry = None, None
        if previous is None and not spec.schedule.keepalive:
            since, retry = self._history(task_id, spec, doc.get("updated_at"), now)
            if spec.concurrency == "forbid":
                self._note_foreign_run(task_id)
        self.scheduler.upsert(task_id, spec, revision, now, since=since)
        if retry is not None:
            self.scheduler.retry(task_id, *retry)
        log.info("task %s (%s) revision %s scheduled", spec.name, task_id, revision)
        if previous is not None and previous[1].schedule.keepalive:
            # the running instance makes way for the new definition; its exit starts the next
            self.executor.kill_task(task_id, f"restarted for revision {revision}")

    def _note_foreign_run(self, task_id: str) -> None:
        try:
            running = self.store.list_runs(task_id=task_id, status=["running"], limit=1)
        except CloudTaskError:
            return
        if running and running[0]["agent"] != self.agent_id:
            self._foreign_runs[task_id] = running[0]["_id"]

    def _history(
        self, task_id: str, spec: TaskSpec, changed_at: datetime | str | None, now: datetime
    ) -> tuple[datetime, tuple[datetime, int, datetime] | None]:
        """What a task's history says when it comes to this agent process.

        First, up to when its fires were handled: its latest recorded fire (any agent, any
        status), or when it was created or last changed, whichever is later. Fires after that
        which are due now were missed (an agent died, or none ran the task) and are caught up
        or recorded per its policy. Second, a retry still owed, ``(scheduled_for, attempt,
        due)``, when the latest run failed with attempts left (its agent died before retrying).
        """
        if isinstance(changed_at, str):
            try:
                changed_at = datetime.fromisoformat(changed_at)
            except ValueError:
                changed_at = None
        since = changed_at if isinstance(changed_at, datetime) else now
        slot = self.agent_id if spec.mode == "all" else "one"
        try:
            last = self.store.last_fire(task_id, slot)
        except CloudTaskError as e:
            log.warning("cannot read the run history of %s; no catch-up: %s", spec.name, e)
            return now, None
        if last is None:
            return since, None
        retry = None
        if last["status"] in ("failed", "timed_out") and last["attempt"] < spec.retries:
            finished = last.get("finished_at")
            finished = finished if isinstance(finished, datetime) else now
            due = max(now, finished + timedelta(seconds=spec.retry_delay))
            retry = (last["scheduled_for"], last["attempt"] + 1, due)
        return max(since, last["scheduled_for"]), retry

    def _drop(self, task_id: str) -> None:
        self._foreign_runs.pop(task_id, None)
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
        fires, delay = self.scheduler.tick(now)
        claims, self._unclaimed = self._unclaimed, []
        self._dispatch(claims, fires, now)
        self._take_manual_runs(now)
        self._renew_leases(now)
        self._mark_done(now)
        return delay

    def dispatch(self, fires: list[Fire], now: datetime) -> None:
        """Claim these fires and start the ones won."""
        self._dispatch([], fires, now)

    def _dispatch(self, claims: list[_Claim], fires: list[Fire], now: datetime) -> None:
        tokens = run_tokens(len(fires))
        claims += [c for c in map(self._prepare, fires, tokens, [now] * len(fires)) if c]
        for i in range(0, len(claims), CLAIM_CHUNK):  # the first runs start after one chunk
            self._claim_and_start(claims[i : i + CLAIM_CHUNK], now)

    def _prepare(self, fire: Fire, token: str, now: datetime) -> _Claim | None:
        """The run document that claims ``fire`` (built once: a retried claim reuses it)."""
        known = self._specs.get(fire.task_id)
        if known is None:
            return None
        revision, spec = known
        status = fire.status or "queued"
        if (
            status == "queued"
            and spec.concurrency == "forbid"
            and not spec.schedule.keepalive
            and fire.trigger != "retry"
            and (self.executor.has_active(fire.task_id) or self._running_elsewhere(fire.task_id))
        ):
            status = "skipped"
        doc = new_run_document(
            task_id=fire.task_id,
            task_name=spec.name,
            group=spec.group,
            revision=revision,
            scheduled_for=fire.scheduled_for,
            slot=self.agent_id if spec.mode == "all" else "one",
            attempt=fire.attempt,
            trigger=fire.trigger,
            agent=self.agent_id,
            status=status,
            now=now,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            session=self.session,
        )
        if status == "skipped":
            doc["error"] = "the previous run was still running (concurrency: forbid)"
        return _Claim(fire, spec, revision, token, doc)

    # --- manual runs ("run now") ----------------------------------------------------------------

    def _take_manual_runs(self, now: datetime) -> None:
        """Start the manual runs of our tasks that wait for an agent (every ``poll_interval``,
        and at once when the cluster signals one). A run of a paused or finished task, which no
        agent owns, goes to whichever agent of its group takes it first."""
        checked = self._manual_checked
        due = checked is None or time.monotonic() - checked >= self.config.agent.poll_interval
        if not (due or self._manual_signal.is_set()) or not self.may_claim():
            return
        self._manual_signal.clear()
        self._manual_checked = time.monotonic()
        try:
            pending = self.store.pending_manual_runs(self.group)
        except CloudTaskError as e:
            log.warning("cannot look for manual runs: %s", e)
            return
        for doc in pending:
            try:
                self._take_manual_run(doc, now)
            except CloudTaskError as e:
                log.warning("cannot take manual run %s: %s", doc["_id"], e)

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

    def _take_manual_run(self, doc: dict, now: datetime) -> None:
        known = self._manual_spec(doc["task_id"])
        if known is None:
            return
        revision, spec = known
        token = run_tokens(1)[0]
        taken = self.store.take_manual_run(
            doc["_id"], self.agent_id, self.session, hashlib.sha256(token.encode()).hexdigest()
        )
        if taken is None:
            return  # another agent took it, or it was cancelled
        task_id = doc["task_id"]
        busy = self.executor.has_active(task_id) or self._running_elsewhere(task_id)
        if spec.concurrency == "forbid" and busy:
            self.writer.track(taken)
            self.writer.update(
                taken["_id"],
                {
                    "status": "skipped",
                    "error": "the previous run was still running (concurrency: forbid)",
                    "finished_at": taken["claimed_at"],
                    "duration": 0.0,
                },
                urgent=True,
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
        self.executor.submit(
            RunContext(
                run_id=doc["_id"],
                task_id=task_id,
                revision=revision,
                spec=spec,
                scheduled_for=taken["scheduled_for"],
                attempt=0,
                trigger="manual",
                token=token,
                agent=self.agent_id,
            ),
            taken,
        )

    def may_claim(self) -> bool:
        """Whether this agent may claim fires now (the cluster agent's fencing lease)."""
        return True

    @property
    def session(self) -> str | None:
        """The ZooKeeper session claims are made under (None in standalone mode)."""
        return None

    def _running_elsewhere(self, task_id: str) -> bool:
        """Whether a run of this task that its previous owner started is still going (a task
        that moved while a run finished there): ``forbid`` holds across agents too."""
        run_id = self._foreign_runs.get(task_id)
        if run_id is None:
            return False
        try:
            if self.store.get_run(run_id)["status"] in RUNNING_STATUSES:
                return True
        except CloudTaskError:
            return False  # gone (or unreadable): do not block the task on it
        del self._foreign_runs[task_id]
        return False

    def _claim_and_start(self, claims: list[_Claim], now: datetime) -> None:
        if not self.may_claim():
            # fenced: claim nothing; the fires wait (within their grace) for the lease to return
            self._keep_unclaimed(claims, now, CloudTaskError("not in contact with ZooKeeper"))
            return
        claims = [c for c in claims if self._take_keepalive_lease(c, now)]
        try:
            won = self.store.claim_runs([c.doc for c in claims])
        except StoreError as e:
            self._keep_unclaimed(claims, now, e)
            return
        for claim, ok in zip(claims, won, strict=True):
            fire, spec, doc = claim.fire, claim.spec, claim.doc
            if not ok:
                log.debug("fire %s of %s claimed elsewhere", doc["scheduled_for"], spec.name)
                if spec.schedule.keepalive:
                    self._release_keepalive_lease(doc["_id"])
                    self.scheduler.keepalive_not_started(fire.task_id, now)
                continue
            if doc["status"] != "queued":
                log.info(
                    "task %s fire %s recorded %s", spec.name, doc["scheduled_for"], doc["status"]
                )
                continue
            if spec.concurrency == "replace":
                self.executor.kill_task(fire.task_id, f"replaced by run {doc['_id']}")
            self.executor.submit(
                RunContext(
                    run_id=doc["_id"],
                    task_id=fire.task_id,
                    revision=claim.revision,
                    spec=spec,
                    scheduled_for=doc["scheduled_for"],
                    attempt=fire.attempt,
                    trigger=fire.trigger,
                    token=claim.token,
                    agent=self.agent_id,
                ),
                doc,
            )

    def _keep_unclaimed(self, claims: list[_Claim], now: datetime, error: Exception) -> None:
        keep = []
        for claim in claims:
            if claim.fire.task_id not in self._specs:
                continue
            if now - claim.fire.scheduled_for <= timedelta(seconds=claim.spec.misfire_grace):
                keep.append(claim)
                continue
            log.error(
                "fire %s of task %s could not be claimed within its misfire grace; dropped",
                claim.fire.scheduled_for,
                claim.spec.name,
            )
            if claim.spec.schedule.keepalive:
                self.scheduler.keepalive_not_started(claim.fire.task_id, now)
        log.warning("cannot claim %d fires yet (%s); will retry", len(keep), error)
        self._unclaimed = keep + self._unclaimed

    # --- keepalive leases: one instance in the whole cluster ------------------------------

    def _take_keepalive_lease(self, claim: _Claim, now: datetime) -> bool:
        """A keepalive instance runs only while its run holds the task's lease in MongoDB.

        Fires of other tasks pass. A keepalive fire whose lease is held elsewhere is tried
        again a third of a lease later, without counting as a restart.
        """
        if not claim.spec.schedule.keepalive or claim.doc["status"] != "queued":
            return True
        run_id = claim.doc["_id"]
        if run_id in self._leases:
            return True  # taken on an earlier try of this claim
        try:
            held = self.store.acquire_lease(lease_name(claim.fire.task_id), run_id, LEASE_TTL, now)
        except StoreError as e:
            log.warning("cannot take the keepalive lease of %s yet: %s", claim.spec.name, e)
            held = False
        if not held:
            self.scheduler.keepalive_retry_at(
                claim.fire.task_id, now + timedelta(seconds=LEASE_TTL / 3)
            )
            return False
        self._leases[run_id] = (claim.fire.task_id, time.monotonic())
        return True

    def _release_keepalive_lease(self, run_id: str) -> None:
        held = self._leases.pop(run_id, None)
        if held is None:
            return
        try:
            self.store.release_lease(lease_name(held[0]), run_id)
        except StoreError as e:
            log.warning("cannot release the keepalive lease of run %s (it expires): %s", run_id, e)

    def _renew_leases(self, now: datetime) -> None:
        """Renew held leases every third of their life; end an instance whose lease is gone.

        An instance is ended when its lease was taken over, or could not be renewed for nearly
        its whole life (MongoDB unreachable): by then another agent may take it, and two
        instances must never run at once.
        """
        mono = time.monotonic()
        for run_id, (task_id, renewed) in list(self._leases.items()):
            if mono - renewed < LEASE_TTL / 3:
                continue
            try:
                ok = self.store.renew_lease(lease_name(task_id), run_id, LEASE_TTL, now)
            except StoreError as e:
                ok = mono - renewed < LEASE_TTL - LEASE_MARGIN
                log.warning("cannot renew the keepalive lease of run %s: %s", run_id, e)
                if ok:
                    continue
            if ok:
                self._leases[run_id] = (task_id, mono)
                continue
            log.error("run %s lost its keepalive lease; ending it", run_id)
            self._leases.pop(run_id, None)
            self.executor.kill(run_id, "lost its keepalive lease")

    def _finished(self, ctx: RunContext) -> None:
        """After a run: retries, keepalive restarts, one-shot tasks marked done."""
        spec = ctx.spec
        finished = ctx.finished_at or self.clock()
        if ctx.trigger == "manual":
            pass  # a manual run is one run: no retry, no restart, a one-shot task stays due
        elif spec.schedule.keepalive:
            self._release_keepalive_lease(ctx.run_id)
            if not self._stop.is_set():  # restarted unless the task was dropped meanwhile
                self.scheduler.keepalive_exited(ctx.task_id, ctx.started_at or finished, finished)
        elif ctx.status in ("failed", "timed_out") and ctx.attempt < spec.retries:
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
            self.store.mark_tasks_done(done, now)
        except StoreError as e:
            log.warning("cannot mark %d one-shot tasks done yet: %s", len(done), e)
            with self._done_lock:
                self._done = done + self._done

    # --- lifecycle --------------------------------------------------------------------------

    def recover(self, now: datetime) -> None:
        """Clean up after an earlier life of this agent that did not stop cleanly.

        Its runs cannot be finished by anyone: their processes (found by the agent id in their
        environment) are ended, and their run documents, still ``queued`` or ``running``, are
        marked ``lost``. Agent ids must be unique (the cluster enforces it through ZooKeeper).
        """
        leftovers = orphans_of_agent(self.agent_id)
        if leftovers:
            log.warning("ending %d processes left by an earlier run of this agent", len(leftovers))
            end_processes(leftovers, self.config.agent.kill_grace)
        lost = self.store.mark_runs_lost(
            {"agent": self.agent_id, "claimed_at": {"$lt": now}},
            "the agent stopped without finishing this run",
            now,
            free_leases=True,  # its processes were ended just above
        )
        if lost:
            log.warning("marked %d runs of an earlier run of this agent lost", len(lost))

    def run(self) -> None:
        """Schedule until :meth:`stop`; then stop runs gracefully and flush every write."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.recover(self.clock())
        except CloudTaskError as e:
            log.warning("cannot check for runs left by an earlier start: %s", e)
        self.writer.start()
        self.janitor.start()
        log.info("agent %s (group %s) started; logs in %s", self.agent_id, self.group, self.log_dir)
        poll = timedelta(seconds=self.config.agent.poll_interval)
        try:
            while not self._stop.is_set():
                now = self.clock()
                if self._sync_due(now, poll):
                    try:
                        self.sync_tasks(now)
                    except CloudTaskError as e:
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
                if self._last_sync is not None:
                    until_sync = (self._last_sync + poll - self.clock()).total_seconds()
                    delay = min(delay, max(until_sync, 0.0))
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            self._leaving()
            self.executor.shutdown(grace=self.config.agent.kill_grace)
            self._mark_done(self.clock())
            self.janitor.stop()
            self.writer.stop()
            self._left()
            log.info("agent %s stopped", self.agent_id)

    def _purge_runs(self) -> None:
        """A standalone agent deletes runs past their retention, hourly (in a cluster the
        leading center does it)."""
        if time.monotonic() - self._purged_at < PURGE_INTERVAL:
            return
        self._purged_at = time.monotonic()
        try:
            self.store.purge_runs()
        except CloudTaskError as e:
            log.warning("cannot delete old runs: %s", e)

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler: only sets flags)."""
        self._stop.set()
        self._wake.set()

    def _leaving(self) -> None:
        """Called first when the loop ends, before runs are given their grace."""

    def _left(self) -> None:
        """Called last, when every run has ended and every write is done."""

    def drop_all(self) -> None:
        """Forget every task (a lost session: the leader gives them to others)."""
        for task_id in list(self._specs):
            self._drop(task_id)
        self._bad_specs.clear()
        self._unclaimed = []
