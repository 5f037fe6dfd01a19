"""Trying a call again until it is done: the one helper behind every retry loop.

:class:`Backoff` is the policy, pure: the wait after each failed try (``first``, then each
``factor`` times the one before, never more than ``most``; with ``jitter``, a fraction, each
wait is drawn from ``[wait * (1 - jitter), wait]``, so that clients that failed together do not
all come back together), and ``deadline``, the bound of the whole.

:func:`retry` is the loop. It calls ``attempt()`` until it returns, and returns its result.
After an error of ``retry_on``, or a :class:`TryAgain` (raised by an attempt that wants another
try, after its own wait), it waits and tries again; any other error goes through at once. It
ends:

- when ``attempt()`` returns;
- when ``stop`` is set: it is checked before every try (the first too), and a wait ends at once
  when it is set (the default ``sleep`` is ``stop.wait``); :class:`Stopped` is raised;
- when a try fails at or after ``deadline`` seconds from the start: that try's error is raised.
  The deadline is checked after each failed try and a wait is never cut short to meet it, so
  the last try may start up to one wait after it.

``on_retry(tries, error)`` is told of each failed try that is followed by another, before the
wait (to say so in the log). Time is injected (``clock``, ``sleep``, ``rng``), so the helper is
tested without sleeping.

Example::

    retry(
        lambda: bounded(zk, "create", lambda: zk.ensure_path_async(path)),
        retry_on=ZK_TRANSIENT,
        backoff=Backoff(0.5),
        stop=stop_event,
    )
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_RANDOM = random.Random()


class Stopped(Exception):
    """The stop event was set before the call was done."""


class TryAgain(Exception):
    """Raised by an attempt: try again after ``after`` seconds (None: the backoff's wait)."""

    def __init__(self, after: float | None = None) -> None:
        super().__init__(after)
        self.after = after


@dataclass(frozen=True)
class Backoff:
    """How long to wait between tries, and for how long to try at all (seconds)."""

    first: float
    factor: float = 1.0
    most: float | None = None
    jitter: float = 0.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.first < 0 or self.factor < 1:
            raise ValueError("a backoff starts at 0 s or more and never shrinks")
        if self.most is not None and self.most < 0:
            raise ValueError("a backoff's longest wait is 0 s or more")
        if not 0 <= self.jitter <= 1:
            raise ValueError("a backoff's jitter is a fraction of the wait, from 0 to 1")
        if self.deadline is not None and self.deadline < 0:
            raise ValueError("a backoff's deadline is 0 s or more")

    def wait(self, tries: int, rng: random.Random | None = None) -> float:
        """The wait after the ``tries``-th failed try in a row (1 for the first failure)."""
        if tries < 1:
            raise ValueError("a wait follows a failed try: tries is 1 or more")
        wait = self.first
        for _ in range(tries - 1):
            if self.factor == 1 or wait == math.inf:
                break
            if self.most is not None and wait >= self.most:
                break
            wait *= self.factor
        if self.most is not None:
            wait = min(wait, self.most)
        if self.jitter:
            wait -= wait * self.jitter * (rng or _RANDOM).random()
        return wait


def retry(
    attempt: Callable[[], T],
    *,
    backoff: Backoff,
    retry_on: tuple[type[BaseException], ...] = (),
    stop: threading.Event | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
    rng: random.Random | None = None,
) -> T:
    """``attempt()``'s result, once a try succeeds (see the module docstring for the rest)."""
    if sleep is None:
        sleep = stop.wait if stop is not None else time.sleep
    retryable = (TryAgain, *retry_on)
    started = clock()
    tries = 0
    while True:
        if stop is not None and stop.is_set():
            raise Stopped
        try:
            return attempt()
        except retryable as error:
            tries += 1
            if backoff.deadline is not None and clock() - started >= backoff.deadline:
                raise
            if on_retry is not None:
                on_retry(tries, error)
            after = error.after if isinstance(error, TryAgain) else None
            wait = backoff.wait(tries, rng) if after is None else after
        if wait > 0:
            sleep(wait)
