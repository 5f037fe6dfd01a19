"""Events of the cluster, on the real MongoDB wire server and a real ZooKeeper: agents that
join, leave and come back (the leader's view), leadership, unassigned tasks, and an agent
killed with kill -9 end to end."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta

import pytest
from eventing import CONTRACT_FIELDS, NOW, PATHS, events
from helpers import make_task, wait_for
from kazoo.client import KazooClient
from test_cluster import SESSION, Cluster, agent_count, assignments, make_tasks

from cloudtask import events as ev
from cloudtask.center.center import Center
from cloudtask.config import Config
from cloudtask.zkpaths import encode

# --- agents (the leader's view, through record_agents) ----------------------------------------


def info(czxid: int, **more) -> dict:
    return {"group": "default", "host": "h1", "pid": 42, "czxid": czxid, **more}


def test_agents_joined_left_returned_once_each(store):
    t = NOW
    store.record_agents({"a1": info(10)}, now=t)
    store.record_agents({"a1": info(10)}, now=t + timedelta(seconds=1))  # the same view
    (joined,) = events(store)
    assert set(joined) == CONTRACT_FIELDS
    assert joined["_id"] == "agent.joined:a1:10"
    assert (joined["kind"], joined["severity"], joined["agent"]) == ("agent.joined", "info", "a1")
    assert joined["details"]["host"] == "h1" and joined["details"]["pid"] == 42
    assert joined["group"] == "default"

    store.record_agents({}, now=t + timedelta(seconds=2))  # kill -9: its registration is gone
    store.record_agents({}, now=t + timedelta(seconds=3))
    left = events(store, kind="agent.left")
    assert len(left) == 1 and left[0]["severity"] == "error"
    assert "session ended" in left[0]["message"] and left[0]["details"]["host"] == "h1"

    store.record_agents({"a1": info(20)}, now=t + timedelta(seconds=4))
    store.record_agents({"a1": info(20)}, now=t + timedelta(seconds=5))
    (back,) = events(store, kind="agent.returned")
    assert back["details"]["offline_since"] == (t + timedelta(seconds=2)).isoformat()
    assert [e["kind"] for e in events(store)] == ["agent.joined", "agent.left", "agent.returned"]

    # stopped cleanly (leaving), then restarted under a new registration no leader saw go
    store.record_agents({"a1": info(20, leaving=True)}, now=t + timedelta(seconds=6))
    store.record_agents({}, now=t + timedelta(seconds=7))
    stopped = events(store, kind="agent.left")[-1]
    assert "it stopped" in stopped["message"] and stopped["severity"] == "info"
    assert stopped["details"]["reason"] == "stopped"
    store.record_agents({"a1": info(30)}, now=t + timedelta(seconds=8))
    store.record_agents({"a1": info(40)}, now=t + timedelta(seconds=9))  # restarted unseen
    kinds = [e["kind"] for e in events(store)]
    assert kinds[3:] == ["agent.left", "agent.returned", "agent.left", "agent.returned"]
    assert store.agents.find_one({"_id": "a1"})["czxid"] == 40


def test_a_second_leader_does_not_record_an_agent_change_twice(store):
    """A leader recorded the events of a change but stopped before writing the agents: the
    next leader sees the same stored state and records the same ids (nothing new)."""
    store.record_agents({"a1": info(10), "a2": info(11)}, now=NOW)
    before = {d["_id"]: d for d in store.agents.find()}
    store.record_agents({"a2": info(11)}, now=NOW + timedelta(seconds=1))
    assert len(events(store, kind="agent.left")) == 1
    store.agents.replace_one({"_id": "a1"}, before["a1"])  # as if never written
    store.record_agents({"a2": info(11)}, now=NOW + timedelta(seconds=2))
    assert len(events(store, kind="agent.left")) == 1
    assert store.agents.find_one({"_id": "a1"})["status"] == "offline"


def registration(czxid: int) -> dict:
    """What an agent registers (and the leader stores as its info)."""
    return info(czxid, agent_id="a1", started_at="2026-12-01T03:00:00+00:00")


def test_a_clean_stop_the_leader_never_saw_leaving_is_no_alert(store):
    """The agent records its own departure (``agent_stopped``) before it deletes its
    registration; the leader, too slow to see ``leaving``, records the same id: one
    agent.left, "stopped", info; and the return after it is no alert either."""
    store.record_agents({"a1": registration(10)}, now=NOW)
    mine = ev.agent_stopped("a1", registration(10), 10, NOW + timedelta(seconds=1))
    assert store.record_event(mine)
    store.record_agents({}, now=NOW + timedelta(seconds=2))  # the node is gone, no leaving seen
    (left,) = events(store, kind="agent.left")
    assert left["_id"] == mine["_id"] == "agent.left:a1:10:1796094000000"
    assert left["severity"] == "info" and left["details"]["reason"] == "stopped"
    assert "stopped" in left["message"] and "crashed" not in left["message"]
    assert ev.clean_stop(left)
    stored = store.agents.find_one({"_id": "a1"})
    assert (stored["status"], stored["left_reason"]) == ("offline", "stopped")

    store.record_agents({"a1": registration(20)}, now=NOW + timedelta(seconds=30))
    (back,) = events(store, kind="agent.returned")
    assert back["severity"] == "info" and back["details"]["left_reason"] == "stopped"
    assert "after a clean stop" in back["message"] and ev.clean_stop(back)


def test_a_clean_stop_seen_only_when_the_agent_is_back_is_no_alert(store):
    """`cloudtask up` stopped with Ctrl-C: the agents and the center stop at once, so no
    leader sees them go; the next leader finds them registered again under new czxids."""
    store.record_agents({"a1": registration(10)}, now=NOW)
    store.record_event(ev.agent_stopped("a1", registration(10), 10, NOW + timedelta(seconds=1)))
    store.record_agents({"a1": registration(20)}, now=NOW + timedelta(seconds=60))
    kinds = [(e["kind"], e["severity"], ev.clean_stop(e)) for e in events(store)]
    assert kinds == [
        ("agent.joined", "info", False),
        ("agent.left", "info", True),
        ("agent.returned", "info", True),
    ]


def test_a_crash_stays_an_error_and_its_return_an_alert(store):
    store.record_agents({"a1": registration(10)}, now=NOW)
    store.record_agents({}, now=NOW + timedelta(seconds=2))  # the session ended: no stop
    (left,) = events(store, kind="agent.left")
    assert (left["severity"], left["details"]["reason"]) == ("error", "session ended")
    assert "killed, crashed or cut off" in left["message"] and not ev.clean_stop(left)
    assert store.agents.find_one({"_id": "a1"})["left_reason"] == "session ended"
    store.record_agents({"a1": registration(20)}, now=NOW + timedelta(seconds=30))
    (back,) = events(store, kind="agent.returned")
    assert back["message"] == "agent a1 is back (group default, host h1)"
    assert not ev.clean_stop(back)
    # a stop recorded for another registration (the one before) does not hide this crash
    store.record_event(ev.agent_stopped("a1", registration(10), 10, NOW))
    store.record_agents({}, now=NOW + timedelta(seconds=40))
    assert [e["severity"] for e in events(store, kind="agent.left")] == ["error", "error"]


# --- the leading center -----------------------------------------------------------------------


class Centers:
    """Centers in threads, each with its own ZooKeeper session."""

    def __init__(self, zk_hosts: str, store) -> None:
        self.zk_hosts, self.store = zk_hosts, store
        self.running: dict[str, tuple[Center, threading.Thread, KazooClient]] = {}

    def start(self, center_id: str, **options) -> Center:
        client = KazooClient(self.zk_hosts, timeout=2)
        client.start(timeout=15)
        cfg = Config().with_section("zookeeper", hosts=self.zk_hosts)
        options.setdefault("resync_interval", 0.3)
        center = Center(cfg, self.store, client, center_id=center_id, **options)
        thread = threading.Thread(target=center.run, daemon=True)
        thread.start()
        self.running[center_id] = (center, thread, client)
        return center

    def stop(self, center_id: str) -> None:
        center, thread, client = self.running.pop(center_id)
        center.stop()
        thread.join(timeout=30)
        client.stop()
        client.close()

    def stop_all(self) -> None:
        for center_id in list(self.running):
            self.stop(center_id)


@pytest.fixture
def centers(zk_hosts, store):
    running = Centers(zk_hosts, store)
    yield running
    running.stop_all()


@pytest.fixture
def fake_agent(zk_hosts):
    clients: list[KazooClient] = []

    def join(agent_id: str, group: str = "default") -> KazooClient:
        client = KazooClient(hosts=zk_hosts, timeout=2)
        client.start()
        client.ensure_path(PATHS.agent_group(group))
        doc = {"weight": 1, "host": "fake", "pid": 1}
        client.create(PATHS.agent(group, agent_id), encode(doc), ephemeral=True)
        clients.append(client)
        return client

    yield join
    for client in clients:
        client.stop()
        client.close()


def test_a_leader_change_records_center_leader(centers, store):
    first = centers.start("c1")
    wait_for(lambda: first.leading and first.reconciles, timeout=20)
    second = centers.start("c2")
    wait_for(lambda: events(store, kind="center.leader"), timeout=10)
    assert not second.leading
    centers.stop("c1")
    wait_for(lambda: second.leading and second.reconciles, timeout=20)
    led = events(store, kind="center.leader")
    assert [e["details"]["center_id"] for e in led] == ["c1", "c2"]
    assert led[0]["details"]["previous"] is None and led[1]["details"]["previous"] == "c1"
    assert "taking over from c1" in led[1]["message"] and led[1]["severity"] == "info"
    assert led[1]["_id"].startswith("center.leader:c2:") and set(led[1]) == CONTRACT_FIELDS


def test_a_group_without_agents_records_task_unassigned_once(centers, store, fake_agent, zk):
    task = make_task(store, "lonely", group="night")
    first = centers.start("c1", unassigned_grace=0)
    (event,) = wait_for(lambda: events(store, kind="task.unassigned"), timeout=20)
    assert (event["task_id"], event["task_name"], event["group"]) == (
        task["_id"],
        "lonely",
        "night",
    )
    assert event["severity"] == "error" and "group night has no live agent" in event["message"]
    passes = first.reconciles
    wait_for(lambda: first.reconciles >= passes + 5, timeout=20)
    assert len(events(store, kind="task.unassigned")) == 1  # not on every pass
    # the next leader starts from the /status its predecessor wrote: no second event
    second = centers.start("c2", unassigned_grace=0)
    centers.stop("c1")
    wait_for(lambda: second.leading and second.reconciles >= 3, timeout=20)
    assert len(events(store, kind="task.unassigned")) == 1
    # an agent comes, the task is placed; it goes, the task is unassigned again: a new event
    agent = fake_agent("n1", group="night")
    wait_for(lambda: zk.exists(PATHS.assignment("n1", task["_id"])), timeout=20)
    joined = wait_for(lambda: events(store, kind="agent.joined"), timeout=20)
    assert joined[0]["agent"] == "n1" and joined[0]["group"] == "night"
    agent.stop()
    agent.close()
    wait_for(lambda: len(events(store, kind="task.unassigned")) == 2, timeout=20)
    left = wait_for(lambda: events(store, kind="agent.left"), timeout=20)
    assert left[0]["agent"] == "n1" and left[0]["details"]["host"] == "fake"


def test_a_brief_gap_within_the_grace_is_no_event(centers, store):
    make_task(store, "lonely", group="night")
    center = centers.start("c1", unassigned_grace=600)
    wait_for(lambda: center.reconciles >= 5, timeout=20)
    assert center.unassigned  # it is unassigned, but not for long enough to alert
    assert events(store, kind="task.unassigned") == []


# --- end to end: an agent killed with kill -9 ---------------------------------------------------


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()


@pytest.mark.timeout(180)
def test_an_agent_stopped_while_no_center_runs_is_a_clean_stop(cluster, zk, store):
    """No leader sees the agent leaving (the center was killed first): the agent's own record
    of its stop makes the next leader's agent.left a clean stop, and its return no alert."""
    cluster.center("c1")
    cluster.agent("a1")
    wait_for(lambda: events(store, kind="agent.joined"), timeout=30)
    cluster.kill("c1")
    cluster.kill("a1", signal.SIGTERM)  # a clean stop, with no leader to see it
    (left,) = wait_for(lambda: events(store, kind="agent.left"), timeout=10)
    assert left["details"]["reason"] == "stopped" and left["severity"] == "info"
    cluster.center("c2")
    wait_for(
        lambda: store.agents.find_one({"_id": "a1"})["status"] == "offline", timeout=SESSION + 30
    )
    assert store.agents.find_one({"_id": "a1"})["left_reason"] == "stopped"
    assert len(events(store, kind="agent.left")) == 1
    cluster.agent("a1")
    (back,) = wait_for(lambda: events(store, kind="agent.returned"), timeout=30)
    assert ev.clean_stop(back) and "after a clean stop" in back["message"]


