"""Keepalive leases: a service runs as one instance in the whole cluster (one per agent for
mode ``all``), and never two at once, even across a frozen or cut-off agent.

A lease is a MongoDB document (``leases/keepalive:<task>``, see :func:`lease_name`) whose
insert is the acquisition. Its holder renews it from a thread of its own (never the agent's
loop, which may wait for a slow call), every ``renew_every`` seconds, each call under a
deadline. The holder's instance must be gone before anyone else could take the lease:

- A taker never judges a lease expired by its own clock (two machines' clocks may disagree by
  seconds). It takes a lease over only after it has watched the document stay exactly the same
  (holder and expiry) for a whole ``ttl`` on its own monotonic clock.
- The holder ends its instance ``margin`` before that could happen: at the start of its last
  successful renewal + ``ttl`` - ``margin``, measured on its monotonic clock. ``margin`` covers
  the kill grace and a call in flight. If the agent itself is frozen, its guard process ends the
  instance at that same deadline (see guard.py).
- The instance also ends when the agent's ZooKeeper fence lapses (``fence_ok``): its task may
  be given to another agent, which must be able to start it. The lease is then released.
- A lease is held only while its run exists: from :meth:`LeaseKeeper.acquire` until the run
  is handed to the executor (:meth:`LeaseKeeper.submitted`) the keeper itself keeps it alive;
  after that, while ``alive(run_id)`` (the executor runs it, or its final state is not stored
  yet). A lease taken for a claim that was then dropped is released by the next pass, never
  renewed for ever.

The agent's part (agent.py):

- A keepalive start takes its lease before its claim is written. A lease held elsewhere makes
  the start wait ``retry_delay`` (a third of a lease), without counting a restart.
- A start that does not happen (its claim failed, was lost to another agent, or was released)
  gives its lease back at once (:meth:`LeaseKeeper.release`), and is planned again.
- A run that ended gives its lease back only once its final state is stored: the history never
  shows two instances running.
- The agent ends its instance itself when the task changes (a new revision restarts it), when
  the task leaves it (paused, deleted, moved), and when the agent stops (its leaving is
  announced first, so the new owner can start it at once); each time the lease follows the
  final state as above.

Example::

    keeper = LeaseKeeper(store, kill=executor.kill, alive=executor.is_active, fence_ok=lambda: True)
    keeper.start()
    if keeper.acquire(lease_name("t1"), run_id):
        executor.submit(...)
        keeper.submitted(run_id)
    keeper.release(run_id)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pymongo

from ..exceptions import CloudTaskError

log = logging.getLogger(__name__)

LEASE_TTL = 30.0  # seconds a lease lives without renewal, as a taker measures it
RENEW_EVERY = 3.0  # seconds between renewals
CALL_BUDGET = 2.0  # seconds a renewal may take


def lease_name(task_id: str, slot: str = "one") -> str:
    """One lease per keepalive task; one per agent for mode ``all`` (its slot)."""
    return f"keepalive:{task_id}" if slot == "one" else f"keepalive:{task_id}:{slot}"


@dataclass
class _Held:
    name: str
    run_id: str
    deadline: float  # monotonic: the instance must be ended by then
    ending: bool = False  # asked to end: the lease is released once the run is over


class LeaseKeeper:
    def __init__(
        self,
        store: object,
        *,
        kill: Callable[[str, str], object],
        alive: Callable[[str], bool],
        fence_ok: Callable[[], bool],
        kill_grace: float = 5.0,
        ttl: float = LEASE_TTL,
        renew_every: float = RENEW_EVERY,
        on_deadline: Callable[[str, float | None], None] | None = None,
    ) -> None:
        self.store = store
        self.kill = kill
        self.alive = alive
        self.fence_ok = fence_ok
        self.ttl = ttl
        self.renew_every = renew_every
        # the instance is ended this long before a taker could take the lease: its kill grace
        # (the kill must be over by then), a call in flight, and a second for the rest
        self.margin = kill_grace + CALL_BUDGET + 1.0
        if self.margin >= ttl - renew_every:
            raise ValueError(
                f"a keepalive lease of {ttl:g} s cannot cover a kill grace of {kill_grace:g} s"
            )
        self.on_deadline = on_deadline  # the guard enforces the deadline if the agent freezes
        self._held: dict[str, _Held] = {}  # run id -> lease
        self._seen: dict[str, tuple[object, object, float]] = {}  # name -> holder, expiry, since
        self._starting: set[str] = set()  # runs between their lease and the executor
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CALL_BUDGET + 1)

    # --- the agent loop ------------------------------------------------------------------------

    @property
    def retry_delay(self) -> float:
        """Seconds a start waits when its lease is held elsewhere, before it tries again."""
        return self.ttl / 3

    def acquire(self, name: str, run_id: str) -> bool:
        """Take the lease ``name`` for the run ``run_id`` (one call under a deadline). False if
        another holds it (and has not been seen unrenewed for a whole ``ttl``) or MongoDB
        cannot say. A lease taken is kept alive until :meth:`submitted` (or :meth:`release`)."""
        with self._lock:
            self._starting.add(run_id)
            if run_id in self._held:
                return True
        started = time.monotonic()
        try:
            with pymongo.timeout(CALL_BUDGET):
                held = self.store.acquire_lease(name, run_id, self.ttl)
                if not held:
                    held = self._take_over_if_unrenewed(name, run_id)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot take the keepalive lease %s yet: %s", name, e)
            self._not_starting(run_id)
            return False
        if not held:
            self._not_starting(run_id)
            return False
        with self._lock:
            self._seen.pop(name, None)
            self._held[run_id] = _Held(name, run_id, started + self.ttl - self.margin)
        self._tell_deadline(run_id, started + self.ttl - self.margin)
        return True

    def _take_over_if_unrenewed(self, name: str, run_id: str) -> bool:
        current = self.store.read_lease(name)
        if current is None:
            return bool(self.store.acquire_lease(name, run_id, self.ttl))
        token = (current.get("holder"), current.get("expires_at"))
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(name)
            if seen is None or seen[:2] != token:
                self._seen[name] = (*token, now)
                return False
            unrenewed = now - seen[2]
        if unrenewed < self.ttl:
            return False
        log.warning(
            "keepalive lease %s was not renewed by %s for %.0f s: taking it over",
            name,
            current.get("holder"),
            unrenewed,
        )
        return bool(self.store.take_over_lease(name, run_id, self.ttl, current))

    def submitted(self, run_id: str) -> None:
        """The run is in the executor's hands: from now on its lease lives while ``alive``."""
        self._not_starting(run_id)

    def _not_starting(self, run_id: str) -> None:
        with self._lock:
            self._starting.discard(run_id)

    def _alive(self, run_id: str) -> bool:
        with self._lock:
            if run_id in self._starting:
                return True
        return self.alive(run_id)

    def release(self, run_id: str) -> None:
        """The run ended (or never started): give the lease back so the next instance can start
        at once. A failure is logged: the lease then runs out by itself."""
        with self._lock:
            self._starting.discard(run_id)
            held = self._held.pop(run_id, None)
        if held is None:
            return
        self._tell_deadline(run_id, None)
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.release_lease(held.name, run_id)
        except (CloudTaskError, pymongo.errors.PyMongoError) as e:
            log.warning("cannot release the keepalive lease of run %s (it runs out): %s", run_id, e)

    def holds(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._held

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    # --- the renewal thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self._next_wait()):
            try:
                self.renew_all()
            except Exception:  # never let the thread that ends instances die
                log.exception("renewing keepalive leases failed")

    def _next_wait(self) -> float:
        """Wake for the next renewal, or sooner for a deadline that comes first."""
        with self._lock:
            deadlines = [h.deadline for h in self._held.values()]
        wait = self.renew_every
        if deadlines:
            wait = min(wait, max(0.05, min(deadlines) - time.monotonic()))
        return wait

    def renew_all(self) -> None:
        """One pass: end what must end, release what nothing runs, renew the rest."""
        fence = self.fence_ok()
        for held in self._snapshot():
            if not self._alive(held.run_id):
                log.info(
                    "run %s holds keepalive lease %s but is gone: released", held.run_id, held.name
                )
                self.release(held.run_id)
                continue
            if not fence and not held.ending:
                self._end(held, "its agent lost its ZooKeeper session (the task may move)")
            started = time.monotonic()
            if started >= held.deadline:
                if not held.ending:
                    self._end(held, "its keepalive lease could not be renewed in time")
                continue
            try:
                with pymongo.timeout(min(CALL_BUDGET, max(0.05, held.deadline - started))):
                    ok = self.store.renew_lease(held.name, held.run_id, self.ttl)
            except (CloudTaskError, pymongo.errors.PyMongoError) as e:
                log.warning("cannot renew the keepalive lease of run %s: %s", held.run_id, e)
                if time.monotonic() >= held.deadline and not held.ending:
                    self._end(held, "its keepalive lease could not be renewed in time")
                continue
            if not ok:
                if not held.ending:
                    self._end(held, "its keepalive lease was taken over")
                continue
            deadline = started + self.ttl - self.margin
            with self._lock:
                if held.run_id in self._held:
                    self._held[held.run_id].deadline = deadline
            self._tell_deadline(held.run_id, deadline)

    def _snapshot(self) -> list[_Held]:
        with self._lock:
            return [_Held(h.name, h.run_id, h.deadline, h.ending) for h in self._held.values()]

    def _end(self, held: _Held, reason: str) -> None:
        """End the instance; the lease is kept (and renewed while it can be) until the run is
        over and :meth:`release` is called: released now, a taker could start the next
        instance while this one is still in its kill grace."""
        log.error("ending run %s: %s", held.run_id, reason)
        with self._lock:
            if held.run_id in self._held:
                self._held[held.run_id].ending = True
        self.kill(held.run_id, reason)

    def _tell_deadline(self, run_id: str, deadline: float | None) -> None:
        if self.on_deadline is not None:
            try:
                self.on_deadline(run_id, deadline)
            except Exception:
                log.exception("cannot hand the deadline of run %s to the guard", run_id)
