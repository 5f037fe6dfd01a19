"""The retry helper, on a fake clock: nothing sleeps, every wait is recorded."""

from __future__ import annotations

import random
import threading

import pytest

from cloudtask.retry import Backoff, Stopped, TryAgain, retry


class FakeTime:
    """A clock that moves only when slept on (or by an attempt's own cost)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


class Flaky:
    """Fails ``failures`` times with ``error``, then returns ``result``; each try costs ``cost``."""

    def __init__(
        self, time: FakeTime, failures: int, error=ConnectionError, cost=0.0, result="done"
    ):
        self.time, self.failures, self.error, self.cost, self.result = (
            time,
            failures,
            error,
            cost,
            result,
        )
        self.tries = 0

    def __call__(self) -> str:
        self.tries += 1
        self.time.now += self.cost
        if self.tries <= self.failures:
            raise self.error(f"try {self.tries}")
        return self.result


def run(attempt, t: FakeTime, backoff: Backoff, **kw):
    return retry(
        attempt, backoff=backoff, retry_on=(ConnectionError,), clock=t.clock, sleep=t.sleep, **kw
    )


def test_waits_grow_by_the_factor_up_to_the_cap_and_the_result_comes_back():
    t = FakeTime()
    attempt = Flaky(t, failures=6)
    assert run(attempt, t, Backoff(0.5, factor=2, most=10)) == "done"
    assert attempt.tries == 7
    assert t.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_a_fixed_wait_and_no_deadline_keeps_trying():
    t = FakeTime()
    attempt = Flaky(t, failures=200)
    assert run(attempt, t, Backoff(0.5)) == "done"
    assert t.waits == [0.5] * 200


def test_the_wait_policy_alone():
    backoff = Backoff(0.5, factor=2, most=10)
    assert [backoff.wait(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.wait(100_000) == 10  # no overflow however long it fails
    assert Backoff(1, factor=3).wait(5) == 81
    with pytest.raises(ValueError):
        backoff.wait(0)
    for bad in ({"first": -1}, {"first": 1, "factor": 0.5}, {"first": 1, "jitter": 2}):
        with pytest.raises(ValueError):
            Backoff(**bad)


def test_jitter_draws_each_wait_below_its_bound():
    t = FakeTime()
    attempt = Flaky(t, failures=50)
    run(attempt, t, Backoff(1, factor=2, most=8, jitter=0.5), rng=random.Random(7))
    bounds = [Backoff(1, factor=2, most=8).wait(n) for n in range(1, 51)]
    assert all(b / 2 <= w <= b for w, b in zip(t.waits, bounds, strict=True))
    assert len(set(t.waits)) > 10  # drawn, not fixed


def test_the_deadline_ends_it_with_the_last_error_and_is_checked_after_each_failed_try():
    t = FakeTime()
    attempt = Flaky(t, failures=1000, cost=0.25)
    with pytest.raises(ConnectionError, match="try 4"):
        run(attempt, t, Backoff(0.5, deadline=2.5))
    # tries end at 0.25, 1.0, 1.75 and 2.5 s: the fourth failed at the deadline
    assert attempt.tries == 4
    assert t.waits == [0.5] * 3
    # a wait is not cut short to meet it: a try may start after the deadline
    t = FakeTime()
    attempt = Flaky(t, failures=1000, cost=0.25)
    with pytest.raises(ConnectionError, match="try 2"):
        run(attempt, t, Backoff(2.0, deadline=1.0))
    assert t.waits == [2.0]


def test_a_deadline_of_zero_makes_one_try():
    t = FakeTime()
    attempt = Flaky(t, failures=1)
    with pytest.raises(ConnectionError):
        run(attempt, t, Backoff(0.5, deadline=0.0))
    assert attempt.tries == 1 and t.waits == []


def test_other_errors_go_through_at_once():
    t = FakeTime()
    attempt = Flaky(t, failures=1, error=KeyError)
    with pytest.raises(KeyError):
        run(attempt, t, Backoff(0.5))
    assert attempt.tries == 1 and t.waits == []


def test_stop_is_checked_before_every_try_and_the_default_wait_is_the_stop_event():
    stop = threading.Event()
    t = FakeTime()
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) == 3:
            stop.set()
        raise ConnectionError("down")

    with pytest.raises(Stopped):
        run(attempt, t, Backoff(0.5), stop=stop)
    assert len(calls) == 3 and t.waits == [0.5, 0.5, 0.5]
    with pytest.raises(Stopped):  # set before the first try: none is made
        run(attempt, t, Backoff(0.5), stop=stop)
    assert len(calls) == 3
    # without an injected sleep, the wait is the stop event's: set, it ends at once
    waited = []

    class Event(threading.Event):
        def wait(self, timeout=None):
            waited.append(timeout)
            self.set()
            return True

    def down():
        raise ConnectionError("down")

    with pytest.raises(Stopped):
        retry(down, backoff=Backoff(7), retry_on=(ConnectionError,), stop=Event())
    assert waited == [7]


def test_try_again_sets_its_own_wait_and_on_retry_hears_of_each_failure():
    t = FakeTime()
    heard = []
    plan = [TryAgain(0.0), ConnectionError("x"), TryAgain(), TryAgain(3.0)]

    def attempt():
        if plan:
            raise plan.pop(0)
        return 42

    result = run(
        attempt,
        t,
        Backoff(0.5, factor=2),
        on_retry=lambda tries, e: heard.append((tries, type(e).__name__)),
    )
    assert result == 42
    assert t.waits == [1.0, 2.0, 3.0]  # at once, then the backoff's 2nd and 3rd, then its own
    assert heard == [(1, "TryAgain"), (2, "ConnectionError"), (3, "TryAgain"), (4, "TryAgain")]


def test_keep_trying_says_so_at_the_first_failure_and_every_30th(monkeypatch, caplog):
    from kazoo.exceptions import ConnectionLoss

    from cloudtask import zkpaths

    stop = threading.Event()
    t = FakeTime()
    monkeypatch.setattr(stop, "wait", t.sleep)
    attempt = Flaky(t, failures=61, error=ConnectionLoss)
    with caplog.at_level("WARNING", logger="cloudtask.zkpaths"):
        assert zkpaths.keep_trying("create /x", attempt, stop) is True
    assert t.waits == [0.5] * 61
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["cannot create /x yet"] * 3
    stop.set()
    assert zkpaths.keep_trying("create /x", attempt, stop) is False
