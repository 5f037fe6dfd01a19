"""Plans end to end: submitted through the API (JSON and XML), validated whole (an invalid
plan stores nothing), idempotent by external id, queued per type and taken by free agents
only (never more than ``max_parallel`` at once on one agent), every item run once; failed
attempts retried on any agent; an agent killed with SIGKILL mid-way has its running items
run again elsewhere as new attempts. Once-only and no-overlap are judged by what the items
themselves recorded (cloudtask/testing/records.py), never by counting documents."""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter, defaultdict

import pytest
from helpers import ADMIN, OPERATOR, VIEWER, make_web_app, wait_for
from test_agent import Running
from test_cluster import Cluster

from cloudtask.config import load_config
from cloudtask.operations import Operations
from cloudtask.testing.records import Record, read_records, recording_command
from cloudtask.users import Users

PY = sys.executable


@pytest.fixture
def app(store):
    app = make_web_app(store, config=load_config(None, environ={}), users=[ADMIN, OPERATOR, VIEWER])
    users = Users(store)
    app.tokens = {  # type: ignore[attr-defined]
        "operator": users.create_token(OPERATOR.name, "tests"),
        "viewer": users.create_token(VIEWER.name, "tests"),
    }
    return app


def call(app, method: str, path: str, role: str = "operator", **kwargs):
    headers = {"Authorization": f"Bearer {app.tokens[role]}", **kwargs.pop("headers", {})}
    return app.test_client().open(f"/api/v1{path}", method=method, headers=headers, **kwargs)


def counts(store) -> tuple[int, int, int]:
    return (
        store.runs.count_documents({}),
        store.db["plans"].count_documents({}),
        store.db["plan_keys"].count_documents({}),
    )


def items(n: int, command, **extra) -> list[dict]:
    return [{"type": "etl", "name": f"item-{i:03d}", "command": command, **extra} for i in range(n)]


def concurrency(records: list[Record]) -> dict[str, int]:
    """The most runs at once on each agent, from the runs' own start and end records."""
    points = defaultdict(list)
    for r in records:
        if r.kind in ("start", "end"):
            # at the same instant an end comes before a start
            points[r.agent].append((r.time, 0 if r.kind == "end" else 1))
    most = {}
    for agent, marks in points.items():
        now = peak = 0
        for _, kind in sorted(marks):
            now += 1 if kind else -1
            peak = max(peak, now)
        most[agent] = peak
    return most


# --- submitting -------------------------------------------------------------------------------


def test_an_invalid_plan_stores_nothing_and_every_problem_is_named(app, store):
    before = counts(store)
    bad = {
        "items": [
            {"type": "etl", "command": "true"},
            {"type": "etl"},  # nothing to run
            {"type": "etl", "command": "true", "schedule": {"every": "1m"}},
            {"type": "etl", "command": "true", "priority": "high"},
        ]
    }
    answer = call(app, "POST", "/plans", json=bad)
    assert answer.status_code == 422, answer.get_json()
    paths = {d["path"] for d in answer.get_json()["details"]}
    assert any(p.startswith("items[1]") for p in paths), paths
    assert {"items[2].schedule", "items[3].priority"} <= paths, paths
    assert not any(p.startswith("items[0]") for p in paths)
    assert counts(store) == before  # nothing stored
    assert (
        call(
            app, "POST", "/plans", data=b"<plan><item", headers={"Content-Type": "application/xml"}
        ).status_code
        == 422
    )
    assert (
        call(app, "POST", "/plans", "viewer", json={"items": items(1, "true")}).status_code == 403
    )
    assert counts(store) == before


def test_a_plan_submitted_again_with_the_same_external_ids_is_not_stored_twice(app, store):
    plan = {
        "name": "nightly",
        "items": [
            {"type": "etl", "command": "true", "external_id": "a-1"},
            {"type": "etl", "command": "true", "external_id": "a-2", "priority": 7},
            {"type": "report", "command": ["echo", "x"]},
        ],
    }
    first = call(app, "POST", "/plans", json=plan)
    assert first.status_code == 201, first.get_json()
    receipt = first.get_json()
    assert receipt["accepted"] == 3 and receipt["existing"] == 0
    runs_after_first = store.runs.count_documents({})
    again = call(app, "POST", "/plans", json=plan).get_json()
    assert again["accepted"] == 1 and again["existing"] == 2  # the item without an id is new
    assert [i["item_id"] for i in again["items"][:2]] == [
        i["item_id"] for i in receipt["items"][:2]
    ]
    assert all(i["existing"] for i in again["items"][:2])
    assert store.runs.count_documents({}) == runs_after_first + 1
    shown = call(app, "GET", f"/plans/{receipt['plan_id']}", "viewer").get_json()
    assert shown["total"] == 3 and shown["counts"] == {"queued": 3} and not shown["done"]
    assert [i["name"] for i in shown["items"]] == ["etl-1", "etl-2", "report-3"]
    queued = call(app, "GET", f"/plans/{receipt['plan_id']}/items?state=queued", "viewer")
    assert len(queued.get_json()["items"]) == 3
    assert call(app, "GET", "/plans/nope", "viewer").status_code == 404


