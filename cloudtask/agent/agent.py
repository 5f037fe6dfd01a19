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
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from ..config import Config
from ..exceptions import CloudTaskError, StoreError, ValidationError
from ..store import Store, new_run_document, utcnow
from ..task import TaskSpec, parse_task
from .executor import Executor, RunContext
from .files import FileCache
from .logfiles import LogJanitor
from .proctree import end_processes, orphans_of_agent
from .runwriter import RunWriter
from .scheduler import Fire, Scheduler

log = logging.getLogger(__name__)

CLAIM_CHUNK = 250
TOKEN_BYTES = 24  # per-run token: 192 random bits  # fires claimed per round trip; a burst starts running after the first chunk


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
        self._unclaimed: list[Fire] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_sync: datetime | None = None
        self._bad_specs: dict[str, int] = {}

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

    def _known_revision(self, task_id: str) -> int | None:
        if task_id in self._specs:
            return self._specs[task_id][0]
        return self._bad_specs.get(task_id)

    def _take(self, doc: dict, now: datetime) -> None:
        task_id, revision = doc["_id"], doc["revision"]
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
        self._specs[task_id] = (revision, spec)
        self.scheduler.upsert(task_id, spec, revision, now)
        log.info("task %s (%s) revision %s scheduled", spec.name, task_id, revision)

    def _drop(self, task_id: str) -> None:
        self._specs.pop(task_id, None)
        if self.scheduler.remove(task_id):
            log.info("task %s unscheduled", task_id)

    # --- firing -----------------------------------------------------------------------------

    def step(self, now: datetime) -> float:
        """One pass: claim and start what is due at ``now``. Returns seconds until the next fire."""
        fires, delay = self.scheduler.tick(now)
        if self._unclaimed:
            fires = self._unclaimed + fires
            self._unclaimed = []
        if fires:
            self.dispatch(fires, now)
        return delay

    def dispatch(self, fires: list[Fire], now: datetime) -> None:
        """Claim fires and start the ones won, in chunks so the first runs start at once."""
        for i in range(0, len(fires), CLAIM_CHUNK):
            self._dispatch_chunk(fires[i : i + CLAIM_CHUNK], now)

    def _dispatch_chunk(self, fires: list[Fire], now: datetime) -> None:
        docs, contexts = [], []
        # one read of the system's randomness for the whole chunk (each read lets busy run
        # threads take the GIL from this loop)
        randomness = secrets.token_bytes(TOKEN_BYTES * len(fires))
        for n, fire in enumerate(fires):
            known = self._specs.get(fire.task_id)
            if known is None:
                continue
            revision, spec = known
            status = fire.status or "queued"
            if (
                status == "queued"
                and spec.concurrency == "forbid"
                and not spec.schedule.keepalive
                and fire.trigger != "retry"
                and self.executor.has_active(fire.task_id)
            ):
                status = "skipped"
            token = base64.urlsafe_b64encode(randomness[n * TOKEN_BYTES : (n + 1) * TOKEN_BYTES])
            token = token.decode().rstrip("=")
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
            )
            if status == "skipped":
                doc["error"] = "the previous run was still running (concurrency: forbid)"
            docs.append(doc)
            contexts.append((fire, spec, revision, token, doc))
        try:
            won = self.store.claim_runs(docs)
        except StoreError as e:
            self._keep_unclaimed([c[0] for c in contexts], now, e)
            return
        for (fire, spec, revision, token, doc), ok in zip(contexts, won, strict=True):
            if not ok:
                log.debug("fire %s of %s claimed elsewhere", doc["scheduled_for"], spec.name)
                if spec.schedule.keepalive:
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
                    revision=revision,
                    spec=spec,
                    scheduled_for=doc["scheduled_for"],
                    attempt=fire.attempt,
                    trigger=fire.trigger,
                    token=token,
                    agent=self.agent_id,
                ),
                doc,
            )

    def _keep_unclaimed(self, fires: list[Fire], now: datetime, error: Exception) -> None:
        keep = []
        for fire in fires:
            known = self._specs.get(fire.task_id)
            if known is None:
                continue
            if now - fire.scheduled_for <= timedelta(seconds=known[1].misfire_grace):
                keep.append(fire)
            else:
                log.error(
                    "fire %s of %s could not be claimed in time; dropped",
                    fire.scheduled_for,
                    fire.task_id,
                )
        log.warning("cannot claim %d fires yet (%s); will retry", len(keep), error)
        self._unclaimed = keep + self._unclaimed

    def _finished(self, ctx: RunContext) -> None:
        """After a run: retries, keepalive restarts, one-shot tasks marked done."""
        spec = ctx.spec
        finished = ctx.finished_at or self.clock()
        if spec.schedule.keepalive:
            if ctx.kill_reason is None or ctx.kill_reason == "timeout":
                self.scheduler.keepalive_exited(ctx.task_id, ctx.started_at or finished, finished)
        elif ctx.status in ("failed", "timed_out") and ctx.attempt < spec.retries:
            due = finished + timedelta(seconds=spec.retry_delay)
            self.scheduler.retry(ctx.task_id, ctx.scheduled_for, ctx.attempt + 1, due)
        elif spec.schedule.is_once:
            try:
                self.store.mark_task_done(ctx.task_id, ctx.revision, finished)
            except StoreError as e:
                log.error("cannot mark one-shot task %s done: %s", spec.name, e)
        self._wake.set()

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
        )
        if lost:
            log.warning("marked %d runs of an earlier run of this agent lost", lost)

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
                if self._last_sync is None or now - self._last_sync >= poll:
                    try:
                        self.sync_tasks(now)
                    except CloudTaskError as e:
                        log.warning("cannot read tasks (keeping the ones I have): %s", e)
                        self._last_sync = now
                delay = self.step(self.clock())
                if self._last_sync is not None:
                    until_sync = (self._last_sync + poll - self.clock()).total_seconds()
                    delay = min(delay, max(until_sync, 0.0))
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            self.executor.shutdown(grace=self.config.agent.kill_grace)
            self.janitor.stop()
            self.writer.stop()
            log.info("agent %s stopped", self.agent_id)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
