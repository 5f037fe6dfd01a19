"""Claims made ahead of their due time, waiting for it; and the thread that starts them.

With ``agent.claim_ahead`` (L seconds) the scheduler gives a schedule's fires between L and
1.5 L before they are due (scheduler.py); the agent claims them then, in batches, as run
documents with status ``claimed`` ("this agent starts it at ``scheduled_for`` unless it
cannot"), and keeps them here. At the due time only local checks and the spawn remain
(agent.py, ``_start_armed``): its fence, the task still here at a revision whose schedule has
this fire, not late, ``forbid`` and free slots; no MongoDB call is on that path. A claim that
cannot start is released (the task's owner takes it over as a claim that never started) or
recorded (``skipped``, ``missed``) with the reason; never started twice, never left without a
record. See docs/architecture.md, "Claims ahead of the due time".

:class:`Armed` is the heap, thread-safe; :class:`StartTimer` pops it at each due time (the
agent's loop pops it too, at each step: whichever comes first starts the claim, once).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from datetime import datetime

from .claims import Claim

log = logging.getLogger(__name__)

MAX_WAIT = 1.0  # seconds the timer sleeps at most (a clock that jumps is seen within this)


class Armed:
    """Claims won ahead of their due time, by due time. Every method is thread-safe."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, int, Claim]] = []
        self._seq = itertools.count()
        self._gone: set[int] = set()  # entries taken out of turn (their task left)
        self._by_task: dict[str, dict[int, Claim]] = {}
        self.changed = threading.Condition()

    def add(self, claims: list[Claim]) -> None:
        with self.changed:
            for claim in claims:
                seq = next(self._seq)
                heapq.heappush(self._heap, (claim.fire.scheduled_for, seq, claim))
                self._by_task.setdefault(claim.fire.task_id, {})[seq] = claim
            self.changed.notify_all()

    def due(self, now: datetime) -> list[Claim]:
        """Take out the claims due at ``now``, in due order."""
        out = []
        with self.changed:
            while self._heap and self._heap[0][0] <= now:
                _, seq, claim = heapq.heappop(self._heap)
                if seq in self._gone:
                    self._gone.discard(seq)
                    continue
                self._forget(claim.fire.task_id, seq)
                out.append(claim)
        return out

    def of_task(self, task_id: str) -> list[Claim]:
        """Take out every claim of one task (it left, or stops here)."""
        with self.changed:
            claims = self._by_task.pop(task_id, {})
            self._gone.update(claims)
            return list(claims.values())

    def take(self, run_id: str) -> Claim | None:
        """Take out the claim of one run (a kill request), or None."""
        with self.changed:
            for task_id, claims in self._by_task.items():
                for seq, claim in claims.items():
                    if claim.doc is not None and claim.doc["_id"] == run_id:
                        self._gone.add(seq)
                        self._forget(task_id, seq)
                        return claim
        return None

    def take_all(self) -> list[Claim]:
        with self.changed:
            out = [c for _, seq, c in sorted(self._heap) if seq not in self._gone]
            self._heap.clear()
            self._gone.clear()
            self._by_task.clear()
            return out

    def next_at(self) -> datetime | None:
        with self.changed:
            while self._heap and self._heap[0][1] in self._gone:
                self._gone.discard(heapq.heappop(self._heap)[1])
            return self._heap[0][0] if self._heap else None

    def run_ids(self) -> set[str]:
        with self.changed:
            return {c.doc["_id"] for _, seq, c in self._heap if seq not in self._gone and c.doc}

    def __len__(self) -> int:
        with self.changed:
            return len(self._heap) - len(self._gone)

    def _forget(self, task_id: str, seq: int) -> None:
        claims = self._by_task.get(task_id)
        if claims is not None:
            claims.pop(seq, None)
            if not claims:
                del self._by_task[task_id]


class StartTimer:
    """Starts armed claims at their due time: waits for the earliest (or for a new one), then
    hands every due claim to ``start(now)``, on a thread of its own, so a claim write or a
    slow call of the agent's loop never delays a start."""

    def __init__(
        self,
        armed: Armed,
        clock: Callable[[], datetime],
        start: Callable[[datetime], None],
        stop: threading.Event,
    ) -> None:
        self.armed = armed
        self.clock = clock
        self.start_due = start
        self.stop_event = stop
        self._thread = threading.Thread(target=self._run, name="starter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        with self.armed.changed:
            self.armed.changed.notify_all()

    def join(self, timeout: float) -> None:
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with self.armed.changed:
                at = self.armed.next_at()
                wait = MAX_WAIT
                if at is not None:
                    wait = min(MAX_WAIT, (at - self.clock()).total_seconds())
                if wait > 0:
                    self.armed.changed.wait(wait)
            if self.stop_event.is_set():
                return
            try:
                self.start_due(self.clock())
            except Exception:  # the timer must not die: claims would wait for the loop
                log.exception("starting claims at their due time failed")
