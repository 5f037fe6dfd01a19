"""Plan items, taken by an agent with free slots (see cloudtask/store/plans.py).

Items wait ``queued`` in MongoDB, per type (the agent group). An agent takes them only while
it has free slots (``max_parallel`` less the runs it has), as many as it has free, by
priority, then by age (within the 32 or so items one query reads, in a random order, so
that agents reading at once mostly try different ones; a slot freed within a second takes
the next of them without another query), each by the one conditional write only one agent
can win (``Store.take_pending_run``), journaled as a claim first like every claim. So an agent never
takes more than it can start at once, a busy agent leaves items to idle ones, and an item
runs once per attempt. This is pull, not push: the leader does not hand items out, every
free agent asks; an agent looks when a slot frees (a run of it ended), when the cluster
bumps ``/signals/runs`` (a plan was submitted), and every ``poll_interval`` otherwise (every
ten while no item waited at its last look).

An attempt that ends ``failed``, ``timed_out`` (or, judged by the leader, ``lost``) with
attempts left is followed by the next attempt, queued for any agent of the type
(``Store.follow_item``): written here once the attempt's final state is stored, and by the
leader's upkeep when this agent died first.

Example::

    queue = PlanQueue(store, journal, writer, agent_id="a1", group="etl", ...)
    queue.signal()  # a slot freed or a plan came: look at the next step
    queue.look(now)  # in the agent loop
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pymongo

from ..clock import to_bson_time
from ..exceptions import NotFound, ValidationError
from ..store import Store
from ..task import TaskSpec
from .budget import CALL_BUDGET, STORE_ERRORS
from .claims import run_tokens, token_hash
from .journal import Journal
from .runwriter import RunWriter

log = logging.getLogger(__name__)

# submit(run document, spec, revision, token, trigger, attempt): the agent starts the run
Submit = Callable[[dict, TaskSpec, int, str, str, int], None]
SPEC_CACHE = 4096  # item specs kept (an item's attempts share one)
CANDIDATES = 32  # items read per query at least
IDLE_POLLS = 10  # poll intervals between two looks while no item waited
CANDIDATES_FOR = 1.0  # seconds the items a query found are taken from without a new query


def _spread(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items found, in their order of priority, each priority's items shuffled: the
    agents that read the same first items at once then mostly try different ones (a lost
    race costs a write), and an item still goes before every lower priority."""
    out: list[dict[str, Any]] = []
    for _, same in itertools.groupby(found, key=lambda d: d.get("priority", 0)):
        group = list(same)
        random.shuffle(group)
        out.extend(group)
    return out


