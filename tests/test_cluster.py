"""The cluster end to end: real ZooKeeper, real MongoDB wire server, centers and agents as
separate processes, killed with SIGKILL and SIGTERM.

Longer than the other files on purpose: its first 160 lines are the harness (``Cluster``, the
placement readers) that the event tests import too, and each test after it is one failover
story told from start to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import holds, make_task, wait_for
from kazoo.exceptions import NoNodeError

from cloudtask.operations import Operations
from cloudtask.store import Store
from cloudtask.testing.records import duplicate_starts, overlaps, read_records, recording_command
from cloudtask.zkpaths import ZkPaths, decode, task_signal

SESSION = 2.0  # seconds: short, so failover is quick here


class Cluster:
    def __init__(self, zk_hosts: str, mongo_uri: str, db: str, tmp: Path) -> None:
        self.env = {
            **os.environ,
            "CLOUDTASK_ZK_HOSTS": zk_hosts,
            "CLOUDTASK_ZK_SESSION_TIMEOUT": f"{SESSION}s",
            "CLOUDTASK_MONGO_URI": mongo_uri,
            "CLOUDTASK_MONGO_DATABASE": db,
            "CLOUDTASK_AGENT_KILL_GRACE": "1s",
            "CLOUDTASK_CONFIG": "",
        }
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.records = tmp / "records"  # what the tasks themselves did (testing/records.py)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtask", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def agent(self, agent_id: str) -> subprocess.Popen:
        return self._spawn(
            agent_id, ["agent", "--id", agent_id, "--data-dir", str(self.tmp / agent_id)]
        )

    def center(self, center_id: str) -> subprocess.Popen:
        return self._spawn(center_id, ["center", "--id", center_id])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def assignments(zk) -> dict[str, set[str]]:
    """What each registered agent acts on: assignments written after it registered (what a
    departed agent leaves behind is deleted later, and ignored by a returning one). Nodes come
    and go while this reads (a killed agent's session expires, the leader moves tasks): one
    that vanished between listing and reading counts as absent."""
    paths = ZkPaths("/cloudtask")

    def children(path: str) -> list[str]:
        try:
            return zk.get_children(path)
        except NoNodeError:
            return []

    registered = {}
    for group in children(paths.agents):
        for agent_id in children(paths.agent_group(group)):
            try:
                data, stat = zk.get(paths.agent(group, agent_id))
            except NoNodeError:
                continue
            if not (decode(data) or {}).get("leaving"):
                registered[agent_id] = stat.czxid
    out: dict[str, set[str]] = {}
    for agent_id in children(paths.assignments):
        if agent_id not in registered:
            continue
        tasks = set()
        for task_id in children(paths.assignment_dir(agent_id)):
            stat = zk.exists(paths.assignment(agent_id, task_id))
            if stat is not None and stat.mzxid > registered[agent_id]:
                tasks.add(task_id)
        out[agent_id] = tasks
    return {a: t for a, t in out.items() if t}


def spread_over(zk, agents: int, tasks: int) -> dict[str, set[str]] | None:
    """The assignments, once ``tasks`` tasks are placed over exactly ``agents`` agents."""
    placed = assignments(zk)
    if len(placed) == agents and sum(map(len, placed.values())) == tasks:
        return placed
    return None


def settled(zk, quiet: float = 3.0, timeout: float = 30.0) -> dict[str, set[str]]:
    """The assignments once they have stayed the same for ``quiet`` seconds (the leader may
    make a second pass, to even out loads, right after a move; on two cores loaded by other
    tests a pass can take more than a second, so the quiet is generous)."""
    last, since = assignments(zk), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = assignments(zk)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError("the assignments never settled")


def agent_count(zk) -> int:
    group = "/cloudtask/agents/default"
    return len(zk.get_children(group)) if zk.exists(group) else 0


def leader(zk) -> str | None:
    paths = ZkPaths("/cloudtask")
    if not zk.exists(paths.election):
        return None
    contenders = zk.Election(paths.election).contenders()
    return contenders[0] if contenders else None


def make_tasks(store: Store, n: int, records: Path | None = None, **spec) -> list[str]:
    """``n`` tasks every second; with ``records``, each run appends its own start and end."""
    command = recording_command(records) if records is not None else "true"
    ids = []
    for i in range(n):
        over = {"schedule": {"every": "1s"}, "command": command, **spec}
        ids.append(make_task(store, f"t{i:03d}", **over)["_id"])
    return ids


def no_fire_twice(records: Path, per_agent: tuple[str, ...] = ()) -> None:
    """From what the tasks did: fires ran, none started twice (per agent for mode ``all``),
    and no run of a locked task started while another still held its lock."""
    seen = read_records(records)
    assert [r for r in seen if r.kind == "start"], "no task recorded a start"
    assert duplicate_starts(seen, per_agent) == []
    assert overlaps(seen) == []


@pytest.mark.timeout(240)
def test_failover_moves_only_the_dead_agents_tasks(cluster, zk, store):
    ids = make_tasks(store, 60, cluster.records)
    cluster.center("c1")
    cluster.center("c2")
    for a in ("a1", "a2", "a3"):
        cluster.agent(a)
    wait_for(
        lambda: spread_over(zk, agents=3, tasks=60),
        timeout=30,
        message="60 tasks never spread over 3 agents",
    )
    placed = settled(zk)  # the agents join one by one: a pass may still even out the loads
    assert len(placed) == 3 and all(len(tasks) >= 5 for tasks in placed.values())
    assert set().union(*placed.values()) == set(ids)
    wait_for(
        lambda: store.runs.count_documents({"agent": "a2", "status": "succeeded"}) > 0, timeout=15
    )

    # kill -9 an agent: its tasks move to the others, theirs stay exactly as they were
    cluster.kill("a2")
    killed_at = time.monotonic()
    wait_for(
        lambda: "a2" not in (p := assignments(zk)) and sum(map(len, p.values())) == 60 and p,
        timeout=SESSION + 10,
        message="a2's tasks did not move",
    )
    took = time.monotonic() - killed_at
    moved = settled(zk)
    assert took < SESSION + 8, f"failover took {took:.1f} s"  # generous: 2 loaded cores
    for agent in ("a1", "a3"):
        assert placed[agent] <= moved[agent]
    assert moved["a1"] - placed["a1"] | moved["a3"] - placed["a3"] == placed["a2"]
    # the moved tasks fire on their new agents
    some = next(iter(placed["a2"]))
    wait_for(
        lambda: store.runs.count_documents(
            {"task_id": some, "agent": {"$in": ["a1", "a3"]}, "status": "succeeded"}
        ),
        timeout=10,
        message="a moved task did not fire on its new agent",
    )

    # restart it: only tasks the ring gives back move, all of them to a2
    cluster.agent("a2")
    back = wait_for(
        lambda: spread_over(zk, agents=3, tasks=60), timeout=20, message="a2 got nothing back"
    )
    for agent in ("a1", "a3"):
        assert back[agent] <= moved[agent]  # lost only what went to a2
    assert back["a2"] == (moved["a1"] - back["a1"]) | (moved["a3"] - back["a3"])

    # the leading center dies: another leads and nothing moves
    first = leader(zk)
    assert first in ("c1", "c2")
    cluster.kill(first)
    second = wait_for(
        lambda: (lead := leader(zk)) not in (None, first) and lead, timeout=SESSION + 10
    )
    assert second in ("c1", "c2")
    holds(lambda: assignments(zk) == back, 1.5, message="the new leader moved tasks")

    cluster.stop_all()
    no_fire_twice(cluster.records)
    assert store.runs.count_documents({"status": "running"}) == 0
    # a claim still waiting for its slot at the stop is handed back, not left claimed
    for doc in store.runs.find({"status": "queued"}):
        assert doc["agent"] is None and doc["released_by"], doc
    every_fire_accounted_for(store, ids)


def every_fire_accounted_for(store: Store, task_ids: list[str]) -> None:
    """From its first recorded fire to its last, every 1 s fire of each task ran or was
    recorded (missed, caught up): through kill -9, restarts and a leader change."""
    for task_id in task_ids:
        times = sorted(
            d["scheduled_for"] for d in store.runs.find({"task_id": task_id, "attempt": 0})
        )
        gaps = [(a, b) for a, b in zip(times, times[1:]) if (b - a).total_seconds() != 1.0]
        assert not gaps, f"task {task_id}: fires not accounted for between {gaps[:3]}"


@pytest.mark.timeout(120)
def test_sigterm_moves_tasks_at_once(cluster, zk, store):
    make_tasks(store, 20, cluster.records)
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    placed = wait_for(
        lambda: spread_over(zk, agents=2, tasks=20),
        timeout=30,
    )
    wait_for(lambda: store.runs.count_documents({"agent": "a1", "status": "succeeded"}), timeout=15)
    cluster.kill("a1", signal.SIGTERM)
    started = time.monotonic()
    wait_for(
        lambda: assignments(zk).get("a2", set()) >= placed["a1"] | placed["a2"],
        timeout=10,
        interval=0.02,
    )
    assert time.monotonic() - started < 1.5  # the session closes at once; no timeout to wait for
    moved = next(iter(placed["a1"]))
    wait_for(
        lambda: store.runs.find_one({"task_id": moved, "agent": "a2", "status": "succeeded"}),
        timeout=10,
    )
    cluster.stop_all()
    no_fire_twice(cluster.records)


@pytest.mark.timeout(180)
def test_sigterm_hands_over_at_once_while_mongodb_is_stalled(cluster, zk, store, mongo_server):
    """The MongoDB server frozen (SIGSTOP): an agent stopped with SIGTERM still hands its
    tasks over at once (the leader places from the tasks it read last) and exits within its
    bounded stop; nothing runs twice, and once MongoDB answers again the moved tasks run."""
    make_tasks(store, 10, cluster.records)
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    placed = wait_for(lambda: spread_over(zk, agents=2, tasks=10), timeout=30)
    wait_for(lambda: store.runs.count_documents({"agent": "a1", "status": "succeeded"}), timeout=15)
    proc = cluster.procs.pop("a1")
    os.kill(mongo_server.pid, signal.SIGSTOP)
    try:
        # a pass now: its upkeep waits for the frozen server (and would hold up the next
        # placement, were the upkeep not on a thread of its own)
        task_signal(zk, ZkPaths("/cloudtask"))()
        time.sleep(1.0)  # the agents' calls are in flight against a frozen server
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        wait_for(
            lambda: assignments(zk).get("a2", set()) >= placed["a1"] | placed["a2"],
            timeout=15,
            interval=0.02,
        )
        moved_after = time.monotonic() - started
        proc.wait(timeout=30)
        exited_after = time.monotonic() - started
    finally:
        os.kill(mongo_server.pid, signal.SIGCONT)
    assert moved_after < 3.0, moved_after
    assert exited_after < 20.0, exited_after
    moved = next(iter(placed["a1"]))
    wait_for(
        lambda: store.runs.find_one({"task_id": moved, "agent": "a2", "status": "succeeded"}),
        timeout=30,
    )
    cluster.stop_all()
    no_fire_twice(cluster.records)


@pytest.mark.timeout(120)
def test_task_changes_reach_the_agent_within_a_second(cluster, zk, store):
    ops = Operations(store, zk, ZkPaths("/cloudtask"))  # signals the leader, as people's changes do
    (task_id,) = make_tasks(store, 1, command=[sys.executable, "-c", "print('v1')"])
    cluster.center("c1")
    cluster.agent("a1")
    wait_for(lambda: store.runs.find_one({"task_id": task_id, "output_tail": "v1\n"}), timeout=30)
    spec = store.get_task(task_id)["spec"]
    changed_at = time.time()
    ops.replace_task("test", task_id, {**spec, "command": [sys.executable, "-c", "print('v2')"]})
    run = wait_for(
        lambda: store.runs.find_one({"task_id": task_id, "output_tail": "v2\n"}), timeout=10
    )
    # the first fire after the change (fires are 1 s apart) already runs the new definition
    assert run["scheduled_for"].timestamp() - changed_at < 2.5
    ops.set_enabled("test", task_id, False)
    wait_for(lambda: not assignments(zk), timeout=5, message="a paused task stayed assigned")
    ops.set_enabled("test", task_id, True)
    wait_for(lambda: assignments(zk), timeout=5, message="a resumed task was not assigned")
    ops.delete_task("test", task_id)
    wait_for(lambda: not assignments(zk), timeout=5, message="a deleted task stayed assigned")


@pytest.mark.timeout(120)
def test_mode_all_and_a_group_without_agents(cluster, zk, store):
    command = recording_command(cluster.records, lock=cluster.tmp / "all.lock", lock_per_agent=True)
    everywhere = store.create_task(
        {"name": "all", "schedule": {"every": "1s"}, "command": command, "mode": "all"}
    )
    nowhere = store.create_task(
        {"name": "lonely", "group": "empty", "schedule": {"every": "1s"}, "command": "true"}
    )
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    wait_for(
        lambda: assignments(zk) == {"a1": {everywhere["_id"]}, "a2": {everywhere["_id"]}},
        timeout=30,
        message="mode all was not placed on both agents",
    )
    wait_for(
        lambda: (
            {
                d["agent"]
                for d in store.runs.find({"task_id": everywhere["_id"], "status": "succeeded"})
            }
            == {"a1", "a2"}
        ),
        timeout=10,
    )
    assert store.runs.count_documents({"task_id": nowhere["_id"]}) == 0
    status = decode(zk.get("/cloudtask/status")[0])
    assert status["unassigned"] == {nowhere["_id"]: "empty"}
    assert status["leader"] == "c1" and status["agents"] == ["a1", "a2"]
    cluster.stop_all()
    no_fire_twice(cluster.records, per_agent=("all",))


@pytest.mark.timeout(120)
def test_duplicate_agent_id_is_refused(cluster, zk, store):
    cluster.center("c1")
    cluster.agent("a1")
    wait_for(lambda: zk.exists("/cloudtask/agents/default/a1"), timeout=20)
    dup = cluster._spawn("a1-dup", ["agent", "--id", "a1", "--data-dir", str(cluster.tmp / "dup")])
    assert dup.wait(timeout=30) != 0
    assert "in use by a running agent" in cluster.log("a1-dup")


@pytest.mark.timeout(120)
def test_lost_runs_are_marked_by_the_leader(cluster, zk, store):
    (task_id,) = make_tasks(store, 1, command=["sleep", "60"], schedule={"keepalive": True})
    cluster.agent("a1")
    cluster.agent("a2")
    # the center starts once both agents are there: the task is placed once, not first on
    # whichever agent came first (whose instance would end when the task moves)
    wait_for(lambda: agent_count(zk) == 2, timeout=30)
    cluster.center("c1")
    wait_for(lambda: len(assignments(zk)) == 1, timeout=30)
    run = wait_for(
        lambda: store.runs.find_one({"task_id": task_id, "status": "running"}), timeout=30
    )
    owner = run["agent"]
    other = "a2" if owner == "a1" else "a1"
    cluster.kill(owner)
    wait_for(
        lambda: store.get_run(run["_id"])["status"] == "lost",
        timeout=SESSION + 30,  # the session ends, then the run's beat stays unchanged a grace
        message="not marked lost",
    )
    assert "left the cluster" in store.get_run(run["_id"])["error"]
    # the keepalive task restarts on its new owner
    wait_for(
        lambda: store.runs.find_one({"task_id": task_id, "status": "running", "agent": other}),
        timeout=60,  # the dead instance's lease (30 s) must expire first
        message="keepalive did not restart on the new owner",
    )
    doc = decode(zk.get(f"/cloudtask/agents/default/{other}")[0])
    assert doc["pid"] == cluster.procs[other].pid and doc["host"]


@pytest.mark.timeout(180)
def test_paused_agent_fires_nothing_twice(cluster, zk, store):
    make_tasks(store, 10, cluster.records)
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    placed = wait_for(
        lambda: spread_over(zk, agents=2, tasks=10),
        timeout=30,
    )
    wait_for(
        lambda: store.runs.count_documents({"agent": "a1", "status": "succeeded"}) >= 3, timeout=15
    )
    cluster.procs["a1"].send_signal(signal.SIGSTOP)  # a frozen process: no heartbeat, no session
    try:
        wait_for(lambda: assignments(zk).get("a2", set()) >= placed["a1"], timeout=SESSION + 10)
        time.sleep(2.0)  # a2 runs a1's tasks for a while
    finally:
        resumed = datetime.now(timezone.utc)
        cluster.procs["a1"].send_signal(signal.SIGCONT)
    # a1 wakes up with an expired session: it must claim nothing for the tasks it lost,
    # register again, and get back what the ring gives it
    back = wait_for(
        lambda: assignments(zk).get("a1"), timeout=SESSION + 15, message="a1 never came back"
    )
    stats = [zk.exists(f"/cloudtask/assignments/a1/{t}") for t in back]
    # mtime: the leader gives a returning agent its old nodes again with a set (they are kept
    # as garbage for a while), so their ctime is from before the pause
    mtimes = [stat.mtime for stat in stats if stat is not None]
    assert mtimes, "a1's assignments vanished as soon as it got them"
    regained = datetime.fromtimestamp(min(mtimes) / 1000, timezone.utc)  # when it got tasks again
    time.sleep(3.0)
    cluster.stop_all()
    no_fire_twice(cluster.records)
    assert "session lost" in cluster.log("a1")
    # (claims another agent made ahead and released when the tasks came back, taken over
    # by a1, keep their first claim's time: they are not a1's claims)
    stale = store.runs.count_documents(
        {"agent": "a1", "claimed_at": {"$gte": resumed, "$lt": regained}, "released_by": None}
    )
    assert stale == 0, f"a1 claimed {stale} fires before it was given tasks again"


@pytest.mark.timeout(120)
def test_expired_session_drops_and_regains_assignments(
    cluster, zk, zk_hosts, mongo_client, mongo_db_name, tmp_path, store
):
    """Kazoo-style fault injection: another client takes the agent's session id and closes it."""
    import threading

    from kazoo.client import KazooClient

    from cloudtask.agent.cluster import ClusterAgent
    from cloudtask.config import Config

    ids = make_tasks(store, 3, cluster.records)
    cluster.center("c1")
    cfg = (
        Config()
        .with_section("zookeeper", hosts=zk_hosts, session_timeout=SESSION)
        .with_section("agent", data_dir=str(tmp_path / "inproc"), kill_grace=1.0)
    )
    client = KazooClient(hosts=zk_hosts, timeout=SESSION)
    client.start()
    agent = ClusterAgent(cfg, Store(mongo_client, mongo_db_name), client, agent_id="inproc")
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: assignments(zk).get("inproc") == set(ids), timeout=30)
        wait_for(lambda: store.runs.count_documents({"status": "succeeded"}) >= 3, timeout=15)
        old_session = agent.session
        thief = KazooClient(hosts=zk_hosts, client_id=client.client_id, timeout=SESSION)
        thief.start()
        thief.stop()
        thief.close()  # closing the session the agent was using: the server expires it
        wait_for(
            lambda: agent.session not in (None, old_session),
            timeout=SESSION + 15,
            message="no new session",
        )
        wait_for(lambda: assignments(zk).get("inproc") == set(ids), timeout=SESSION + 15)
        count = store.runs.count_documents({"status": "succeeded", "session": agent.session})
        wait_for(
            lambda: (
                store.runs.count_documents({"status": "succeeded", "session": agent.session})
                > count
            ),
            timeout=15,
            message="no runs under the new session",
        )
        # and a task removed after the expiry stops firing there
        Operations(store, zk, ZkPaths("/cloudtask")).delete_task("test", ids[0])
        wait_for(
            lambda: ids[0] not in agent._specs, timeout=10, message="removed task still scheduled"
        )
        # runs claimed before the removal may still be written; then nothing more
        wait_for(lambda: not store.unfinished_runs({"task_id": ids[0]}), timeout=10)
        before = store.runs.count_documents({"task_id": ids[0]})
        holds(lambda: store.runs.count_documents({"task_id": ids[0]}) == before, 2.0)
    finally:
        agent.stop()
        thread.join(timeout=30)
        client.stop()
        client.close()
    no_fire_twice(cluster.records)