def test_the_xml_form_is_the_same_plan(app, store):
    xml = b"""<?xml version="1.0"?>
<plan name="from-upstream">
  <task type="etl" name="load-eu" external_id="x-1" priority="5" retries="1">
    <command>echo eu</command>
    <env name="LEVEL">info</env>
  </task>
  <item type="etl"><arg>echo</arg><arg>two words</arg></item>
</plan>"""
    answer = call(app, "POST", "/plans", data=xml, headers={"Content-Type": "application/xml"})
    assert answer.status_code == 201, answer.get_json()
    receipt = answer.get_json()
    assert [i["name"] for i in receipt["items"]] == ["load-eu", "etl-2"]
    doc = store.runs.find_one({"task_id": receipt["items"][0]["item_id"]})
    assert (
        doc["priority"] == 5
        and doc["max_attempts"] == 2
        and doc["item"]["env"] == {"LEVEL": "info"}
    )


# --- running: agents in threads ------------------------------------------------------------------


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


def test_300_items_over_3_agents_each_run_once_never_more_than_4_at_once(store, agents, tmp_path):
    records = tmp_path / "records"
    ops = Operations(store)
    command = recording_command(records, work="sleep 0.1")
    receipt = ops.submit_plan("upstream", {"items": items(300, command)})
    for agent_id in ("a1", "a2", "a3"):
        agents.start(agent_id, group="etl", max_parallel=4, poll_interval=0.5)
    wait_for(
        lambda: store.get_plan(receipt["plan_id"])["done"],
        timeout=180,
        interval=0.5,
        message="the plan did not complete",
    )
    plan = store.get_plan(receipt["plan_id"])
    assert plan["counts"] == {"succeeded": 300}
    seen = read_records(records)
    starts = Counter(r.task for r in seen if r.kind == "start")
    assert len(starts) == 300 and set(starts.values()) == {1}, "an item ran twice or not at all"
    peaks = concurrency(seen)
    assert max(peaks.values()) <= 4, peaks
    assert len(peaks) == 3, f"not every agent took items: {peaks}"


def test_a_failed_attempt_is_retried_and_an_item_out_of_attempts_fails(store, agents, tmp_path):
    marks = tmp_path / "marks"
    ops = Operations(store)
    flaky = [
        PY,
        "-c",
        (
            "import os, sys\n"
            f"open({str(marks)!r}, 'a').write(os.environ['CLOUDTASK_ITEM_ID'] + ' '"
            " + os.environ['CLOUDTASK_ATTEMPT'] + ' ' + os.environ['CLOUDTASK_PLAN_ID'] + '\\n')\n"
            "sys.exit(0 if os.environ['CLOUDTASK_ATTEMPT'] == '1' else 3)\n"
        ),
    ]
    receipt = ops.submit_plan(
        "upstream",
        {
            "items": [
                {"type": "etl", "name": "flaky", "command": flaky, "retries": 2},
                {"type": "etl", "name": "hopeless", "command": ["false"], "retries": 1},
            ]
        },
    )
    agents.start("a1", group="etl", max_parallel=2, poll_interval=0.3)
    agents.start("a2", group="etl", max_parallel=2, poll_interval=0.3)
    wait_for(lambda: store.get_plan(receipt["plan_id"])["done"], timeout=60, interval=0.3)
    by_name = {i["name"]: i for i in store.plan_items(receipt["plan_id"])}
    assert by_name["flaky"]["state"] == "succeeded" and by_name["flaky"]["attempt"] == 1
    assert by_name["hopeless"]["state"] == "failed" and by_name["hopeless"]["attempt"] == 1
    flaky_id = by_name["flaky"]["item_id"]
    lines = marks.read_text().split("\n")[:-1]
    assert lines == [f"{flaky_id} 0 {receipt['plan_id']}", f"{flaky_id} 1 {receipt['plan_id']}"]
    assert store.get_plan(receipt["plan_id"])["counts"] == {"failed": 1, "succeeded": 1}


# --- a real cluster: an agent killed with SIGKILL mid-way -----------------------------------------


