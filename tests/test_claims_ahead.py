"""Claims made ahead of their due time (agent/armed.py), under real faults between the claim
and the due time: kill -9 of the agent (it comes back; it never comes back), SIGSTOP past
its session, and its link to MongoDB cut. Judged by what the task itself recorded (each run
appends its own start and end): a fire never starts twice, never starts on an agent that
lost its fence, and its document ends saying what happened."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from helpers import make_task, wait_for
from test_cluster import SESSION, Cluster, agent_count, assignments, no_fire_twice, settled

from cloudtask.runmodel import FINISHED_STATUSES
from cloudtask.testing import TcpProxy
from cloudtask.testing.records import read_records, recording_command
from cloudtask.zkpaths import ZkPaths, request_kill

AHEAD = 6  # seconds: a wide window between the claim and the due time
EVERY_10S = {"cron": "*/10 * * * * *"}  # fires 10 s apart: one claim at a time to aim at


@pytest.fixture
def ahead(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    c.env["CLOUDTASK_AGENT_CLAIM_AHEAD"] = f"{AHEAD}s"
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def task(store, records, name: str = "t", **over: Any) -> str:
    spec = {"schedule": EVERY_10S, "command": recording_command(records)}
    spec.update(misfire="run_once", misfire_grace="1h")
    return make_task(store, name, **{**spec, **over})["_id"]


def claimed_ahead(store, task_id: str, lead: float = 3.0) -> dict | None:
    """A claim of the task made ahead and due at least ``lead`` seconds from now."""
    soon = datetime.now(timezone.utc) + timedelta(seconds=lead)
    for doc in store.runs.find({"task_id": task_id, "status": "claimed"}):
        if doc["scheduled_for"] >= soon:
            return doc
    return None


def settled_run(store, run_id: str, quiet: float = 5.0, timeout: float = 90.0) -> dict:
    """The run once it is finished and has stayed so, unchanged, for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        doc = store.get_run(run_id)
        key = (doc["status"], doc.get("agent"), doc.get("session"))
        if key != last:
            last, since = key, time.monotonic()
        elif doc["status"] in FINISHED_STATUSES and time.monotonic() - since >= quiet:
            return doc
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never settled (last: {last})")


def owner_of(zk, task_id: str) -> str:
    """The agent the task is placed on, once the placement has settled."""
    wait_for(lambda: any(task_id in t for t in assignments(zk).values()), timeout=30)
    (owner,) = [a for a, tasks in settled(zk).items() if task_id in tasks]
    return owner


def two_agents_and_a_claim(ahead: Cluster, zk, store, task_id: str) -> tuple[str, str, dict]:
    """Two agents, then a center (the task is placed once, not moved at the start): the
    task's owner, the other agent, and a claim the owner made ahead, 3 s or more before due."""
    ahead.agent("a1")
    ahead.agent("a2")
    wait_for(lambda: agent_count(zk) == 2, timeout=30)
    ahead.center("c1")
    owner = owner_of(zk, task_id)
    doc = wait_for(
        lambda: (d := claimed_ahead(store, task_id)) and d["agent"] == owner and d,
        timeout=60,
        message="no claim ahead",
    )
    return owner, "a2" if owner == "a1" else "a1", doc


@contextmanager
def claim_behind_proxy(
    ahead: Cluster, store, task_id: str, mongo_server, lead: float
) -> Iterator[tuple[TcpProxy, dict]]:
    """Agent a1 talking to MongoDB through a proxy (the center straight), and a claim a1 made
    ahead, due ``lead`` seconds or more from now."""
    with TcpProxy(("127.0.0.1", mongo_server.port)) as proxy:
        ahead.env["CLOUDTASK_MONGO_URI"] = proxy.mongo_uri
        ahead.agent("a1")
        ahead.env["CLOUDTASK_MONGO_URI"] = mongo_server.uri
        ahead.center("c1")
        doc = wait_for(
            lambda: claimed_ahead(store, task_id, lead=lead), timeout=60, message="no claim ahead"
        )
        yield proxy, doc


