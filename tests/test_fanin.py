"""Fan-in: a task that runs after its parents (``"schedule": {"after": [...]}``) fires once
per logical date, the date of the parents' fire times in its time zone, once every parent
succeeded for it; what it waits for is said; cycles and unknown parents are refused when it
is saved. The cluster test runs real processes (ZooKeeper, the MongoDB wire server, a center,
an agent) over a day boundary, judged by the runs' own execution records."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from helpers import task_spec, wait_for
from test_cluster import Cluster

from cloudtask.dependencies import dependency_status
from cloudtask.exceptions import ValidationError
from cloudtask.operations import Operations
from cloudtask.runmodel import new_run_document
from cloudtask.task import parse_task
from cloudtask.testing.records import read_records, recording_command


def zone_past_midnight(now: datetime) -> str:
    """A fixed-offset zone whose last midnight was 20 to 80 minutes before ``now``."""
    target = 0 if now.minute >= 20 else 1
    offset = (target - now.hour) % 24
    if offset > 14:
        offset -= 24
    if offset == 0:
        return "UTC"
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"  # (POSIX signs are inverted)


def test_three_parents_over_a_day_boundary_fire_the_child_once_for_their_date(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store
):
    records = tmp_path / "records"
    now = datetime.now(timezone.utc)
    tz = zone_past_midnight(now)
    local = now.astimezone(ZoneInfo(tz))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    assert timedelta(minutes=19) < local - midnight < timedelta(minutes=81)
    yesterday = (midnight - timedelta(days=1)).date()
    # the parents fired before midnight (their date is yesterday, there) and run now, after
    # it, as catch-ups: a child judging by the time they finished would run for today
    for i, name in enumerate(("pa", "pb", "pc")):
        fire = midnight - timedelta(seconds=30 - 5 * i)
        spec = task_spec(
            name,
            schedule={"at": fire.astimezone(timezone.utc).isoformat()},
            misfire_grace="3h",
            command=recording_command(records, work="sleep 0.5"),
        )
        # (created before its fire time, as if an hour ago: its fire is then a catch-up)
        store.create_task(parse_task(spec), now=fire - timedelta(minutes=5))
    child = Operations(store).create_task(
        "alice",
        {
            "name": "report",
            "schedule": {"after": ["pa", "pb", "pc"], "timezone": tz},
            "command": recording_command(records),
        },
    )
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    try:
        cluster.center("c1")
        cluster.agent("a1")
        run = wait_for(
            lambda: store.runs.find_one({"task_id": child["_id"], "status": "succeeded"}),
            timeout=90,
            message="the child did not run after its parents",
        )
        time.sleep(5)  # the leader looks again and again: no second fire
    finally:
        cluster.stop_all()
    assert run["trigger"] == "after" and run["after_date"] == yesterday.isoformat()
    start_of_day = datetime.combine(yesterday, datetime.min.time(), ZoneInfo(tz))
    assert run["scheduled_for"] == start_of_day.astimezone(timezone.utc)
    assert set(run["parents"]) == {"pa", "pb", "pc"}
    seen = read_records(records)
    starts = Counter(r.task for r in seen if r.kind == "start")
    assert starts == {"pa": 1, "pb": 1, "pc": 1, "report": 1}, starts
    child_start = next(r.time for r in seen if r.task == "report" and r.kind == "start")
    parents_ended = max(r.time for r in seen if r.task != "report" and r.kind == "end")
    assert child_start > parents_ended  # after every parent, not before
    status = dependency_status(store, child["spec"])
    assert status["summary"] == "every parent succeeded"
    assert status["date"] == yesterday.isoformat()


def parent_run(store, task: dict, at: datetime, status: str) -> None:
    doc = new_run_document(
        task_id=task["_id"],
        task_name=task["name"],
        group="default",
        revision=1,
        scheduled_for=at,
        slot="one",
        attempt=0,
        trigger="schedule",
        agent="a1",
        status=status,
        now=at,
    )
    store.runs.insert_one(doc)


def test_what_a_child_waits_for_is_said(store):
    ops = Operations(store)
    a = ops.create_task("alice", {"name": "a", "schedule": {"every": "1h"}, "command": "true"})
    b = ops.create_task("alice", {"name": "b", "schedule": {"every": "1h"}, "command": "true"})
    spec = {"name": "c", "schedule": {"after": ["a", "b"]}, "command": "true"}
    ops.create_task("alice", spec)
    at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    parent_run(store, a, at, "succeeded")
    status = dependency_status(store, spec)
    assert status["summary"] == "waiting for b"
    assert [p["state"] for p in status["parents"]] == ["succeeded", "waiting"]
    parent_run(store, b, at, "failed")
    assert dependency_status(store, spec)["summary"] == "held: b failed"
    ops.set_enabled("alice", b["_id"], False)
    assert dependency_status(store, spec)["parents"][1]["state"] == "failed"  # (its run)


def test_cycles_and_unknown_parents_are_refused_when_saved(store):
    ops = Operations(store)
    ops.create_task("alice", {"name": "a", "schedule": {"every": "1h"}, "command": "true"})
    ops.create_task("alice", {"name": "b", "schedule": {"after": ["a"]}, "command": "true"})
    ops.create_task("alice", {"name": "c", "schedule": {"after": ["b"]}, "command": "true"})
    with pytest.raises(ValidationError) as e:
        ops.create_task("alice", {"name": "d", "schedule": {"after": ["nope"]}, "command": "x"})
    assert [(p.path, p.message) for p in e.value.problems] == [
        ("schedule.after[0]", "no task named 'nope'")
    ]
    a = store.get_task_by_name("a")
    with pytest.raises(ValidationError) as e:  # a after c: a -> c -> b -> a
        ops.replace_task(
            "alice", a["_id"], {"name": "a", "schedule": {"after": ["c"]}, "command": "true"}
        )
    assert e.value.problems[0].path == "schedule.after[0]"
    assert "a cycle: a -> c -> b -> a" in e.value.problems[0].message
    with pytest.raises(ValidationError, match="a cycle: e -> e"):
        ops.create_task("alice", {"name": "e", "schedule": {"after": ["e"]}, "command": "true"})
    assert [c["name"] for c in store.children_of("b")] == ["c"]


def test_the_task_page_and_the_api_show_parents_children_and_what_it_waits_for(store):
    from helpers import OPERATOR, VIEWER, make_web_app, web_login

    from cloudtask.config import load_config

    ops = Operations(store)
    a = ops.create_task("alice", {"name": "a", "schedule": {"every": "1h"}, "command": "true"})
    ops.create_task("alice", {"name": "b", "schedule": {"every": "1h"}, "command": "true"})
    c = ops.create_task("alice", {"name": "c", "schedule": {"after": ["a", "b"]}, "command": "x"})
    parent_run(store, a, datetime.now(timezone.utc) - timedelta(minutes=1), "failed")
    app = make_web_app(store, config=load_config(None, environ={}), users=[OPERATOR, VIEWER])
    client = app.test_client()
    web_login(client, VIEWER.name, VIEWER.password, "/")
    page = client.get(f"/tasks/{c['_id']}").get_data(as_text=True)
    assert "held: a failed" in page and f"/tasks/{a['_id']}" in page
    import web.tasks

    web.tasks._AFTER_GRAPH["at"] = -1e9  # (read the graph of this test's tasks now)
    parent_page = client.get(f"/tasks/{a['_id']}").get_data(as_text=True)
    assert "Runs before:" in parent_page and f"/tasks/{c['_id']}" in parent_page
    api = client.get(f"/api/v1/tasks/{c['_id']}").get_json()
    assert api["dependencies"]["summary"] == "held: a failed"
    assert [p["state"] for p in api["dependencies"]["parents"]] == ["failed", "waiting"]
    assert api["next_fires"] == []