def test_items_of_an_agent_killed_mid_way_run_again_elsewhere_as_attempts(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store
):
    records = tmp_path / "records"
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    cluster.env["CLOUDTASK_AGENT_GROUP"] = "etl"
    cluster.env["CLOUDTASK_AGENT_MAX_PARALLEL"] = "3"
    command = recording_command(records, work="sleep 3")
    try:
        cluster.center("c1")
        for agent_id in ("a1", "a2", "a3"):
            cluster.agent(agent_id)
        receipt = Operations(store).submit_plan(
            "upstream", {"items": items(18, command, retries=2)}
        )
        # a1 is killed once it runs items
        wait_for(
            lambda: any(r.agent == "a1" and r.kind == "start" for r in read_records(records)),
            timeout=60,
            message="a1 took no item",
        )
        cluster.kill("a1", signal.SIGKILL)
        killed_at = time.time()
        wait_for(
            lambda: store.get_plan(receipt["plan_id"])["done"],
            timeout=120,
            interval=0.5,
            message="the plan did not complete after a1 was killed",
        )
    finally:
        cluster.stop_all()
    plan = store.get_plan(receipt["plan_id"])
    assert plan["counts"] == {"succeeded": 18}, plan["counts"]
    seen = read_records(records)
    cut = {r.task for r in seen if r.agent == "a1" and r.kind == "start"} - {
        r.task for r in seen if r.agent == "a1" and r.kind == "end"
    }
    assert cut, "a1 was killed with no item running"
    for task in cut:  # each cut item ran again, as a later attempt, on another agent
        again = [r for r in seen if r.task == task and r.kind == "end" and r.agent != "a1"]
        assert again and all(r.attempt >= 1 for r in again), (task, again)
        assert min(r.time for r in again) > killed_at
    fires = Counter((r.task, r.attempt) for r in seen if r.kind == "start")
    assert set(fires.values()) == {1}, "an attempt started twice"
    assert max(concurrency(seen).values()) <= 3


def test_a_plan_cancelled_without_the_cluster_drops_what_waits_and_is_audited(store):
    """Killing running items needs ZooKeeper: without it the plan is still cancelled (its
    waiting items dropped, no further attempt) and the refusal to kill is said, and audited."""
    from cloudtask.exceptions import Conflict

    ops = Operations(store)  # no ZooKeeper
    receipt = ops.submit_plan("upstream", {"items": items(3, "true")})
    running = receipt["items"][0]["item_id"]
    store.runs.update_one(
        {"task_id": running}, {"$set": {"status": "running", "agent": "a1", "session": "s"}}
    )
    with pytest.raises(Conflict, match="ZooKeeper"):
        ops.cancel_plan("alice", receipt["plan_id"])
    states = Counter(i["state"] for i in store.plan_items(receipt["plan_id"]))
    assert states == {"killed": 2, "running": 1}
    entry = store.audit.find_one({"action": "plan.cancel"})
    assert entry is not None and entry["actor"] == "alice"
    assert entry["after"] == {"dropped": 2, "killing": 0, "not_killed": 1}


def test_a_plan_completes_when_every_process_is_killed_and_started_again_mid_way(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store
):
    """kill -9 of the center and every agent while items run, then all started again: the
    plan completes, every item succeeds once, and no item that had finished runs again."""
    records = tmp_path / "records"
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    cluster.env["CLOUDTASK_AGENT_GROUP"] = "etl"
    cluster.env["CLOUDTASK_AGENT_MAX_PARALLEL"] = "3"
    command = recording_command(records, work="sleep 1.5")
    names = ("c1", "a1", "a2", "a3")
    try:
        cluster.center("c1")
        for agent_id in names[1:]:
            cluster.agent(agent_id)
        receipt = Operations(store).submit_plan(
            "upstream", {"items": items(24, command, retries=3)}
        )
        wait_for(
            lambda: sum(1 for r in read_records(records) if r.kind == "end") >= 6,
            timeout=60,
            message="no items finished before the restart",
        )
        for name in names:
            cluster.kill(name, signal.SIGKILL)
        killed_at = time.time()
        finished_before = {
            r.task for r in read_records(records) if r.kind == "end" and r.time < killed_at
        }
        cluster.center("c1")
        for agent_id in names[1:]:
            cluster.agent(agent_id)
        wait_for(
            lambda: store.get_plan(receipt["plan_id"])["done"],
            timeout=150,
            interval=0.5,
            message="the plan did not complete after every process was restarted",
        )
    finally:
        cluster.stop_all()
    assert store.get_plan(receipt["plan_id"])["counts"] == {"succeeded": 24}
    seen = read_records(records)
    succeeded = Counter(r.task for r in seen if r.kind == "end" and r.exit_code == 0)
    assert set(succeeded) == {f"item-{i:03d}" for i in range(24)}
    assert set(succeeded.values()) == {1}, "an item succeeded twice"
    for task in finished_before:  # a finished item never started again after the restart
        assert not [r for r in seen if r.task == task and r.kind == "start" and r.time > killed_at]
    assert Counter((r.task, r.attempt) for r in seen if r.kind == "start").most_common(1)[0][1] == 1
