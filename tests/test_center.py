"""The leader in-process, with agents simulated by ZooKeeper sessions of their own: exact
write counts, garbage collection of a departed agent's assignments, stale assignments."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import wait_for
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from cloudtask.center import tasks as center_tasks
from cloudtask.center.center import Center
from cloudtask.center.writer import LeadershipLost, StaleView
from cloudtask.config import Config
from cloudtask.zkpaths import ZkPaths, encode

PATHS = ZkPaths("/cloudtask")


@pytest.fixture
def fake_agents(zk_hosts):
    clients: dict[str, KazooClient] = {}

    def join(agent_id: str) -> KazooClient:
        client = KazooClient(hosts=zk_hosts, timeout=2)
        client.start()
        client.ensure_path(PATHS.agent_group("default"))
        client.create(PATHS.agent("default", agent_id), encode({"weight": 1}), ephemeral=True)
        clients[agent_id] = client
        return client

    def leave(agent_id: str) -> None:
        client = clients.pop(agent_id)
        client.stop()  # closes the session: the registration goes at once
        client.close()

    yield join, leave
    for client in clients.values():
        client.stop()
        client.close()


@pytest.fixture
def center(zk, zk_hosts, store):
    cfg = Config().with_section("zookeeper", hosts=zk_hosts)
    c = Center(cfg, store, zk, center_id="c1", resync_interval=0.3, garbage_after=4.0)
    thread = threading.Thread(target=c.run, daemon=True)
    yield c, thread
    c.stop()
    thread.join(timeout=30)


def nodes(zk, agent_id: str) -> set[str]:
    try:  # the folder goes when the center collects a departed agent's garbage
        return set(zk.get_children(PATHS.assignment_dir(agent_id)))
    except NoNodeError:
        return set()


def test_writes_after_a_leave_are_the_moved_tasks_and_garbage_goes_later(
    zk, store, center, fake_agents
):
    join, leave = fake_agents
    for i in range(60):
        store.create_task({"name": f"t{i:02d}", "schedule": {"every": "1m"}, "command": "true"})
    for a in ("a1", "a2", "a3"):
        join(a)
    c, thread = center
    thread.start()
    wait_for(lambda: sum(len(nodes(zk, a)) for a in ("a1", "a2", "a3")) == 60, timeout=20)
    # the center counts a batch once its transaction returns, a moment after the nodes show
    wait_for(lambda: c.writes == 60, timeout=10, message="the first placement was not 60 writes")
    before = {a: nodes(zk, a) for a in ("a1", "a2", "a3")}
    writes = c.writes
    leave("a2")
    wait_for(
        lambda: nodes(zk, "a1") | nodes(zk, "a3") == before["a1"] | before["a2"] | before["a3"],
        timeout=10,
        message="a2's tasks did not move",
    )
    moved = len(before["a2"])
    assert nodes(zk, "a2") == before["a2"]  # left behind for now
    wait_for(lambda: c.writes - writes >= moved, timeout=10)
    passes = c.reconciles
    wait_for(lambda: c.reconciles >= passes + 3, timeout=10)  # resyncs (0.3 s) write nothing
    assert c.writes - writes == moved  # one create per moved task; nothing else on the way
    wait_for(
        lambda: not zk.exists(PATHS.assignment_dir("a2")), timeout=10, message="garbage stayed"
    )
    assert c.garbage_deleted == moved


def test_a_returning_agent_never_trusts_what_was_left_for_its_earlier_life(
    zk, store, center, fake_agents
):
    join, leave = fake_agents
    for i in range(20):
        store.create_task({"name": f"t{i:02d}", "schedule": {"every": "1m"}, "command": "true"})
    join("a1")
    join("a2")
    c, thread = center
    thread.start()
    wait_for(lambda: len(nodes(zk, "a1")) + len(nodes(zk, "a2")) == 20, timeout=20)
    leave("a2")
    wait_for(lambda: len(nodes(zk, "a1")) == 20, timeout=10)
    client = join("a2")  # back before the garbage was collected
    registered = client.exists(PATHS.agent("default", "a2")).czxid
    # every assignment it has now was written after it registered again
    wait_for(
        lambda: (
            (got := nodes(zk, "a2"))
            and all(
                (stat := zk.exists(PATHS.assignment("a2", t))) is not None
                and stat.mzxid > registered
                for t in got
            )
        ),
        timeout=10,
        message="stale assignments were kept for the returning agent",
    )
    wait_for(lambda: len(nodes(zk, "a1")) + len(nodes(zk, "a2")) == 20, timeout=10)


def test_a_stale_view_is_read_again_before_anything_else_is_written(zk, store, fake_agents):
    """A pass whose transaction finds an assignment it did not expect writes nothing, forgets
    its view of the assignments and reads them all again; the next pass places on what is
    there."""
    join, _ = fake_agents
    for path in PATHS.persistent_folders():
        zk.ensure_path(path)
    fence = zk.create(f"{PATHS.election}/fence", b"")
    join("a1")
    first = store.create_task({"name": "t1", "schedule": {"every": "1m"}, "command": "true"})
    cfg = Config().with_section("zookeeper", hosts="unused:2181")
    c = Center(cfg, store, zk, center_id="c1", notify=False)
    c.writer.fence = fence  # leads (as _lead would set it)
    c._rebuild()
    assert c.reconcile() == 1
    second = store.create_task({"name": "t2", "schedule": {"every": "1m"}, "command": "true"})
    behind = {"task_id": second["_id"], "revision": 1, "epoch": 0, "for_agent": 0, "spec": {}}
    zk.create(PATHS.assignment("a1", second["_id"]), encode(behind))  # behind the leader's back
    with pytest.raises(StaleView):
        c.reconcile()
    assert set(c.writer.placed["a1"]) == {first["_id"], second["_id"]}
    writes = c.writes
    # the node found there was written after the agent registered (the agent acts on it):
    # the next pass keeps it and writes nothing
    assert c.reconcile() == 0 and c.writes == writes
    assert nodes(zk, "a1") == {first["_id"], second["_id"]}
    zk.delete(fence)  # deposed: nothing more is written
    store.create_task({"name": "t3", "schedule": {"every": "1m"}, "command": "true"})
    with pytest.raises(LeadershipLost):
        c.reconcile()
    assert nodes(zk, "a1") == {first["_id"], second["_id"]}


def test_a_standby_reads_ahead_but_a_new_leader_places_from_a_read_begun_after_it_was_elected(
    zk, zk_hosts, store, fake_agents, monkeypatch
):
    """A standby center keeps the tasks read (its task feed), so taking over needs only the
    changes; but a task edited while it stood by, with no signal, is placed at its new
    revision: the first pass waits for a read begun after the election, never placing the
    warm copy (older than what the previous leader may have written)."""
    join, _ = fake_agents
    join("a1")
    task = store.create_task({"name": "t1", "schedule": {"every": "1m"}, "command": "true"})
    other = KazooClient(hosts=zk_hosts, timeout=5)
    other.start()
    release = threading.Event()
    elected = threading.Event()

    def lead() -> None:
        elected.set()
        release.wait(30)

    holder = threading.Thread(target=other.Election(PATHS.election, "c0").run, args=(lead,))
    holder.start()
    assert elected.wait(10)
    cfg = Config().with_section("zookeeper", hosts=zk_hosts)
    c = Center(cfg, store, zk, center_id="c1", resync_interval=3600.0, notify=False)
    read = center_tasks.refresh_tasks

    def slow_once_leading(*args, **kwargs):  # a slow store: the read after the election lags
        if c.leading:
            time.sleep(1.0)
        return read(*args, **kwargs)

    monkeypatch.setattr(center_tasks, "refresh_tasks", slow_once_leading)
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: c.feed.reads >= 1, timeout=10, message="the standby read no tasks")
        assert not c.leading and c.feed.snapshot()[task["_id"]].revision == 1
        store.tasks.update_one(  # edited behind the standby's back: no signal, no read
            {"_id": task["_id"]}, {"$set": {"spec.command": "false"}, "$inc": {"revision": 1}}
        )
        release.set()
        holder.join(10)
        wait_for(lambda: nodes(zk, "a1") == {task["_id"]}, timeout=15, message="not placed")
        data, _ = zk.get(PATHS.assignment("a1", task["_id"]))
        doc = json.loads(data)
        assert (doc["revision"], doc["spec"]["command"]) == (2, "false")
        assert c.writes == 1  # placed once, at the new revision
    finally:
        release.set()
        c.stop()
        thread.join(timeout=30)
        other.stop()
        other.close()
