"""Run parameters and backfill (real store, a real agent in a thread, real processes judged by
their own execution records): a manual run's parameters reach its process on top of the
task's env; a backfill runs each fire time of a past range once, under its own fire time,
one after the other for a forbid task, and a second backfill of the same range runs nothing."""

from __future__ import annotations

import sys
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from helpers import wait_for
from test_agent import Running

from cloudtask.exceptions import ValidationError
from cloudtask.operations import Operations
from cloudtask.testing.records import overlaps, read_records, recording_command

PY = sys.executable


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


def test_a_manual_runs_parameters_reach_its_process_over_the_tasks_env(store, agents, tmp_path):
    seen = tmp_path / "seen"
    ops = Operations(store)
    task = ops.create_task(
        "alice",
        {
            "name": "report",
            "schedule": {"every": "1h"},
            "env": {"DAY": "today", "KEEP": "kept"},
            "command": [
                PY,
                "-c",
                f"import os; open({str(seen)!r}, 'a').write("
                "os.environ['DAY'] + '|' + os.environ['KEEP'] + '|' + os.environ.get('EXTRA', '') + '\\n')",
            ],
        },
    )
    with pytest.raises(ValidationError) as e:
        ops.run_now("alice", task["_id"], env={"1BAD": "x"})
    assert [p.path for p in e.value.problems] == ["env.1BAD"]
    with pytest.raises(ValidationError):
        ops.run_now("alice", task["_id"], env={"DAY": {"secret": "x"}})
    agents.start("a1")
    run = ops.run_now("alice", task["_id"], env={"DAY": "2026-12-01", "EXTRA": "two words"})
    done = wait_for(
        lambda: store.runs.find_one({"_id": run["_id"], "status": "succeeded"}),
        timeout=30,
        message="the run with parameters did not succeed",
    )
    assert done["env"] == {"DAY": "2026-12-01", "EXTRA": "two words"}
    assert seen.read_text() == "2026-12-01|kept|two words\n"
    audit = store.audit.find_one({"action": "task.run"})
    assert audit["after"]["env"] == {"DAY": "2026-12-01", "EXTRA": "two words"}


def test_a_backfill_runs_each_past_fire_once_one_after_the_other(store, agents, tmp_path):
    records = tmp_path / "records"
    ops = Operations(store)
    task = ops.create_task(
        "alice",
        {
            "name": "hourly",
            "schedule": {"every": "1h"},
            "command": recording_command(records, work="sleep 0.3", lock=tmp_path / "lock"),
        },
    )
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=4), hour - timedelta(hours=1)
    result = ops.backfill("alice", task["_id"], start.isoformat(), end.isoformat())
    assert (result["queued"], result["existing"]) == (4, 0)
    assert (result["first"], result["last"]) == (start, end)
    agents.start("a1")
    wait_for(
        lambda: store.runs.count_documents({"task_id": task["_id"], "status": "succeeded"}) >= 4,
        timeout=60,
        message="the backfill did not run",
    )
    again = ops.backfill("alice", task["_id"], start.isoformat(), end.isoformat())
    assert (again["queued"], again["existing"]) == (0, 4)
    seen = read_records(records)
    fires = Counter(r.scheduled_for for r in seen if r.kind == "start")
    assert sorted(fires) == [start + timedelta(hours=h) for h in range(4)]
    assert set(fires.values()) == {1}  # each fire once
    assert overlaps(seen) == []  # forbid: one after the other
    docs = list(store.runs.find({"task_id": task["_id"], "trigger": "backfill"}))
    assert len(docs) == 4 and {d["status"] for d in docs} == {"succeeded"}


def test_a_backfill_says_what_is_wrong_with_its_range(store):
    ops = Operations(store)
    task = ops.create_task("alice", {"name": "t", "schedule": {"every": "1m"}, "command": "x"})
    live = ops.create_task("alice", {"name": "k", "schedule": {"keepalive": True}, "command": "x"})
    now = datetime.now(timezone.utc)
    cases = [
        (task, "yesterday", now.isoformat(), "start"),
        (task, now.isoformat(), (now - timedelta(hours=1)).isoformat(), "end"),
        (
            task,
            (now - timedelta(hours=1)).isoformat(),
            (now + timedelta(hours=1)).isoformat(),
            "end",
        ),
        (task, (now - timedelta(days=2)).isoformat(), now.isoformat(), "end"),  # > 1,000 fires
        (live, (now - timedelta(hours=1)).isoformat(), now.isoformat(), "schedule"),
    ]
    for doc, start, end, path in cases:
        with pytest.raises(ValidationError) as e:
            ops.backfill("alice", doc["_id"], start, end)
        assert path in [p.path for p in e.value.problems], (start, end, e.value.problems)
    assert store.runs.count_documents({}) == 0