@pytest.mark.timeout(120)
def test_keepalive_hands_over_on_sigterm_without_overlap(cluster, zk, store):
    command = recording_command(cluster.records, work="sleep 60", lock=cluster.tmp / "keep.lock")
    (task_id,) = make_tasks(store, 1, command=command, schedule={"keepalive": True})
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    wait_for(lambda: agent_count(zk) == 2, timeout=30)
    # the task may start on one agent and move once the second registers: take the owner
    # from the settled placement, and the instance it runs there
    wait_for(lambda: spread_over(zk, 1, 1), timeout=30)
    (owner,) = settled(zk)
    run = wait_for(
        lambda: store.runs.find_one({"task_id": task_id, "status": "running", "agent": owner}),
        timeout=30,
    )
    other = "a2" if owner == "a1" else "a1"
    proc = cluster.procs.pop(owner)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = store.runs.count_documents({"task_id": task_id, "status": "running"})
        assert running <= 1, "two instances of a keepalive task at once"
        if store.runs.find_one({"task_id": task_id, "status": "running", "agent": other}):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the keepalive task did not move to the other agent")
    proc.wait(timeout=30)
    old = store.get_run(run["_id"])
    assert old["status"] == "killed" and "stopping" in old["error"]  # not lost: it was ended
    # the service itself saw no second instance while the first still held its lock
    wait_for(
        lambda: len([r for r in read_records(cluster.records) if r.kind == "start"]) >= 2,
        timeout=10,
    )
    no_fire_twice(cluster.records)


