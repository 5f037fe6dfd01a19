"""Cluster benchmark: failover time, placement stability, leader reconcile time.

(a) failover: 1 center and 3 agents as processes, 30 tasks ``every: 1s``; kill -9 one agent
    and time until the first fire of one of its tasks on a survivor (a claimed run), for
    session timeouts of 2 s and 10 s; and the same after SIGTERM. ZooKeeper cannot tell a dead
    client sooner than its session timeout (plus up to a tick).
(b) placement (the function the leader runs): 10 agents, 10,000 tasks; one leaves, one
    joins: tasks moved divided by the minimum possible; max/mean load per agent.
(c) a new leader reconciling 10,000 tasks over 10 agents from nothing (real ZooKeeper and
    MongoDB wire server), and the ZooKeeper writes it makes after one agent leaves (the
    assignments the departed agent leaves behind are deleted a minute later; not counted).
(d) the same at scale, on paper: 100,000 tasks over 100 registered agents (registrations
    only, no agent processes); the writes of the first placement and after one leaves; and,
    in the same run, how long the store alone takes to read every task (one query, a plain
    client): on nx-27017 that read is most of the leader's time; then a standby center, its
    tasks read ahead, taking over when the leader stops.

Usage: python bench/cluster.py [--no-large]
The last line is one JSON object: failover_s_t2, failover_s_t10, sigterm_failover_s,
moved_leave_ratio, moved_join_ratio, max_mean_load, reconcile_10k_s, extra_writes_after_leave,
reconcile_100k_100_agents_s, writes_100k, extra_writes_after_leave_100k, store_scan_100k_s,
takeover_100k_s, takeover_writes_100k.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kazoo.client import KazooClient  # noqa: E402

from cloudtask.center.center import Center  # noqa: E402
from cloudtask.center.placement import AgentInfo, Assignment, place_group  # noqa: E402
from cloudtask.clock import to_bson_time
from cloudtask.config import Config  # noqa: E402
from cloudtask.localservers import MongoServer, ZooKeeperServer  # noqa: E402
from cloudtask.runmodel import new_id
from cloudtask.store import Store  # noqa: E402
from cloudtask.store.tasks import SCAN_FIELDS  # noqa: E402
from cloudtask.task import parse_task  # noqa: E402
from cloudtask.zkpaths import ZkPaths, encode  # noqa: E402

TICK_MS = 200


def wait(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def assignments(zk: KazooClient, paths: ZkPaths) -> dict[str, set[str]]:
    out = {}
    for agent_id in zk.get_children(paths.assignments):
        tasks = set(zk.get_children(paths.assignment_dir(agent_id)))
        if tasks:
            out[agent_id] = tasks
    return out


def failover(
    zk_server: ZooKeeperServer, mongo: MongoServer, session: float, sig: int, tmp: Path
) -> float:
    root = f"/bench-{int(time.time() * 1000)}"
    db = f"failover_{int(time.time() * 1000)}"
    env = {
        **os.environ,
        "CLOUDTASK_ZK_HOSTS": zk_server.hosts,
        "CLOUDTASK_ZK_ROOT": root,
        "CLOUDTASK_ZK_SESSION_TIMEOUT": f"{session}s",
        "CLOUDTASK_MONGO_URI": mongo.uri,
        "CLOUDTASK_MONGO_DATABASE": db,
        "CLOUDTASK_AGENT_KILL_GRACE": "1s",
        "CLOUDTASK_CONFIG": "",
    }
    store = Store(mongo.uri, db)
    for i in range(30):
        store.create_task({"name": f"t{i:02d}", "schedule": {"every": "1s"}, "command": "true"})
    procs = {}

    def spawn(name: str, *args: str) -> None:
        with open(tmp / f"{name}-{db}.log", "ab") as out:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cloudtask", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    zk = KazooClient(zk_server.hosts)
    zk.start()
    paths = ZkPaths(root)
    try:
        spawn("c1", "center", "--id", "c1")
        for a in ("a1", "a2", "a3"):
            spawn(a, "agent", "--id", a, "--data-dir", str(tmp / f"{a}-{db}"))
        placed = wait(
            lambda: (
                zk.exists(paths.assignments)
                and (p := assignments(zk, paths))
                and len(p) == 3
                and sum(map(len, p.values())) == 30
                and p
            ),
            timeout=60,
        )
        wait(
            lambda: store.runs.count_documents({"agent": "a2", "status": "succeeded"}) >= 3,
            timeout=30,
        )
        moved = placed["a2"]
        killed_at = datetime.now(timezone.utc)
        procs.pop("a2").send_signal(sig)
        first = wait(
            lambda: store.runs.find_one(
                {
                    "task_id": {"$in": list(moved)},
                    "agent": {"$ne": "a2"},
                    "claimed_at": {"$gt": to_bson_time(killed_at)},
                },
                sort=[("claimed_at", 1)],
            ),
            timeout=session + 30,
        )
        return (first["claimed_at"] - killed_at).total_seconds()
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)
        zk.stop()
        zk.close()
        store.close()


def placement_figures() -> dict[str, float]:
    tasks = [f"task-{i:05d}" for i in range(10_000)]
    agents = [AgentInfo(f"agent-{i}", 1, i + 1) for i in range(10)]
    epoch = max(a.joined for a in agents)
    first = place_group(tasks, agents, {})
    loads = [list(first.values()).count(a.agent_id) for a in agents]
    mean = len(tasks) / len(agents)
    current = {t: Assignment(a, epoch) for t, a in first.items()}
    # one leaves
    gone = agents[3]
    after_leave = place_group(tasks, [a for a in agents if a is not gone], current)
    moved_leave = sum(1 for t in tasks if after_leave[t] != first[t])
    minimum_leave = sum(1 for t in tasks if first[t] == gone.agent_id)
    # one joins (an 11th agent, joined after every assignment)
    newcomer = AgentInfo("agent-new", 1, epoch + 1)
    after_join = place_group(tasks, [*agents, newcomer], current)
    moved_join = sum(1 for t in tasks if after_join[t] != first[t])
    minimum_join = len(tasks) / (len(agents) + 1)
    print(
        f"(b) placement: loads {min(loads)}..{max(loads)} (mean {mean:.0f}); leave moved {moved_leave} "
        f"(its share {minimum_leave}); join moved {moved_join} (1/n = {minimum_join:.0f})"
    )
    return {
        "moved_leave_ratio": round(moved_leave / minimum_leave, 3),
        "moved_join_ratio": round(moved_join / minimum_join, 3),
        "max_mean_load": round(max(loads) / mean, 3),
    }


def reconcile_figures(
    zk_server: ZooKeeperServer, mongo: MongoServer, tasks: int = 10_000, agents: int = 10
) -> dict[str, float]:
    """A new leader placing ``tasks`` tasks on ``agents`` registered agents (registrations
    only: one ZooKeeper client holds them all), then one agent leaving."""
    root = f"/bench-reconcile-{int(time.time() * 1000)}"
    paths = ZkPaths(root)
    store = Store(mongo.uri, f"reconcile_{int(time.time())}")
    now = datetime.now(timezone.utc)
    spec = parse_task({"name": "x", "schedule": {"every": "1m"}, "command": "true"})
    docs = []
    for i in range(tasks):
        s = spec.__class__(**{**spec.__dict__, "name": f"task-{i:06d}"})
        docs.append(Store._task_document(s, new_id(), 1, now))
    for i in range(0, len(docs), 1000):
        store.tasks.insert_many(docs[i : i + 1000])
    registrations = KazooClient(zk_server.hosts, timeout=10)
    registrations.start()
    registrations.ensure_path(paths.agent_group("default"))
    for i in range(agents):
        node = paths.agent("default", f"agent-{i}")
        registrations.create(node, encode({"weight": 1}), ephemeral=True)
    # the store's own share: the same read of every task, by a plain client, in the same run
    # (before the center starts, so that nothing else asks the store meanwhile)
    scan_started = time.monotonic()
    scanned = len(store.tasks.find({}, SCAN_FIELDS, batch_size=10_000).to_list())
    scan = time.monotonic() - scan_started
    zk = KazooClient(zk_server.hosts, timeout=10)
    zk.start()
    cfg = Config().with_section("zookeeper", hosts=zk_server.hosts, root=root)
    center = Center(cfg, store, zk, center_id="bench")
    started = time.monotonic()
    thread = threading.Thread(target=center.run, daemon=True)
    thread.start()
    wait(lambda: center.reconciles >= 1, timeout=600)
    took = time.monotonic() - started
    total = sum(map(len, assignments(zk, paths).values()))
    first_writes = center.writes
    before = assignments(zk, paths)
    registrations.delete(paths.agent("default", "agent-3"))  # it leaves
    wait(
        lambda: sum(len(t) for a, t in assignments(zk, paths).items() if a != "agent-3") == total,
        timeout=120,
    )
    time.sleep(0.5)
    moved = len(before["agent-3"])
    writes = center.writes - first_writes
    print(
        f"new leader placed {total} tasks on {agents} agents in {took:.2f} s with {first_writes} "
        f"writes; after one agent left it wrote {writes} operations for {moved} moved tasks "
        f"(the departed agent's {moved} assignments are deleted {center.garbage_after:g} s "
        "later, off the failover path)"
    )
    print(
        f"the store alone reads the {scanned} tasks in {scan:.2f} s (one query, a plain client): "
        f"the leader's own work is the other {max(0.0, took - scan):.2f} s"
    )
    # a standby (its task feed warm) takes over when the leader stops
    zk2 = KazooClient(zk_server.hosts, timeout=10)
    zk2.start()
    standby = Center(cfg, store, zk2, center_id="bench-standby")
    thread2 = threading.Thread(target=standby.run, daemon=True)
    thread2.start()
    wait(lambda: standby.feed.reads >= 1, timeout=600)
    center.stop()
    thread.join(timeout=30)
    stopped = time.monotonic()
    zk.stop()  # its election node goes with its session
    wait(lambda: standby.reconciles >= 1, timeout=600)
    takeover = time.monotonic() - stopped
    print(
        f"a standby with its tasks read took over in {takeover:.2f} s after the leader's session "
        "closed "
        f"(read every assignment, read the tasks' changes, placed) with "
        f"{standby.writes} writes"
    )
    standby.stop()
    thread2.join(timeout=30)
    zk2.stop()
    zk2.close()
    registrations.stop()
    registrations.close()
    zk.close()
    store.close()
    return {
        "took_s": round(took, 2),
        "writes": first_writes,
        "extra": writes - moved,
        "store_scan_s": round(scan, 2),
        "takeover_s": round(takeover, 2),
        "takeover_writes": standby.writes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-large", dest="large", action="store_false", help="skip (d), 100,000 tasks"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        zk_server = ZooKeeperServer(tmp_path / "zk", tick_time_ms=TICK_MS)
        mongo = MongoServer(tmp_path / "mongo")
        zk_server.start()
        mongo.start()
        try:
            for session, key in ((2.0, "failover_s_t2"), (10.0, "failover_s_t10")):
                took = failover(zk_server, mongo, session, signal.SIGKILL, tmp_path)
                print(
                    f"(a) kill -9, session {session:g} s: first fire of a moved task after {took:.2f} s"
                )
                figures[key] = round(took, 2)
            took = failover(zk_server, mongo, 10.0, signal.SIGTERM, tmp_path)
            print(f"(a) SIGTERM, session 10 s: first fire of a moved task after {took:.2f} s")
            figures["sigterm_failover_s"] = round(took, 2)
            figures.update(placement_figures())
            print("(c) ", end="")
            small = reconcile_figures(zk_server, mongo)
            figures["reconcile_10k_s"] = small["took_s"]
            figures["extra_writes_after_leave"] = small["extra"]
            if args.large:
                print("(d) ", end="")
                large = reconcile_figures(zk_server, mongo, tasks=100_000, agents=100)
                figures["reconcile_100k_100_agents_s"] = large["took_s"]
                figures["writes_100k"] = large["writes"]
                figures["extra_writes_after_leave_100k"] = large["extra"]
                figures["store_scan_100k_s"] = large["store_scan_s"]
                figures["takeover_100k_s"] = large["takeover_s"]
                figures["takeover_writes_100k"] = large["takeover_writes"]
        finally:
            mongo.stop()
            zk_server.stop()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