@pytest.mark.timeout(180)
def test_an_agent_killed_records_one_left_event_and_its_run_lost(cluster, zk, store):
    (task_id,) = make_tasks(store, 1, command=["sleep", "60"], schedule={"keepalive": True})
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    wait_for(lambda: len(assignments(zk)) == 1 and agent_count(zk) == 2, timeout=30)
    wait_for(lambda: len(events(store, kind="agent.joined")) == 2, timeout=30)
    run = wait_for(
        lambda: store.runs.find_one({"task_id": task_id, "status": "running"}), timeout=30
    )
    cluster.kill(run["agent"])
    lost = wait_for(
        lambda: events(store, kind="run.lost"), timeout=SESSION + 20, message="no run.lost"
    )
    assert [e["run_id"] for e in lost] == [run["_id"]]
    left = wait_for(lambda: events(store, kind="agent.left"), timeout=20)
    assert [e["agent"] for e in left] == [run["agent"]]
    assert left[0]["details"]["pid"] and left[0]["details"]["host"]
    assert len(events(store, kind="center.leader")) == 1
    cluster.kill("c1")  # another leader starts: the departure is not recorded again
    cluster.center("c2")
    led = wait_for(lambda: events(store, kind="center.leader")[1:], timeout=30)
    survivor = "a2" if run["agent"] == "a1" else "a1"
    wait_for(  # the new leader has recorded the agents it sees
        lambda: store.agents.find_one({"_id": survivor})["last_seen"] >= led[0]["at"],
        timeout=30,
    )
    assert store.agents.find_one({"_id": run["agent"]})["status"] == "offline"
    assert len(events(store, kind="agent.left")) == 1
    assert len(events(store, kind="run.lost")) == 1