@pytest.mark.timeout(120)
def test_delete_with_kill_running_and_run_kill(
    cluster, zk, store, zk_hosts, mongo_server, mongo_db_name
):
    from click.testing import CliRunner

    from cloudtask.cli import cli

    env = {
        "CLOUDTASK_ZK_HOSTS": zk_hosts,
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_CONFIG": "",
    }
    keep = store.create_task(
        {"name": "keep", "schedule": {"every": "1h"}, "command": ["sleep", "60"]}
    )
    store.replace_task(
        keep["_id"], {**keep["spec"], "schedule": {"every": "1s"}, "concurrency": "allow"}
    )
    gone = store.create_task(
        {"name": "gone", "schedule": {"every": "1s"}, "command": ["sleep", "60"]}
    )
    cluster.center("c1")
    cluster.agent("a1")
    one = wait_for(
        lambda: store.runs.find_one({"task_id": keep["_id"], "status": "running"}), timeout=30
    )
    two = wait_for(
        lambda: store.runs.find_one({"task_id": gone["_id"], "status": "running"}), timeout=30
    )
    result = CliRunner().invoke(cli, ["run", "kill", one["_id"]], env=env)
    assert result.exit_code == 0, result.output
    wait_for(
        lambda: store.get_run(one["_id"])["status"] == "killed", timeout=15, message="run kill"
    )
    result = CliRunner().invoke(cli, ["task", "delete", "gone", "--kill-running"], env=env)
    assert result.exit_code == 0 and "killing 1 runs" in result.output, result.output
    wait_for(
        lambda: store.get_run(two["_id"])["status"] == "killed", timeout=15, message="kill_running"
    )
    assert store.get_run(two["_id"])["error"].startswith("the task was deleted by cli:")
    again = CliRunner().invoke(cli, ["run", "kill", one["_id"]], env=env)
    assert again.exit_code == 1 and "not running" in again.output
