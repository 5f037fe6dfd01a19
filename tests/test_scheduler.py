"""The agent's scheduler engine, driven with fixed times: nothing sleeps, nothing reads a clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from helpers import task_spec

from cloudtask.agent.scheduler import Scheduler
from cloudtask.task import parse_task

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def spec(**over):
    return parse_task(task_spec(over.pop("name", "t"), **{"schedule": {"every": "10s"}, **over}))


def s(n: float) -> timedelta:
    return timedelta(seconds=n)


def test_every_fires_on_grid_and_reports_delay():
    sched = Scheduler()
    sched.upsert("a", spec(), 1, T0 + s(3))
    fires, delay = sched.tick(T0 + s(3))
    assert fires == []
    assert delay == 1.0  # capped by max_sleep
    fires, _ = sched.tick(T0 + s(9.5))
    assert fires == []
    fires, delay = sched.tick(T0 + s(10))
    assert [(f.task_id, f.scheduled_for, f.trigger, f.status) for f in fires] == [
        ("a", T0 + s(10), "schedule", None)
    ]
    fires, delay = sched.tick(T0 + s(19.75))
    assert fires == [] and abs(delay - 0.25) < 1e-6


def test_fires_are_never_emitted_twice():
    sched = Scheduler()
    sched.upsert("a", spec(), 1, T0)
    seen = []
    t = T0
    while t < T0 + s(60):
        t += s(0.25)
        seen += [f.scheduled_for for f in sched.tick(t)[0]]
    assert seen == [T0 + s(10 * k) for k in range(1, 7)]


def test_late_fires_latest_runs_earlier_recorded_missed():
    sched = Scheduler(on_time_tolerance=2.0)
    sched.upsert("a", spec(), 1, T0)
    fires, _ = sched.tick(T0 + s(31))  # paused: 10, 20, 30 are due
    assert [(f.scheduled_for, f.status, f.trigger) for f in fires] == [
        (T0 + s(10), "missed", "schedule"),
        (T0 + s(20), "missed", "schedule"),
        (T0 + s(30), None, "schedule"),
    ]


def test_late_beyond_tolerance_follows_misfire_policy():
    sched = Scheduler(on_time_tolerance=2.0)
    sched.upsert("run", spec(misfire="run_once", misfire_grace="1m"), 1, T0)
    sched.upsert("skip", spec(misfire="skip"), 1, T0)
    sched.upsert("old", spec(misfire="run_once", misfire_grace="3s"), 1, T0)
    fires = {f.task_id: f for f in sched.tick(T0 + s(15))[0]}
    assert fires["run"].trigger == "catch-up" and fires["run"].status is None
    assert fires["skip"].status == "missed"
    assert fires["old"].status == "missed"  # 5 s late with a 3 s grace


def test_changed_task_reschedules_and_unchanged_revision_is_ignored():
    sched = Scheduler()
    assert sched.upsert("a", spec(), 1, T0)
    assert not sched.upsert("a", spec(), 1, T0 + s(1))
    assert sched.upsert("a", spec(schedule={"every": "1m"}), 2, T0 + s(5))
    fires, _ = sched.tick(T0 + s(10))
    assert fires == []  # the old 10 s plan is gone
    fires, _ = sched.tick(T0 + s(60))
    assert [f.scheduled_for for f in fires] == [T0 + s(60)]
    assert fires[0].revision == 2


def test_removed_task_stops_firing():
    sched = Scheduler()
    sched.upsert("a", spec(), 1, T0)
    sched.retry("a", T0, 1, T0 + s(5))
    assert sched.remove("a")
    assert sched.tick(T0 + s(100))[0] == []


def test_retry_fires_with_original_scheduled_time_and_attempt():
    sched = Scheduler()
    sched.upsert("a", spec(schedule={"every": "1h"}), 1, T0)
    sched.retry("a", T0 + s(1), 1, T0 + s(31))
    assert sched.tick(T0 + s(30))[0] == []
    fires, _ = sched.tick(T0 + s(31))
    assert [(f.scheduled_for, f.attempt, f.trigger) for f in fires] == [(T0 + s(1), 1, "retry")]


def test_keepalive_starts_at_once_and_restarts_with_backoff():
    sched = Scheduler()
    sched.upsert("k", spec(schedule={"keepalive": True}), 1, T0)
    fires, _ = sched.tick(T0)
    assert [(f.scheduled_for, f.trigger) for f in fires] == [(T0, "schedule")]
    assert sched.tick(T0 + s(100))[0] == []  # running: nothing more
    # exits quickly three times: 1 s, 2 s, 4 s
    t = T0
    expected = [1, 2, 4]
    for delay in expected:
        restart = sched.keepalive_exited("k", t, t + s(1))
        assert restart == t + s(1) + s(delay)
        assert sched.tick(restart - s(0.01))[0] == []
        fires, _ = sched.tick(restart)
        assert [f.trigger for f in fires] == ["restart"]
        t = restart
    # a run that lasted 60 s resets the backoff
    assert sched.keepalive_exited("k", t, t + s(60)) == t + s(61)


def test_keepalive_backoff_caps_at_60s():
    sched = Scheduler()
    sched.upsert("k", spec(schedule={"keepalive": True}), 1, T0)
    sched.tick(T0)
    t = T0
    for _ in range(10):
        restart = sched.keepalive_exited("k", t, t)
        sched.tick(restart)
        last = restart - t
        t = restart
    assert last == s(60)


def test_one_shot_fires_once():
    at = T0 + s(30)
    sched = Scheduler()
    sched.upsert("o", spec(schedule={"at": at.isoformat()}), 1, T0)
    fires, _ = sched.tick(T0 + s(30))
    assert [f.scheduled_for for f in fires] == [at]
    assert sched.tick(T0 + s(3600))[0] == []
    assert sched.next_fire("o") is None


def test_many_tasks_due_together_come_in_one_tick():
    sched = Scheduler()
    for i in range(500):
        sched.upsert(f"t{i}", spec(name=f"t{i}"), 1, T0)
    fires, _ = sched.tick(T0 + s(10))
    assert len(fires) == 500
    assert {f.scheduled_for for f in fires} == {T0 + s(10)}


def test_long_pause_reports_the_true_latest_fire_and_a_bounded_history():
    from cloudtask.agent.scheduler import MAX_MISSED_PER_TICK

    sched = Scheduler()
    sched.upsert("a", spec(schedule={"every": "1s"}, misfire_grace="3h"), 1, T0)
    now = T0 + s(2 * 3600 + 0.5)
    fires, _ = sched.tick(now)
    assert len(fires) == MAX_MISSED_PER_TICK
    assert fires[-1].scheduled_for == T0 + s(7200) and fires[-1].trigger == "schedule"
    assert all(f.status == "missed" for f in fires[:-1])
    assert fires[0].scheduled_for == T0 + s(7200 - MAX_MISSED_PER_TICK + 1)
    assert sched.next_fire("a") == T0 + s(7201)


def test_edit_keeps_pending_retries_and_a_due_fire():
    sched = Scheduler()
    sched.upsert("a", spec(schedule={"every": "10s"}), 1, T0)
    sched.retry("a", T0, 1, T0 + s(5))
    # the edit is seen at 10.2 s: the 10 s fire is due but was not ticked yet
    sched.upsert("a", spec(schedule={"every": "10s"}, description="edited"), 2, T0 + s(10.2))
    fires, _ = sched.tick(T0 + s(10.3))
    assert [(f.trigger, f.scheduled_for, f.revision) for f in fires] == [
        ("retry", T0, 2),
        ("schedule", T0 + s(10), 2),
    ]


def test_keepalive_retry_at_does_not_count_a_restart():
    sched = Scheduler()
    sched.upsert("k", spec(schedule={"keepalive": True}), 1, T0)
    sched.tick(T0)
    sched.keepalive_retry_at("k", T0 + s(5))
    fires, _ = sched.tick(T0 + s(5))
    assert [f.trigger for f in fires] == ["schedule"]  # still the first start, not a restart


def test_new_task_catches_up_fires_since_it_was_last_looked_after():
    sched = Scheduler()
    # the previous owner recorded the fire at 10 s; it died; this agent takes the task at 45.5 s
    sched.upsert("run", spec(misfire="run_once"), 1, T0 + s(45.5), since=T0 + s(10))
    sched.upsert("skip", spec(misfire="skip"), 1, T0 + s(45.5), since=T0 + s(10))
    fires, _ = sched.tick(T0 + s(45.5))
    run = [(f.scheduled_for, f.trigger, f.status) for f in fires if f.task_id == "run"]
    assert run == [
        (T0 + s(20), "schedule", "missed"),
        (T0 + s(30), "schedule", "missed"),
        (T0 + s(40), "catch-up", None),
    ]
    skip = [(f.scheduled_for, f.status) for f in fires if f.task_id == "skip"]
    assert skip == [(T0 + s(20), "missed"), (T0 + s(30), "missed"), (T0 + s(40), "missed")]


def test_catch_up_accounts_for_every_fire_since_and_runs_only_the_newest():
    """An hour without an owner: the newest fire (inside the grace) runs, every older one is
    recorded missed, so the history shows the gap instead of hiding it."""
    sched = Scheduler()
    sched.upsert("a", spec(misfire_grace="25s"), 1, T0 + s(45.5), since=T0 - s(3600))
    fires, _ = sched.tick(T0 + s(45.5))
    assert fires[-1].scheduled_for == T0 + s(40) and fires[-1].status is None
    missed = fires[:-1]
    assert {f.status for f in missed} == {"missed"}
    assert [f.scheduled_for for f in missed] == [T0 - s(3590) + s(10 * i) for i in range(363)]
    fires, _ = sched.tick(T0 + s(45.6))
    assert fires == []


# --- fires given ahead of their due time (claim_ahead) -----------------------------------------


def test_fires_are_given_ahead_in_batches_and_never_twice():
    sched = Scheduler(claim_ahead=2.0, max_sleep=60.0)
    sched.upsert("a", spec(schedule={"every": "1s"}), 1, T0)
    sched.upsert("b", spec(schedule={"every": "10s"}), 1, T0)
    fires, delay = sched.tick(T0)
    # everything due within 1.5 x 2 s: a's next three fires; b's first is 10 s away
    assert [(f.task_id, f.scheduled_for) for f in fires] == [("a", T0 + s(k)) for k in (1, 2, 3)]
    assert all(f.trigger == "schedule" and f.status is None for f in fires)
    assert delay == 2.0  # the next tick: when a's fire at 4 s is 2 s away
    seen = [f for f in fires]
    t = T0
    while t < T0 + s(30):
        t += s(0.1)
        fires, delay = sched.tick(t)
        for f in fires:  # given between 2 and 3 s before they are due
            assert s(2) <= f.scheduled_for - t <= s(3), (f, t)
        seen += fires
    given = [(f.task_id, f.scheduled_for) for f in seen]
    assert len(given) == len(set(given))  # never twice
    assert sorted(x for x in given if x[0] == "b") == [("b", T0 + s(10 * k)) for k in (1, 2, 3)]
    assert [x for x in given if x[0] == "a"] == [("a", T0 + s(k)) for k in range(1, 34)]


def test_fires_of_many_tasks_are_given_in_batches():
    sched = Scheduler(claim_ahead=2.0, max_sleep=60.0)
    for i in range(100):  # phases spread over 10 s
        sched.upsert(
            f"t{i}", spec(schedule={"every": "10s", "start": (T0 + s(i / 10)).isoformat()}), 1, T0
        )
    ticks = given = 0
    t = T0 + s(10)
    while t < T0 + s(70):
        fires, delay = sched.tick(t)
        ticks += bool(fires)
        given += len(fires)
        t += s(max(delay, 0.001))
    assert given >= 590
    assert ticks <= given / 5  # a tick gives about a second's worth of fires


def test_retries_and_keepalive_starts_are_given_at_their_due_time_only():
    sched = Scheduler(claim_ahead=2.0, max_sleep=60.0)
    sched.upsert("a", spec(schedule={"every": "10s"}), 1, T0)
    sched.upsert("k", spec(schedule={"keepalive": True}), 1, T0 + s(1))
    sched.retry("a", T0, 1, T0 + s(5))
    fires, delay = sched.tick(T0)
    assert fires == [] and delay == 1.0  # the keepalive start is due at 1 s
    fires, delay = sched.tick(T0 + s(1))
    assert [(f.task_id, f.trigger) for f in fires] == [("k", "schedule")]
    assert delay == 4.0  # the retry at 5 s (a's fire at 10 s is given from 8 s)
    fires, delay = sched.tick(T0 + s(4))
    assert fires == [] and delay == 1.0  # not a busy loop while the retry waits
    fires, delay = sched.tick(T0 + s(5))
    assert [(f.task_id, f.trigger, f.attempt) for f in fires] == [("a", "retry", 1)]
    assert delay == 3.0
    fires, _ = sched.tick(T0 + s(8))
    assert [(f.scheduled_for, f.trigger) for f in fires] == [(T0 + s(10), "schedule")]


def test_late_fires_follow_the_late_rule_and_the_next_ones_are_given_ahead():
    sched = Scheduler(claim_ahead=2.0)
    sched.upsert("a", spec(schedule={"every": "10s"}), 1, T0)
    fires, _ = sched.tick(T0 + s(28))  # paused: 10 and 20 are due, 30 is 2 s away
    assert [(f.scheduled_for, f.status, f.trigger) for f in fires] == [
        (T0 + s(10), "missed", "schedule"),
        (T0 + s(20), None, "catch-up"),
        (T0 + s(30), None, "schedule"),
    ]


def test_a_changed_task_is_given_its_new_schedule_from_now():
    """Fires given ahead under the old revision are given again when the new one has them
    (the agent finds them claimed already); the new schedule's other fires are not lost."""
    sched = Scheduler(claim_ahead=2.0)
    sched.upsert("a", spec(schedule={"every": "2s"}), 1, T0)
    fires, _ = sched.tick(T0)
    assert [f.scheduled_for for f in fires] == [T0 + s(2)]
    sched.upsert("a", spec(schedule={"every": "1s"}), 2, T0)
    fires, _ = sched.tick(T0 + s(0.5))
    assert [(f.scheduled_for, f.revision) for f in fires] == [
        (T0 + s(1), 2),
        (T0 + s(2), 2),
        (T0 + s(3), 2),
    ]


def test_has_fire_tells_whether_a_schedule_fires_at_a_time():
    from cloudtask.agent.scheduler import has_fire

    every = spec(schedule={"cron": "*/5 * * * * *"})
    assert has_fire(every, T0 + s(5)) and not has_fire(every, T0 + s(6))
    assert not has_fire(spec(schedule={"keepalive": True}), T0)
