"""A task that comes to this agent process: what its history says, and the runs another
agent may still be finishing.

Nothing about a task is in memory when it comes to an agent process (a new owner, or the
agent restarted). Its history in MongoDB says (:func:`read_histories`, for many tasks at
once: a start with 10,000 tasks reads them in a few calls):

- up to when its fires were handled: its latest recorded fire (any agent, any status, a
  claim made ahead too), or when it was created or last changed, whichever is later. Fires
  after that which are due now were missed (an agent died, or none ran the task) and are
  caught up or recorded per its policy. Every fire before the latest recorded one is
  recorded because agents write a task's claims in time order (claims.collapse): a claim
  made ahead is never stored before an earlier fire of its task. A mode ``all`` task's
  history is this agent's own slot: an agent's history starts when it first ran the task,
  so a new agent misses nothing;
- the retries still owed: recent runs that failed (or were lost) with attempts left and no
  next attempt (their agent died or stopped before retrying), within ``misfire_grace``.

Its former owner may still be finishing runs of it (:class:`ForeignRuns`): ``forbid`` holds
across agents (a fire is not started while one of those runs), and their retries, if they
fail, are made here. For a session length after a task came here its former owner may not
have seen the move (it was cut off from ZooKeeper) and may still start runs; and while this
agent has not heard from ZooKeeper for a while, it may itself be that former owner. Then each
claim of a ``forbid`` task is checked, once written, against the other agents' unfinished
runs of the task (:meth:`ForeignRuns.busy`): both claims are written before either check
reads, so at least one of the two agents sees the other's, and of two that see each other the
older fire runs.

Example::

    histories = read_histories(store, [Arrival(task_id, spec, slot, changed_at)], now)
    since, retries = histories[task_id]
    foreign.note([task_id])  # runs another agent is finishing
    foreign.came(task_id)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pymongo

from ..runmodel import RETRY_STATUSES, RUNNING_STATUSES
from ..store import Store
from ..task import TaskSpec
from .budget import CALL_BUDGET, STORE_ERRORS
from .claims import Claim

log = logging.getLogger(__name__)

# a retry owed: (scheduled_for, attempt, due)
Retry = tuple[datetime, int, datetime]


HISTORY_BATCH = 500  # tasks whose latest fires are read in one call


@dataclass(frozen=True)
class Arrival:
    """A task that comes to this agent process: its id, spec, slot (``one``, or the agent's id
    for a mode ``all`` task) and when it was created or last changed."""

    task_id: str
    spec: TaskSpec
    slot: str
    changed_at: datetime | str | None


def read_histories(
    store: Store, arrivals: Sequence[Arrival], now: datetime
) -> dict[str, tuple[datetime, list[Retry]]]:
    """What their histories say of tasks that come to this agent process: task id -> (since
    when its fires were handled, the retries still owed); see the module docstring. The
    latest fires are read in one call per slot and ``HISTORY_BATCH`` tasks; owed retries
    only for tasks that retry and have run. Raises StoreError or PyMongoError when they
    cannot be read."""
    last: dict[str, datetime] = {}
    by_slot: dict[str, list[str]] = {}
    for arrival in arrivals:
        by_slot.setdefault(arrival.slot, []).append(arrival.task_id)
    with pymongo.timeout(CALL_BUDGET):
        for slot, task_ids in by_slot.items():
            for i in range(0, len(task_ids), HISTORY_BATCH):
                last.update(store.last_fires(task_ids[i : i + HISTORY_BATCH], slot))
    out: dict[str, tuple[datetime, list[Retry]]] = {}
    for arrival in arrivals:
        spec, latest = arrival.spec, last.get(arrival.task_id)
        since = _changed_at(arrival.changed_at) or now
        if latest is None:
            out[arrival.task_id] = (now if spec.mode == "all" else since), []
            continue
        retries = []
        if spec.retries:
            horizon = now - timedelta(seconds=spec.misfire_grace)
            with pymongo.timeout(CALL_BUDGET):
                owed = store.owed_retries(
                    arrival.task_id, arrival.slot, spec.retries, horizon, RETRY_STATUSES
                )
            for run in owed:
                finished = run.get("finished_at")
                finished = finished if isinstance(finished, datetime) else now
                due = max(now, finished + timedelta(seconds=spec.retry_delay))
                retries.append((run["scheduled_for"], run["attempt"] + 1, due))
        out[arrival.task_id] = max(since, latest), retries
    return out


def _changed_at(value: datetime | str | None) -> datetime | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if isinstance(value, datetime) else None


class ForeignRuns:
    """Runs of this agent's tasks that other agents started and may still be finishing."""

    def __init__(
        self,
        store: Store,
        agent_id: str,
        *,
        poll_interval: float,
        spec_of: Callable[[str], TaskSpec | None],
        retry: Callable[[str, datetime, int, datetime], None],
    ) -> None:
        self.store = store
        self.agent_id = agent_id
        self.poll_interval = poll_interval
        self.spec_of = spec_of  # the spec of a task the agent runs, else None
        self.retry = retry  # retry(task_id, scheduled_for, attempt, due): scheduled here
        # task id -> {run id: (scheduled_for, attempt)}
        self._runs: dict[str, dict[str, tuple[datetime, int]]] = {}
        self._came: dict[str, float] = {}  # task id -> monotonic time it was scheduled here
        self._checked = 0.0
        # the loop, the start timer (a due claim's check) and the executor's threads use these
        self._lock = threading.Lock()

    # --- the task set -----------------------------------------------------------------------

    def note(self, task_ids: Sequence[str]) -> None:
        """Tasks came here: the runs of them that another agent started and may be finishing,
        read ``HISTORY_BATCH`` tasks a call (raises StoreError or PyMongoError when they
        cannot be read)."""
        for i in range(0, len(task_ids), HISTORY_BATCH):
            batch = list(task_ids[i : i + HISTORY_BATCH])
            found = self.elsewhere(batch)
            with self._lock:
                for task_id in batch:
                    self._runs.pop(task_id, None)
                for d in found:
                    self._runs.setdefault(d["task_id"], {})[d["_id"]] = (
                        d["scheduled_for"],
                        d["attempt"],
                    )

    def came(self, task_id: str) -> None:
        """The task is scheduled here from now on."""
        with self._lock:
            self._came[task_id] = time.monotonic()

    def forget(self, task_id: str) -> None:
        """The task left this agent."""
        with self._lock:
            self._came.pop(task_id, None)
            self._runs.pop(task_id, None)

    def forget_run(self, task_id: str, run_id: str) -> None:
        """A run noted as its previous owner's is this agent's now (a claim it released,
        taken here): it holds nothing up."""
        with self._lock:
            runs = self._runs.get(task_id)
            if runs is not None and runs.pop(run_id, None) is not None and not runs:
                self._runs.pop(task_id, None)

    # --- claims -----------------------------------------------------------------------------

    def running(self, task_id: str) -> bool:
        """Whether a run of this task that its previous owner started is still going (a task
        that moved while a run finished there): ``forbid`` holds across agents too."""
        with self._lock:
            return bool(self._runs.get(task_id))

    def elsewhere(self, task_ids: list[str]) -> list[dict]:
        """The unfinished scheduled runs of these tasks (slot ``one``) that other agents hold
        (a manual run is one run and holds nothing up)."""
        with pymongo.timeout(CALL_BUDGET):
            found = self.store.unfinished_runs({"task_id": {"$in": task_ids}, "slot": "one"})
        return [
            d
            for d in found
            if d.get("agent") not in (None, self.agent_id) and d.get("trigger") != "manual"
        ]

    def checks(self, spec: TaskSpec, task_id: str, window: float, stale: bool) -> bool:
        """Whether a run of ``task_id`` about to start is checked against the other agents'
        runs (see :meth:`busy`)."""
        return (
            spec.concurrency == "forbid"
            and spec.mode == "one"
            and not spec.schedule.keepalive
            and (stale or time.monotonic() - self._came.get(task_id, -window) < window)
        )

    def busy(
        self, claims: list[Claim], won: list[bool], window: float, stale: bool
    ) -> dict[str, str]:
        """``forbid`` across agents while two may both think a task is theirs (see the module
        docstring): for ``window`` seconds after a task came here, or while this agent's view
        may be ``stale``, each claim won of a ``forbid`` task is checked against the other
        agents' unfinished runs of the task. Returns run id -> why it does not start."""
        mine: dict[str, dict] = {}
        for claim, ok in zip(claims, won, strict=True):
            doc, spec = claim.doc, claim.spec
            if (
                ok
                and doc["status"] in RUNNING_STATUSES
                and claim.fire.trigger != "retry"
                and self.checks(spec, claim.fire.task_id, window, stale)
            ):
                mine[doc["_id"]] = doc
        if not mine:
            return {}
        task_ids = sorted({d["task_id"] for d in mine.values()})
        try:
            found = self.elsewhere(task_ids)
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
                    with self._lock:
                        self._runs.setdefault(doc["task_id"], {})[other["_id"]] = (
                            other["scheduled_for"],
                            other["attempt"],
                        )
                    break
        return out

    # --- the agent loop ---------------------------------------------------------------------

    def check(self, now: datetime) -> None:
        """Every ``poll_interval``: which of these runs are over. One that failed (or was
        lost) with attempts left is retried here: retries owed by a run in flight survive a
        move or a stop of its agent."""
        with self._lock:
            if not self._runs or time.monotonic() - self._checked < self.poll_interval:
                return
            self._checked = time.monotonic()
            asked = {r for runs in self._runs.values() for r in runs}
        try:
            with pymongo.timeout(CALL_BUDGET):
                states = self.store.run_states(sorted(asked))
        except STORE_ERRORS as e:
            log.debug("cannot check runs finishing elsewhere: %s", e)
            return
        over: list[tuple[str, str, datetime, int]] = []
        with self._lock:
            for task_id, runs in list(self._runs.items()):
                for run_id in [r for r in runs if r in asked]:  # (not one noted since)
                    state = states.get(run_id)
                    going = state is not None and state["status"] in RUNNING_STATUSES
                    if going and state.get("agent") not in (None, self.agent_id):
                        continue  # still its previous owner's
                    scheduled_for, attempt = runs.pop(run_id)
                    if not going and state is not None:  # (going: released, or taken here)
                        over.append((task_id, run_id, scheduled_for, attempt))
                if not runs:
                    del self._runs[task_id]
        for task_id, run_id, scheduled_for, attempt in over:
            state, spec = states[run_id], self.spec_of(task_id)
            if spec is None:
                continue
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
                self.retry(task_id, scheduled_for, attempt + 1, due)
