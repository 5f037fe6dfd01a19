"""Batched writes of run progress to MongoDB, off the scheduling path.

Updates for the same run are merged and written together with everyone else's in one
``bulk_write`` every ``flush_interval``. Output tails of running runs are written at most
once per ``tail_interval``. When MongoDB is unreachable the pending updates are kept (merged)
and retried with backoff: scheduling and running never wait for a write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..exceptions import StoreError
from ..store import Store

log = logging.getLogger(__name__)


class RunWriter:
    def __init__(
        self, store: Store, flush_interval: float = 0.1, tail_interval: float = 1.0
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.tail_interval = tail_interval
        self._pending: dict[str, dict[str, Any]] = {}
        self._tails: dict[str, Callable[[], str | None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._loop, name="run-writer", daemon=True)
        self._last_tail = 0.0
        self._backoff = 0.0

    def start(self) -> None:
        self._thread.start()

    def update(self, run_id: str, fields: dict[str, Any], urgent: bool = False) -> None:
        with self._lock:
            self._pending.setdefault(run_id, {}).update(fields)
        if urgent:
            self._wake.set()

    def watch_tail(self, run_id: str, read_tail: Callable[[], str | None]) -> None:
        """``read_tail`` returns the new output tail, or None when it has not changed."""
        with self._lock:
            self._tails[run_id] = read_tail

    def unwatch_tail(self, run_id: str) -> None:
        with self._lock:
            self._tails.pop(run_id, None)

    def flush(self) -> bool:
        """Write what is pending now. Returns False if MongoDB refused (it stays pending)."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_tail >= self.tail_interval:
                self._last_tail = now
                for run_id, read_tail in list(self._tails.items()):
                    tail = read_tail()
                    if tail is not None:
                        self._pending.setdefault(run_id, {}).setdefault("output_tail", tail)
            batch = list(self._pending.items())
            self._pending.clear()
        if not batch:
            return True
        try:
            self.store.update_runs(batch)
            return True
        except StoreError as e:
            log.warning("cannot write %d run updates yet, will retry: %s", len(batch), e)
            with self._lock:
                for run_id, fields in batch:  # newer updates win over the failed older ones
                    merged = dict(fields)
                    merged.update(self._pending.get(run_id, {}))
                    self._pending[run_id] = merged
            return False
        finally:
            with self._lock:
                self._idle.notify_all()

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(max(self.flush_interval, self._backoff))
            self._wake.clear()
            ok = self.flush()
            self._backoff = 0.0 if ok else min(max(self._backoff * 2, 0.5), 10.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything still pending (retrying until ``timeout``), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.5)
