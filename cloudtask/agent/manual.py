"""Runs that wait for an agent: manual runs ("run now") and claims the leader released.

Both are stored ``queued`` with no agent (``Store.pending_runs``). An agent looks for those
of its group every ``poll_interval``, and at once when told to (:meth:`WaitingRuns.signal`:
a task came to it, or the cluster bumped ``/signals/runs``), and only while it may claim (its
fence holds). It takes one by a conditional write that only one agent can win
(``Store.take_pending_run``), journaled as a claim first like every claim, so that a restart
can tell whether it started; then the agent starts it like a fire it claimed.

- **A manual run** is taken by the agent that runs its task, or, for a paused or finished
  task (which no agent owns), by whichever agent of the group comes first; a live task another
  agent owns is left to that agent, and a deleted task's run waits until someone cancels it. A
  manual run is one run: ``forbid`` records it ``skipped`` while a run of its task is going
  (here or on the task's former owner), ``replace`` ends that run first.
- **A released claim** (its agent left before starting it) is taken only by the task's owner
  (for mode ``all``, by the agent of its slot). One not due yet (claimed ahead, armed.py) is
  taken as ``claimed`` and started here at its time. One due is run like a late fire: on
  time, as a ``catch-up`` within ``misfire_grace`` with ``run_once``, or else recorded
  ``missed``, and one is recorded ``missed`` too when a newer fire of its task waits, due
  (the rule of a late tick); a keepalive start is recorded ``skipped`` (the service starts
  anew here), and ``forbid`` records it ``skipped`` while a run of its task is going. So a
  fire that never started is not written off.

A run taken that does not start is finished at once with its status and reason.

Example::

    waiting = WaitingRuns(store, journal, writer, agent_id="a1", group="default", ...)
    waiting.signal()  # a run may wait: look at the next step
    waiting.look(now)  # in the agent loop
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

import pymongo

from ..clock import to_bson_time
from ..exceptions import CloudTaskError, ValidationError
from ..store import Store
from ..task import TaskSpec, parse_task
from .budget import CALL_BUDGET, STORE_ERRORS
from .claims import given_ahead, run_tokens, token_hash
from .journal import Journal
from .runwriter import RunWriter

log = logging.getLogger(__name__)

FORBID_SKIP = "the previous run was still running (concurrency: forbid)"

# submit(run document, spec, revision, token, trigger, attempt): the agent starts the run
Submit = Callable[[dict, TaskSpec, int, str, str, int], None]
# arm(run document, spec, revision, token): the agent starts the run at its due time
Arm = Callable[[dict, TaskSpec, int, str], None]


class WaitingRuns:
    def __init__(
        self,
        store: Store,
        journal: Journal,
        writer: RunWriter,
        *,
        agent_id: str,
        group: str,
        poll_interval: float,
        clock: Callable[[], datetime],
        may_claim: Callable[[], bool],
        session: Callable[[], str | None],
        known: Callable[[str], tuple[int, TaskSpec] | None],
        busy: Callable[[str], bool],
        kill_task: Callable[[str, str], object],
        late_verdict: Callable[[TaskSpec, datetime, datetime], str],
        submit: Submit,
        arm: Arm | None = None,
    ) -> None:
        self.store = store
        self.journal = journal
        self.writer = writer
        self.agent_id = agent_id
        self.group = group
        self.poll_interval = poll_interval
        self.clock = clock
        self.may_claim = may_claim  # the agent's fence
        self.session = session  # the session its claims are made under
        self.known = known  # task id -> (revision, spec) of the tasks the agent runs
        self.busy = busy  # whether a run of the task is going, here or on its former owner
        self.kill_task = kill_task  # end the task's runs here (concurrency: replace)
        self.late_verdict = late_verdict  # the scheduler's rule for a late fire
        self.submit = submit
        self.arm = arm
        self._checked: float | None = None  # monotonic time of the last look
        self._signal = threading.Event()

    def signal(self) -> None:
        """A run may wait for this agent: look at the next step, not at the next poll (any
        thread)."""
        self._signal.set()

    def look(self, now: datetime) -> None:
        """Take the runs of our group that wait for an agent, when a look is due or signalled
        and the fence holds. A failure is logged; the next look tries again."""
        checked = self._checked
        due = checked is None or time.monotonic() - checked >= self.poll_interval
        if not (due or self._signal.is_set()) or not self.may_claim():
            return
        self._signal.clear()
        self._checked = time.monotonic()
        try:
            with pymongo.timeout(CALL_BUDGET):
                pending = self.store.pending_runs(self.group)
        except STORE_ERRORS as e:
            log.warning("cannot look for runs waiting for an agent: %s", e)
            return
        newest: dict[tuple[str, str], datetime] = {}  # the newest due fire per task and slot
        for doc in pending:
            late_rule = doc.get("trigger") not in ("manual", "retry", "after", "backfill")
            if not late_rule or doc["scheduled_for"] > now:
                continue
            key, at = (doc["task_id"], doc.get("slot")), doc["scheduled_for"]
            newest[key] = max(newest.get(key, at), at)
        for doc in pending:
            try:
                with pymongo.timeout(CALL_BUDGET):
                    if doc.get("trigger") == "manual":
                        self._take_manual_run(doc)
                    else:
                        newer = newest.get((doc["task_id"], doc.get("slot")))
                        self._take_released_claim(doc, now, newer)
            except STORE_ERRORS as e:
                log.warning("cannot take run %s: %s", doc["_id"], e)

    def _manual_spec(self, task_id: str) -> tuple[int, TaskSpec] | None:
        """The task of a manual run, if this agent is the one to run it."""
        known = self.known(task_id)
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

    def _take(
        self, doc: dict, trigger: str | None = None, status: str | None = None
    ) -> tuple[str, dict | None]:
        """Take the run (journaled as a claim first): its token, and its document once taken
        (None if another agent took it first, or it was cancelled)."""
        token = run_tokens(1)[0]
        self.journal.claimed([doc["_id"]])
        taken = self.store.take_pending_run(
            doc["_id"],
            self.agent_id,
            self.session(),
            token_hash(token),
            trigger=trigger,
            status=status,
        )
        return token, taken

    def _finish_unstarted(self, doc: dict, status: str, reason: str) -> None:
        self.writer.finish_unstarted(doc, status, reason, to_bson_time(self.clock()))

    def _take_manual_run(self, doc: dict) -> None:
        known = self._manual_spec(doc["task_id"])
        if known is None:
            return
        revision, spec = known
        token, taken = self._take(doc)
        if taken is None:
            return  # another agent took it, or it was cancelled
        task_id = doc["task_id"]
        busy = self.busy(task_id)
        if spec.concurrency == "forbid" and busy:
            self._finish_unstarted(taken, "skipped", FORBID_SKIP)
            log.info("manual run %s of %s skipped: a run is going", doc["_id"], spec.name)
            return
        if spec.concurrency == "replace":
            self.kill_task(task_id, f"replaced by run {doc['_id']}")
        log.info(
            "manual run %s of %s taken (asked by %s)",
            doc["_id"],
            spec.name,
            doc.get("requested_by"),
        )
        self.submit(taken, spec, revision, token, "manual", 0)

    def _take_released_claim(self, doc: dict, now: datetime, newest: datetime | None) -> None:
        """A claim its agent left before starting it: the task's owner starts it at its time
        when it is not due yet, else runs it like a late fire (see the module docstring).
        ``newest``: the newest due fire of its task among the runs waiting."""
        known = self.known(doc["task_id"])
        if known is None or doc.get("slot") not in ("one", self.agent_id):
            return  # not ours: the task's owner takes it
        revision, spec = known
        trigger = doc.get("trigger") or "schedule"
        if trigger == "backfill" and spec.concurrency == "forbid" and self.busy(doc["task_id"]):
            return  # a backfill runs its fires one after the other: this one waits its turn
        if self.arm is not None and given_ahead(trigger, doc["scheduled_for"], spec, now):
            token, taken = self._take(doc, status="claimed")
            if taken is not None:
                log.info(
                    "took over fire %s of %s (released by %s before it was due)",
                    doc["scheduled_for"],
                    spec.name,
                    doc.get("released_by"),
                )
                self.arm(taken, spec, revision, token)
            return
        outcome = None
        if spec.schedule.keepalive:
            outcome = ("skipped", "a keepalive start its agent left; the service starts here anew")
        elif trigger not in ("retry", "after", "backfill"):  # (these are due when queued)
            verdict = self.late_verdict(spec, doc["scheduled_for"], now)
            released = f"released by {doc.get('released_by')}"
            if verdict != "missed" and newest is not None and doc["scheduled_for"] < newest:
                # the rule of a late tick: only the newest is caught up
                outcome = ("missed", f"{released}; a newer fire of the task waited too")
            elif verdict == "catch-up":
                trigger = "catch-up"
            elif verdict == "missed":
                outcome = ("missed", f"{released}; too late to run")
        token, taken = self._take(doc, trigger=trigger)
        if taken is None:
            return
        task_id = doc["task_id"]
        busy = self.busy(task_id)
        if outcome is None and spec.concurrency == "forbid" and busy and trigger != "retry":
            outcome = ("skipped", FORBID_SKIP)
        if outcome is not None:
            self._finish_unstarted(taken, *outcome)
            return
        log.info(
            "took over fire %s of %s (released by %s, never started)",
            doc["scheduled_for"],
            spec.name,
            doc.get("released_by"),
        )
        self.submit(taken, spec, revision, token, trigger, taken.get("attempt", 0))
