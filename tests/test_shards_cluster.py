"""Placement by what agents tell, end to end: real ZooKeeper, the MongoDB wire server, a center
and agents as processes, each agent with its own labels and weight (CLOUDTASK_AGENT_LABELS,
CLOUDTASK_AGENT_WEIGHT). A task's ``requires`` runs it only on a matching agent; a task no
agent matches is ``task.unassigned`` (reason ``no_agent_matches``) until one joins; a
``mode: all`` task's runs get CLOUDTASK_SHARD_INDEX and CLOUDTASK_SHARD_TOTAL, 0..N-1 each
exactly once among the agents, rewritten when the agents change; weights reach placement."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest
from helpers import make_task, wait_for
from test_cluster import Cluster, assignments, settled

from cloudtask.registry import read_agents
from cloudtask.zkpaths import ZkPaths

pytestmark = pytest.mark.external

# each run prints its shard (and its agent); the run's output tail is its own record of it
SHARD_COMMAND = "echo shard=${CLOUDTASK_SHARD_INDEX:-none}/${CLOUDTASK_SHARD_TOTAL:-none} agent=$CLOUDTASK_AGENT"
SHARD_LINE = re.compile(r"shard=(\d+)/(\d+) agent=(\S+)")


class LabelledCluster(Cluster):
    def labelled(self, agent_id: str, labels: str, weight: int = 1) -> subprocess.Popen:
        env = {**self.env, "CLOUDTASK_AGENT_LABELS": labels, "CLOUDTASK_AGENT_WEIGHT": str(weight)}
        log = open(self.tmp / f"{agent_id}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtask", "agent", "--id", agent_id]
            + ["--data-dir", str(self.tmp / agent_id)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[agent_id] = proc
        return proc


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    c = LabelledCluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def shard_runs(store, task_id: str, after=None) -> list[tuple[int, int, str, dict]]:
    """(index, total, agent, the run's shard field) of each succeeded run of ``task_id``, as
    the run printed them."""
    query: dict = {"task_id": task_id, "status": "succeeded"}
    if after is not None:
        query["finished_at"] = {"$gt": after}
    out = []
    for doc in store.runs.find(query):
        match = SHARD_LINE.search(doc.get("output_tail") or "")
        if match:
            index, total, agent = int(match[1]), int(match[2]), match[3]
            assert agent == doc["agent"], doc
            out.append((index, total, agent, doc.get("shard")))
    return out


def shards_by_agent(store, task_id: str, total: int, after=None) -> dict[str, int] | None:
    """agent -> shard index, once every one of ``total`` agents ran the task with that total."""
    seen: dict[str, set[int]] = {}
    for index, run_total, agent, field in shard_runs(store, task_id, after):
        if run_total == total:
            assert field == {"index": index, "total": total}  # recorded on the run too
            seen.setdefault(agent, set()).add(index)
    if len(seen) < total:
        return None
    assert all(len(indexes) == 1 for indexes in seen.values()), seen  # stable per agent
    return {agent: indexes.pop() for agent, indexes in seen.items()}


@pytest.mark.timeout(300)
def test_requirements_shards_and_weights_on_a_real_cluster(cluster, zk, store):
    windows_only = make_task(
        store, "windows-only", schedule={"every": "1s"}, requires={"os": "windows"}
    )["_id"]
    on_every_agent = make_task(
        store,
        "on-every-agent",
        schedule={"every": "1s"},
        mode="all",
        command=SHARD_COMMAND,
        shell=True,
    )["_id"]
    on_linux = make_task(
        store,
        "on-linux",
        schedule={"every": "1s"},
        mode="all",
        command=SHARD_COMMAND,
        shell=True,
        requires={"os": "linux"},
    )["_id"]
    on_mac = make_task(store, "on-mac", schedule={"every": "1s"}, requires={"os": "mac"})["_id"]
    anywhere = [
        make_task(store, f"any-{i:02d}", schedule={"every": "1h"})["_id"] for i in range(20)
    ]

    cluster.center("c1")
    cluster.labelled("lin1", "os=linux")
    cluster.labelled("lin2", "os=linux,zone=eu-1")
    cluster.labelled("win1", "os=windows", weight=3)

    # the weight and labels given in each agent's configuration are in its registration
    paths = ZkPaths("/cloudtask")
    registered = wait_for(lambda: len(agents := read_agents(zk, paths)) == 3 and agents, 30)
    assert {a: (r.weight, r.info.get("labels")) for a, r in registered.items()} == {
        "lin1": (1, {"os": "linux"}),
        "lin2": (1, {"os": "linux", "zone": "eu-1"}),
        "win1": (3, {"os": "windows"}),
    }

    # a requires task runs on the matching agent only
    wait_for(
        lambda: store.runs.count_documents({"task_id": windows_only, "status": "succeeded"}) >= 3,
        timeout=40,
        message="the windows-only task did not run",
    )
    agents_of = {d["agent"] for d in store.runs.find({"task_id": windows_only})}
    assert agents_of == {"win1"}

    # mode all: 0..N-1 each exactly once, by sorted agent id, among the matching agents
    every = wait_for(lambda: shards_by_agent(store, on_every_agent, 3), timeout=40)
    assert every == {"lin1": 0, "lin2": 1, "win1": 2}
    linux = wait_for(lambda: shards_by_agent(store, on_linux, 2), timeout=40)
    assert linux == {"lin1": 0, "lin2": 1}
    assert "win1" not in {agent for _, _, agent, _ in shard_runs(store, on_linux)}

    # no agent has os=mac: recorded once, naming what it requires, and not placed
    (event,) = wait_for(
        lambda: list(store.events.find({"kind": "task.unassigned", "task_id": on_mac})), 30
    )
    assert event["details"]["reason"] == "no_agent_matches"
    assert event["details"]["requires"] == {"os": "mac"}
    assert "os=mac" in event["message"]
    assert not any(on_mac in tasks for tasks in assignments(zk).values())

    # weights reach placement: 20 tasks requiring nothing, caps 5/5/15 for weights 1/1/3
    placed = settled(zk)
    loads = Counter(agent for agent, tasks in placed.items() for t in tasks if t in anywhere)
    assert sum(loads.values()) == 20
    assert loads["win1"] >= 10 and max(loads["lin1"], loads["lin2"]) <= 5, loads

    # a matching agent joins: the task is placed there at once, and mode all shards are
    # rewritten for four agents (by sorted id)
    joined_at = store.runs.find_one(sort=[("finished_at", -1)])["finished_at"]
    cluster.labelled("mac1", "os=mac")
    wait_for(
        lambda: store.runs.count_documents({"task_id": on_mac, "status": "succeeded"}) >= 1,
        timeout=40,
        message="the mac task did not run once a mac agent joined",
    )
    assert {d["agent"] for d in store.runs.find({"task_id": on_mac})} == {"mac1"}
    four = wait_for(lambda: shards_by_agent(store, on_every_agent, 4, after=joined_at), 40)
    assert four == {"lin1": 0, "lin2": 1, "mac1": 2, "win1": 3}
    assert set(shards_by_agent(store, on_linux, 2, after=joined_at) or {}) <= {"lin1", "lin2"}


@pytest.mark.timeout(120)
def test_a_standalone_agent_runs_only_the_tasks_its_labels_meet(
    mongo_server, mongo_db_name, tmp_path, store
):
    linux = make_task(store, "on-linux", schedule={"every": "1s"}, requires={"os": "linux"})["_id"]
    windows = make_task(store, "on-windows", schedule={"every": "1s"}, requires={"os": "windows"})
    env = {
        **os.environ,
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_AGENT_LABELS": "os=linux",
        "CLOUDTASK_AGENT_POLL_INTERVAL": "0.5s",
        "CLOUDTASK_CONFIG": "",
    }
    with open(tmp_path / "agent.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtask", "agent", "--standalone", "--id", "solo"]
            + ["--data-dir", str(tmp_path / "solo")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: store.runs.count_documents({"task_id": linux, "status": "succeeded"}) >= 3,
            timeout=60,
            message="the linux task did not run on the linux agent",
        )
        assert store.runs.count_documents({"task_id": windows["_id"]}) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