def starts_of(records, run_id: str) -> list:
    return [r for r in read_records(records) if r.kind == "start" and r.run_id == run_id]


@pytest.mark.timeout(180)
def test_a_claim_of_an_agent_killed_before_its_due_time_runs_once_after_it_returns(
    ahead, zk, store
):
    """kill -9 while the claim waits for its time; the agent starts again at once: its run
    journal says the claim never started, so it is released and run (at its time, or caught
    up), once."""
    records = ahead.records
    task_id = task(store, records)
    ahead.center("c1")
    ahead.agent("a1")
    doc = wait_for(lambda: claimed_ahead(store, task_id), timeout=60, message="no claim ahead")
    assert doc["agent"] == "a1" and doc["started_at"] is None
    ahead.kill("a1")  # SIGKILL, with the claim stored and its due time still to come
    assert starts_of(records, doc["_id"]) == []
    ahead.agent("a1")
    ran = wait_for(
        lambda: store.get_run(doc["_id"])["status"] == "succeeded" and store.get_run(doc["_id"]),
        timeout=60,
        message="the claim of the killed agent never ran",
    )
    (start,) = starts_of(records, doc["_id"])  # once
    assert start.agent == "a1"
    assert start.time >= doc["scheduled_for"].timestamp() - 0.05  # never before its time
    assert ran["trigger"] in ("schedule", "catch-up")
    # later fires run on time, once each
    wait_for(
        lambda: store.runs.count_documents({"task_id": task_id, "status": "succeeded"}) >= 2,
        timeout=30,
    )
    ahead.stop_all()
    no_fire_twice(records)


@pytest.mark.timeout(180)
def test_a_claim_of_an_agent_killed_for_good_is_never_started_and_never_unrecorded(
    ahead, zk, store
):
    """kill -9 of the task's agent while its claim waits; it never comes back. The other
    agent runs the task from then on. The claim's agent may have started it for all the
    leader knows (a claim carries no start): it is recorded ``lost`` with that said, and
    nothing ran it."""
    records = ahead.records
    task_id = task(store, records)
    owner, other, doc = two_agents_and_a_claim(ahead, zk, store, task_id)
    ahead.kill(owner)
    final = wait_for(
        lambda: (d := store.get_run(doc["_id"]))["status"] not in ("claimed", "queued") and d,
        timeout=SESSION + 60,
        message="the dead agent's claim was never settled",
    )
    assert final["status"] == "lost" and "may never have started" in final["error"]
    assert starts_of(records, doc["_id"]) == []
    # the task goes on on the other agent
    wait_for(
        lambda: (
            store.runs.count_documents({"task_id": task_id, "status": "succeeded", "agent": other})
            >= 1
        ),
        timeout=40,
    )
    ahead.stop_all()
    no_fire_twice(records)


@pytest.mark.timeout(180)
def test_an_agent_frozen_between_claim_and_due_time_never_starts_the_claim(ahead, zk, store):
    """SIGSTOP while the claim waits, past its session and past the due time: the task moves
    to the other agent. Woken up, the frozen agent must not start the claim (its fence is
    gone): it hands it back, and the fire is run once by the new owner or recorded."""
    records = ahead.records
    task_id = task(store, records)
    owner, other, doc = two_agents_and_a_claim(ahead, zk, store, task_id)
    frozen = ahead.procs[owner]
    frozen.send_signal(signal.SIGSTOP)
    try:
        due = doc["scheduled_for"].timestamp()
        wait_for(lambda: task_id in assignments(zk).get(other, set()), timeout=SESSION + 20)
        time.sleep(max(0.0, due - time.time()) + 1.0)  # its due time passes while frozen
    finally:
        frozen.send_signal(signal.SIGCONT)
    # (``lost`` from the leader is not final: the woken agent knows it never started the
    # claim, and hands it back, which replaces the verdict)
    final = settled_run(store, doc["_id"])
    starts = starts_of(records, doc["_id"])
    if final["status"] in ("succeeded", "failed"):
        # handed back and taken over, once, under another session than the frozen claim's
        # (by the other agent, or by the owner once it is registered again)
        assert len(starts) == 1 and final["session"] != doc["session"], (final, starts)
        assert final.get("released_by") == owner
    else:
        assert starts == [] and final["status"] in ("missed", "lost", "skipped"), (
            {k: final.get(k) for k in ("status", "error", "agent", "session", "trigger")},
            doc["session"],
            owner,
        )
    # the task goes on
    later = {
        "task_id": task_id,
        "status": "succeeded",
        "scheduled_for": {"$gt": doc["scheduled_for"]},
    }
    wait_for(lambda: store.runs.find_one(later), timeout=40)
    ahead.stop_all()
    no_fire_twice(records)


