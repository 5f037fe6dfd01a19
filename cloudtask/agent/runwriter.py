"""Batched writes of run progress to MongoDB, off the scheduling path.

The writer keeps each live run's document (from its claim on). Changes are merged into it and
every changed run is written in one ``bulk_write`` every ``flush_interval``. Output tails of
running runs, and the move from ``queued`` to ``running`` (a ``lazy`` update), are written at
most once per ``tail_interval``: a run shorter than that costs one write, its final state, which
halves the writes of a burst of short runs. When MongoDB is unreachable the documents
stay dirty and are retried with backoff: scheduling and running never wait for a write.
A run is forgotten once its finished state is written, or once it was released (a claim this
agent will not start, handed back for the task's owner: ``agent`` None).

While a burst starts (``hold_while``, the executor's: fires wait for a slot or for their
process, and processes are starting), the writer waits, at most ``HOLD_MOST``: a burst's
final states cost the store about as much CPU as its starts (nx-27017 on the agent's
machine: ~0.45 ms a run, however they are batched), so they are written once the burst has
started, in one batch.

Every ``beat_interval`` the writer also beats the unfinished runs it keeps (one
``update_many``): the leader marks a run ``lost`` only after its agent's session is gone and
its beat stopped changing, so a run whose agent is cut off from ZooKeeper but still running
it is not lost. Every call to MongoDB has a deadline (``CALL_BUDGET``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pymongo

from ..retry import Backoff, TryAgain, retry
from ..runmodel import BEAT_INTERVAL, FINISHED_STATUSES, RUNNING_STATUSES, released_fields
from ..store import Store

log = logging.getLogger(__name__)

CALL_BUDGET = 5.0  # seconds a write may take before it counts as failed (and is retried)
WRITE_BACKOFF = Backoff(first=0.5, factor=2.0, most=10.0)  # after failed writes, at most 10 s
STOP_RETRY = 0.5  # seconds between the tries of a stopping writer
URGENT_GAP = 0.05  # seconds at least between two writes, urgent ones too
HOLD_MOST = 3.0  # seconds at most that writes wait while a burst starts
HOLD_LOOK = 0.02  # seconds between looks at whether they still wait


class RunWriter:
    def __init__(
        self,
        store: Store,
        flush_interval: float = 0.1,
        tail_interval: float = 1.0,
        owner: str | None = None,
        beat_interval: float = BEAT_INTERVAL,
    ) -> None:
        self.store = store
        self.owner = owner  # the agent whose runs these are (writes apply only while they are)
        self.flush_interval = flush_interval
        self.tail_interval = tail_interval
        self.beat_interval = beat_interval
        self._last_beat = 0.0
        self._docs: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._lazy: set[str] = set()
        self._tails: dict[str, Callable[[], str | None]] = {}
        self._after: dict[str, Callable[[], None]] = {}  # run id -> call once it is written
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-writer", daemon=True)
        self._last_tail = 0.0
        self._failures = 0  # flushes failed in a row
        # True while a burst starts: writes wait then (at most HOLD_MOST), see above
        self.hold_while: Callable[[], bool] | None = None

    def start(self) -> None:
        self._thread.start()

    def track(self, doc: dict[str, Any]) -> None:
        """Start keeping a claimed run's document (already stored by the claim)."""
        with self._lock:
            self._docs[doc["_id"]] = dict(doc)

    def update(
        self, run_id: str, fields: dict[str, Any], urgent: bool = False, lazy: bool = False
    ) -> None:
        with self._lock:
            doc = self._docs.get(run_id)
            if doc is None:
                log.warning("update for untracked run %s dropped", run_id)
                return
            doc.update(fields)
            (self._lazy if lazy else self._dirty).add(run_id)
        if urgent and not self._wake.is_set():  # (set already: the writer is on its way)
            self._wake.set()

    def watch_tail(self, run_id: str, read_tail: Callable[[], str | None]) -> None:
        """``read_tail`` returns the new output tail, or None when it has not changed."""
        with self._lock:
            self._tails[run_id] = read_tail

    def release(self, run_id: str, reason: str) -> None:
        """Hand a claim this agent will not start back for the task's owner to take over: it
        stays ``queued``, with no agent (written only while it is still ours)."""
        self.update(run_id, released_fields(self.owner, reason), urgent=True)

    def finish_unstarted(
        self, doc: dict[str, Any], status: str, reason: str, finished_at: datetime
    ) -> None:
        """A claim this agent won and will not start (``skipped``, ``missed``): kept from now,
        and finished at once with ``status`` and ``reason``."""
        self.track(doc)
        self.update(
            doc["_id"],
            {"status": status, "error": reason, "finished_at": finished_at, "duration": 0.0},
            urgent=True,
        )

    def keeps(self, run_id: str) -> bool:
        """Whether the run's final state is not stored yet (or it still runs)."""
        with self._lock:
            return run_id in self._docs

    def when_written(self, run_id: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the writer's thread) once the run's final state is stored, or
        at once if the run is not kept (already written). A keepalive lease is given back so:
        the next instance never starts while the stored history still shows this one running."""
        with self._lock:
            if run_id in self._docs:
                self._after[run_id] = callback
                return
        callback()

    def forget(self, run_id: str) -> None:
        """Stop keeping a run without writing it (another agent has taken it over)."""
        with self._lock:
            self._docs.pop(run_id, None)
            self._dirty.discard(run_id)
            self._lazy.discard(run_id)
            self._tails.pop(run_id, None)
            callback = self._after.pop(run_id, None)
        if callback is not None:
            callback()

    def unwatch_tail(self, run_id: str) -> None:
        with self._lock:
            self._tails.pop(run_id, None)

    def flush(self) -> bool:
        """Write every changed run now. Returns False if MongoDB refused (they stay dirty)."""
        with self._flush_lock:
            with self._lock:
                now = time.monotonic()
                if now - self._last_tail >= self.tail_interval:
                    self._last_tail = now
                    self._dirty |= self._lazy
                    self._lazy.clear()
                    for run_id, read_tail in list(self._tails.items()):
                        tail = read_tail()
                        if tail is not None and run_id in self._docs:
                            self._docs[run_id]["output_tail"] = tail
                            self._dirty.add(run_id)
                batch = [dict(self._docs[r]) for r in self._dirty if r in self._docs]
                self._lazy -= self._dirty
                self._dirty.clear()
            if not batch:
                return self._beat()
            try:
                with pymongo.timeout(CALL_BUDGET):
                    self.store.save_runs(batch, owner=self.owner)
            except Exception as e:  # StoreError, or anything unexpected: keep them, retry
                log.warning("cannot write %d runs yet, will retry: %s", len(batch), e)
                with self._lock:
                    self._dirty.update(d["_id"] for d in batch)
                return False
            after = []
            with self._lock:
                for d in batch:
                    gone = d["status"] in FINISHED_STATUSES or d.get("agent") is None
                    if gone and d["_id"] not in self._dirty:
                        self._docs.pop(d["_id"], None)
                        if d["_id"] in self._after:
                            after.append(self._after.pop(d["_id"]))
            for callback in after:
                try:
                    callback()
                except Exception:
                    log.exception("after writing a run")
            return self._beat()

    def _beat(self) -> bool:
        """Beat the unfinished runs, every ``beat_interval`` (called by the flush)."""
        if self.owner is None or time.monotonic() - self._last_beat < self.beat_interval:
            return True
        self._last_beat = time.monotonic()
        with self._lock:
            ids = [r for r, d in self._docs.items() if d["status"] in RUNNING_STATUSES]
        if not ids:
            return True
        beat = round(time.time(), 3)
        try:
            with pymongo.timeout(CALL_BUDGET):
                self.store.beat_runs(self.owner, ids, beat)
        except Exception as e:
            log.warning("cannot beat %d runs yet: %s", len(ids), e)
            return False
        with self._lock:
            for run_id in ids:
                if run_id in self._docs:
                    self._docs[run_id]["beat"] = beat
        return True

    def pending_count(self) -> int:
        with self._lock:
            return len(self._dirty)

    def _loop(self) -> None:
        flushed = 0.0
        while not self._stop.is_set():
            backoff = WRITE_BACKOFF.wait(self._failures) if self._failures else 0.0
            self._wake.wait(max(self.flush_interval, backoff))
            # an urgent write waits for the ones right behind it (a final state a run, many
            # runs a second): one batch of them, not a round trip each
            gap = URGENT_GAP - (time.monotonic() - flushed)
            if gap > 0 and not self._stop.is_set():
                self._stop.wait(gap)
            self._hold()
            self._wake.clear()
            flushed = time.monotonic()
            try:
                ok = self.flush()
            except Exception:  # never let the only writer die: runs would stay 'running'
                log.exception("writing runs failed; will retry")
                ok = False
            self._failures = 0 if ok else self._failures + 1

    def _hold(self) -> None:
        """Wait while a burst starts (at most HOLD_MOST; never once stopping)."""
        hold = self.hold_while
        if hold is None:
            return
        until = time.monotonic() + HOLD_MOST
        try:
            while hold() and time.monotonic() < until and not self._stop.wait(HOLD_LOOK):
                pass
        except Exception:
            log.exception("cannot tell whether fires wait to start")

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything still pending (retrying until ``timeout``), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

        def flushed() -> None:
            if not self.flush():
                raise TryAgain

        try:
            retry(flushed, backoff=Backoff(STOP_RETRY, deadline=max(0.0, timeout)))
        except TryAgain:
            pass  # still not written: the run journal has the final states
