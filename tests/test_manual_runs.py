"""Manual runs ("run now"): stored first, taken by exactly one agent, never lost silently;
and the agents the leading center records for the web site."""

from __future__ import annotations

import time

import pytest
from helpers import holds, wait_for
from test_agent import Running
from test_cluster import Cluster, agent_count, assignments, make_tasks, spread_over

from cloudtask.exceptions import Conflict
from cloudtask.operations import Operations
from cloudtask.zkpaths import ZkPaths


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()


def hourly(store, name="job", **over):
    data = {"name": name, "schedule": {"every": "1h"}, "command": "echo manual-$CLOUDTASK_TRIGGER"}
    data["shell"] = True
    data.update(over)
    return store.create_task(data)


def test_run_now_is_stored_first_then_taken_and_run(store, agents):
    task = hourly(store)
    ops = Operations(store)
    run = ops.run_now("alice", task["_id"])
    stored = store.get_run(run["_id"])
    assert stored["status"] == "queued" and stored["agent"] is None
    assert stored["trigger"] == "manual" and stored["requested_by"] == "alice"
    agents.start("a1")
    done = wait_for(
        lambda: store.get_run(run["_id"])["status"] == "succeeded" and store.get_run(run["_id"]),
        timeout=20,
        message="the manual run did not finish",
    )
    assert done["agent"] == "a1" and done["token_hash"]
    assert "manual-manual" in done["output_tail"]
    # the task remembers its last run; the audit log says who asked
    # (copied onto the task right after the run's own write)
    last = wait_for(lambda: store.get_task(task["_id"]).get("last_run"), timeout=10)
    assert last["status"] == "succeeded"
    entry = store.audit.find_one({"action": "task.run"})
    assert entry["actor"] == "alice" and entry["after"] == {"run_id": run["_id"]}


def test_a_paused_task_can_be_run_by_hand_and_stays_paused(store, agents):
    task = hourly(store, enabled=False)
    agents.start("a1")
    run = Operations(store).run_now("bob", task["_id"])
    wait_for(lambda: store.get_run(run["_id"])["status"] == "succeeded", timeout=20)
    assert store.get_task(task["_id"])["enabled"] is False
    holds(lambda: store.runs.count_documents({"task_id": task["_id"]}) == 1, 1.0)  # no schedule


def test_only_one_agent_takes_a_manual_run(store):
    task = hourly(store)
    run = Operations(store).run_now("alice", task["_id"])
    first = store.take_pending_run(run["_id"], "a1", None, "h1")
    second = store.take_pending_run(run["_id"], "a2", None, "h2")
    assert first is not None and first["agent"] == "a1"
    assert second is None
    assert store.pending_runs("default") == []


def test_a_manual_run_no_agent_took_can_be_cancelled(store, agents):
    task = hourly(store)
    ops = Operations(store)
    run = ops.run_now("alice", task["_id"])
    ops.kill_run("carol", run["_id"])
    cancelled = store.get_run(run["_id"])
    assert cancelled["status"] == "killed" and "carol" in cancelled["error"]
    with pytest.raises(Conflict, match="not running"):
        ops.kill_run("carol", run["_id"])
    agents.start("a1")
    holds(lambda: store.get_run(run["_id"])["status"] == "killed", 1.0)  # none resurrects it


def test_keepalive_tasks_cannot_be_run_by_hand(store):
    task = store.create_task({"name": "svc", "schedule": {"keepalive": True}, "command": "true"})
    with pytest.raises(Conflict, match="keepalive"):
        Operations(store).run_now("alice", task["_id"])
    assert store.runs.count_documents({}) == 0


def test_forbid_skips_a_manual_run_while_one_is_going(store, agents):
    task = hourly(store, command="sleep 3", concurrency="forbid")
    agents.start("a1")
    ops = Operations(store)
    first = ops.run_now("alice", task["_id"])
    wait_for(lambda: store.get_run(first["_id"])["status"] == "running", timeout=20)
    second = ops.run_now("alice", task["_id"])
    skipped = wait_for(
        lambda: (
            store.get_run(second["_id"])["status"] == "skipped" and store.get_run(second["_id"])
        ),
        timeout=20,
    )
    assert "forbid" in skipped["error"]
    wait_for(lambda: store.get_run(first["_id"])["status"] == "succeeded", timeout=20)


def test_in_a_cluster_the_owner_takes_the_run_at_once_and_waiting_runs_are_not_lost(
    cluster, zk, store
):
    (task_id,) = make_tasks(store, 1, schedule={"every": "1h"})
    # a long poll: only the signal can make the owner look for the waiting run in time
    cluster.env["CLOUDTASK_AGENT_POLL_INTERVAL"] = "60s"
    cluster.agent("a1")
    cluster.agent("a2")
    # the center starts once both agents are there: the task is placed once, not first on
    # whichever agent came first and then moved
    wait_for(lambda: agent_count(zk) == 2, timeout=30)
    cluster.center("c1")
    placed = wait_for(lambda: spread_over(zk, 1, 1), timeout=30, message="task not placed")
    (owner,) = placed
    ops = Operations(store, zk, ZkPaths("/cloudtask"))
    started = time.monotonic()
    run = ops.run_now("alice", task_id)
    done = wait_for(
        lambda: store.get_run(run["_id"])["status"] == "succeeded" and store.get_run(run["_id"]),
        timeout=40,  # well under the 60 s poll: a loaded machine took over 20 s once
    )
    # the signal wakes the owner: it does not wait for its poll (60 s here)
    assert done["agent"] == owner, (done["agent"], assignments(zk))
    assert done["started_at"].timestamp() - done["claimed_at"].timestamp() < 15
    assert time.monotonic() - started < 40
    # the leader records the agents for the web site
    recorded = wait_for(lambda: {a["_id"]: a for a in store.list_agents()}.keys() >= {"a1", "a2"})
    assert recorded
    agents = {a["_id"]: a for a in store.list_agents()}
    assert agents["a1"]["status"] == "online" and agents["a1"]["info"]["pid"] > 0
    # a manual run of a task whose group has no agent waits (it is not marked lost)
    other = store.create_task(
        {"name": "nowhere", "group": "empty", "schedule": {"every": "1h"}, "command": "true"}
    )
    waiting = ops.run_now("alice", other["_id"])
    cluster.kill("a2")
    wait_for(
        lambda: {a["_id"]: a["status"] for a in store.list_agents()}.get("a2") == "offline",
        timeout=30,
        message="the departed agent is not recorded offline",
    )
    assert store.get_run(waiting["_id"])["status"] == "queued"
