"""An agent's earlier life: what it left behind when it did not stop cleanly, settled at start.

A restarted agent (the same id, see identity.py) first ends the processes its earlier life
left (found by the agent id in their environment): nobody can finish those runs; and the
containers of its container tasks (labelled with its agent id, see container.py), when a
Docker engine is configured or found. Then its
runs still ``queued`` or ``running`` in MongoDB, and the ones the leader has marked ``lost``
meanwhile, get what the run journal knows about them (see journal.py, :meth:`Earlier.verdict`):

- **ended**: the outcome they really had;
- **never started** (claimed, not started): released, so the task's owner runs it as a
  catch-up or records it missed (``Store.pending_runs``, see manual.py);
- **unknown**: ``lost``.

Their keepalive leases are freed (their processes are gone), and the earlier lives' journal
segments are deleted once all this is stored. Until it is (MongoDB does not answer), the agent
tries again at every step.

A claim of the earlier life that was not stored at recovery may still land: a write held in
the network, or by a frozen server, can reach MongoDB after its writer died, and would then
stay ``running`` under a dead session until the leader called it ``lost``. For
``LATE_CLAIM_WATCH`` seconds the agent looks for those, every ``LATE_CLAIM_LOOK`` seconds,
and releases each one that lands, like the earlier life's other claims that never started.

Example::

    earlier = EarlierLife(store, journal, "a1", kill_grace=5.0)
    earlier.recover(now)  # raises StoreError or PyMongoError: try again later
    if earlier.watching:
        earlier.release_late_claims()  # at each step
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

import pymongo

from ..runmodel import RUNNING_STATUSES, lost_fields, released_fields
from ..store import Store
from .budget import CALL_BUDGET, STORE_ERRORS
from .container import remove_agent_containers
from .journal import Journal, end_fields
from .proctree import end_processes, orphans_of_agent

log = logging.getLogger(__name__)

LATE_CLAIM_WATCH = 120.0  # seconds the late claims of an earlier life are looked for
LATE_CLAIM_LOOK = 3.0  # seconds between two looks
# why a claim of an earlier life that never started is released
STOPPED_BEFORE_START = "its agent stopped before starting it"


class EarlierLife:
    def __init__(
        self,
        store: Store,
        journal: Journal,
        agent_id: str,
        *,
        kill_grace: float,
        docker_host: str = "",
    ) -> None:
        self.store = store
        self.journal = journal
        self.agent_id = agent_id
        self.kill_grace = kill_grace
        self.docker_host = docker_host
        self._containers_removed = False
        # an earlier life's claims, never started, not stored at recovery: id set, watch end
        self._late_claims: tuple[set[str], float] | None = None
        self._late_looked = 0.0

    @property
    def watching(self) -> bool:
        """Whether late claims of an earlier life are still looked for."""
        return self._late_claims is not None

    def recover(self, now: datetime) -> None:
        """End the earlier life's processes and settle its runs (see the module docstring).
        Agent ids must be unique (the cluster enforces it through ZooKeeper). Raises
        StoreError or PyMongoError when MongoDB does not answer."""
        leftovers = orphans_of_agent(self.agent_id)
        if leftovers:
            log.warning("ending %d processes left by an earlier run of this agent", len(leftovers))
            end_processes(leftovers, self.kill_grace)
        if not self._containers_removed:  # (once: recover is tried again while MongoDB fails)
            remove_agent_containers(self.agent_id, self.docker_host)
            self._containers_removed = True
        # read after the leftovers are gone: their guard notes how they ended
        earlier = self.journal.read_earlier()
        known = earlier.claimed | earlier.started | set(earlier.ended)
        with pymongo.timeout(CALL_BUDGET * 5):
            docs = self.store.left_runs(self.agent_id, self.journal.own_claims(), known, now)
            counts: dict[str, int] = {}
            for doc in docs:
                verdict, state = earlier.verdict(doc["_id"])
                if verdict == "ended":
                    doc.update(end_fields(state or {}))
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

    def release_late_claims(self) -> None:
        """Look for the earlier life's late claims (at most every ``LATE_CLAIM_LOOK``) and
        release each one that landed; stop looking once all are found or the watch is over."""
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