@pytest.mark.timeout(180)
def test_a_claim_starts_on_time_while_its_agent_is_cut_from_mongodb(ahead, zk, store, mongo_server):
    """The agent's link to MongoDB is cut after the claim landed: at the due time nothing is
    asked of MongoDB, so the run starts on time; its outcome is written once the link is
    back."""
    records = ahead.records
    task_id = task(store, records)
    with claim_behind_proxy(ahead, store, task_id, mongo_server, lead=2.0) as (proxy, doc):
        proxy.cut()
        try:
            due = doc["scheduled_for"].timestamp()
            (start,) = wait_for(
                lambda: starts_of(records, doc["_id"]),
                timeout=AHEAD + 15,
                message="the claim did not start while MongoDB was cut",
            )
            assert due - 0.05 <= start.time <= due + 2.0  # on time (generous: a shared machine)
            assert store.get_run(doc["_id"])["status"] == "claimed"  # nothing written yet
        finally:
            proxy.forward()
        wait_for(
            lambda: store.get_run(doc["_id"])["status"] == "succeeded",
            timeout=40,
            message="the run's outcome was not written after the link came back",
        )
        ahead.stop_all()
    no_fire_twice(records)


@pytest.mark.timeout(180)
def test_a_kill_request_stays_until_its_outcome_is_stored_even_across_a_kill_9(
    ahead, zk, store, mongo_server
):
    """A kill request for a claim made ahead reaches its agent while the agent is cut from
    MongoDB: the claim is taken out and recorded killed there, but that cannot be stored, so
    the request stays in ZooKeeper. The agent is killed (-9) before the link heals; when it
    comes back, its recovery releases the claim, and the request, still there, kills it: the
    run ends killed, never started."""
    records = ahead.records
    task_id = task(store, records)
    paths = ZkPaths("/cloudtask")
    with claim_behind_proxy(ahead, store, task_id, mongo_server, lead=4.0) as (proxy, doc):
        proxy.cut()
        request_kill(zk, paths, "a1", doc["_id"], "killed by test")
        node = paths.kill("a1", doc["_id"])
        time.sleep(max(0.0, doc["scheduled_for"].timestamp() - time.time()) + 2.0)
        assert starts_of(records, doc["_id"]) == []  # taken out: not started at its time
        assert zk.exists(node), "the request went before the run's outcome was stored"
        assert store.get_run(doc["_id"])["status"] == "claimed"
        ahead.kill("a1")
    ahead.agent("a1")  # straight to MongoDB now
    final = settled_run(store, doc["_id"])
    assert final["status"] == "killed", final
    assert "killed by test" in final["error"]
    wait_for(lambda: not zk.exists(node), timeout=30, message="the kill request stayed")
    wait_for(
        lambda: store.runs.count_documents({"task_id": task_id, "status": "succeeded"}) >= 1,
        timeout=40,
        message="the task did not go on",
    )
    ahead.stop_all()
    assert starts_of(records, doc["_id"]) == []
    no_fire_twice(records)