class PlanQueue:
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
        free_slots: Callable[[], int],
        submit: Submit,
    ) -> None:
        self.store = store
        self.journal = journal
        self.writer = writer
        self.agent_id = agent_id
        self.group = group
        self.poll_interval = poll_interval
        self.clock = clock
        self.may_claim = may_claim
        self.session = session
        self.free_slots = free_slots
        self.submit = submit
        self._checked: float | None = None
        self._signal = threading.Event()
        self._items_seen = False  # whether the last look found items waiting
        # the items the last query found and this agent has not tried yet: a slot that
        # frees within CANDIDATES_FOR seconds takes the next of them without a query
        self._candidates: list[dict[str, Any]] = []
        self._candidates_at = 0.0
        self._specs: dict[str, TaskSpec] = {}
        self._ended: list[str] = []  # attempts that ended here and may need a follow-up
        self._ended_lock = threading.Lock()

    def signal(self) -> None:
        """A slot freed, or items may wait: look at the next step (any thread)."""
        self._signal.set()

    def ended(self, run_id: str, status: str) -> None:
        """An attempt ended here (any thread): followed up once its final state is stored;
        its slot is free."""
        from ..store.plans import RETRIED_STATUSES

        if status in (*RETRIED_STATUSES, "killed"):  # (killed: maybe with its agent's end)
            with self._ended_lock:
                self._ended.append(run_id)
        self._signal.set()

    def slot_freed(self) -> None:
        """Another run ended (any thread): look at once only if items were waiting at the
        last look (an agent of a type with no plans does not ask after every run)."""
        if self._items_seen:
            self._signal.set()

    def look(self, now: datetime) -> None:
        """Follow up ended attempts, then take as many due items as there are free slots."""
        checked = self._checked
        # while no item waited at the last look, the poll is IDLE_POLLS times slower: a
        # submitted plan signals the agents at once (/signals/runs), and an agent of a type
        # without plans should not query the store every poll (nor hold it up: the embedded
        # server answers one query at a time)
        every = self.poll_interval * (1 if self._items_seen else IDLE_POLLS)
        due = checked is None or time.monotonic() - checked >= every
        if not (due or self._signal.is_set()):
            return
        self._signal.clear()
        self._checked = time.monotonic()
        self._follow_up()
        if not self.may_claim():
            return
        free = self.free_slots()
        if free <= 0:
            return
        taken = self._take_from(self._candidates, free) if self._fresh() else 0
        if taken < free:
            try:
                with pymongo.timeout(CALL_BUDGET):
                    found = self.store.queued_items(
                        self.group, now, limit=max(2 * free + 8, CANDIDATES)
                    )
            except STORE_ERRORS as e:
                log.warning("cannot look for plan items: %s", e)
                return
            self._items_seen = bool(found)
            self._candidates = _spread(found)
            self._candidates_at = time.monotonic()
            taken += self._take_from(self._candidates, free - taken)
        if taken and self._candidates:
            self._signal.set()  # more may wait (and other agents took some of these)

    def _fresh(self) -> bool:
        return bool(self._candidates) and (time.monotonic() - self._candidates_at < CANDIDATES_FOR)

    def _take_from(self, candidates: list[dict[str, Any]], want: int) -> int:
        """Take up to ``want`` of ``candidates`` (each tried once: taken here, by another
        agent, or cancelled, it leaves the list)."""
        taken = 0
        while candidates and taken < want and self.may_claim():
            doc = candidates.pop(0)
            try:
                with pymongo.timeout(CALL_BUDGET):
                    if self._take(doc):
                        taken += 1
            except STORE_ERRORS as e:
                log.warning("cannot take plan item %s: %s", doc["_id"], e)
                candidates.clear()
                break
        return taken

    def _spec(self, doc: dict[str, Any]) -> TaskSpec:
        spec = self._specs.get(doc["task_id"])
        if spec is None:
            from ..plans import item_task_spec

            spec = item_task_spec(doc["item"])
            if len(self._specs) >= SPEC_CACHE:
                self._specs.clear()
            self._specs[doc["task_id"]] = spec
        return spec

    def _take(self, doc: dict[str, Any]) -> bool:
        """Take one attempt and hand it over; whether it was ours to start."""
        token = run_tokens(1)[0]
        self.journal.claimed([doc["_id"]])
        taken = self.store.take_pending_run(
            doc["_id"], self.agent_id, self.session(), token_hash(token)
        )
        if taken is None:
            return False  # another agent took it, or it was cancelled
        try:
            spec = self._spec(taken)
        except (ValidationError, KeyError, TypeError) as e:  # stored by an older version?
            self.writer.finish_unstarted(
                taken, "failed", f"the item cannot be read: {e}", to_bson_time(self.clock())
            )
            return False
        log.info(
            "took plan item %s (%s, attempt %d) of plan %s",
            taken["task_id"],
            spec.name,
            taken["attempt"],
            taken.get("plan_id"),
        )
        self.submit(taken, spec, 0, token, "plan", taken["attempt"])
        return True

    def _follow_up(self) -> None:
        """Attempts that ended here and are stored: their next attempt, if due."""
        with self._ended_lock:
            ended, self._ended = self._ended, []
        later = []
        for run_id in ended:
            if self.writer.keeps(run_id):  # the final state is not stored yet
                later.append(run_id)
                continue
            try:
                with pymongo.timeout(CALL_BUDGET):
                    doc = self.store.get_run(run_id)
                    if not doc.get("followed"):
                        self.store.follow_item(doc, self.clock())
            except NotFound:
                continue
            except STORE_ERRORS as e:  # the leader's upkeep follows it up if this agent dies
                log.warning("cannot queue the next attempt after %s yet: %s", run_id, e)
                later.append(run_id)
        if later:
            with self._ended_lock:
                self._ended[:0] = later
