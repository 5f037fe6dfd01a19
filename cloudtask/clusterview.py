"""What the cluster looks like now, read from ZooKeeper (for the web site and the API).

Live agents come from their ephemeral registrations (read by :mod:`cloudtask.registry`, as
the leading center reads them), centers from theirs, the leader and the unassigned tasks from
the leader's ``/status``, and which agent owns which task from ``/assignments``. Agents that
went away are not in ZooKeeper: the leading center keeps every agent it saw in MongoDB's
``agents`` collection (online or offline, last seen), and :func:`merge_agents` joins the two.

Every read is asynchronous and gathered at the end, so a view of 100 agents and 10,000
assignments costs a few round trips' time, not thousands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kazoo.exceptions import NoNodeError

from .registry import read_agents
from .zkpaths import ZkPaths, decode


@dataclass
class ClusterView:
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # live agents by id
    centers: list[dict[str, Any]] = field(default_factory=list)
    leader: str | None = None
    unassigned: dict[str, str] = field(default_factory=dict)  # task id -> group
    owners: dict[str, str] = field(default_factory=dict)  # task id -> agent id
    task_counts: dict[str, int] = field(default_factory=dict)  # agent id -> tasks
    connected: bool = True


def read_cluster(zk: Any, paths: ZkPaths) -> ClusterView:
    view = ClusterView()
    if zk is None or not zk.connected:
        view.connected = False
        return view
    # agents, from the registry the leading center reads too
    for agent_id, agent in read_agents(zk, paths).items():
        view.agents[agent_id] = {
            **agent.info,
            "agent_id": agent_id,
            "group": agent.group,
            "status": agent.status,
            "registered_ms": agent.registered_ms,
            "updated_ms": agent.updated_ms,
        }
    # centers and the leader's status
    center_reads = [(c, zk.get_async(paths.center(c))) for c in _children(zk, paths.centers)]
    status_read = zk.get_async(paths.status)
    try:
        status = decode(status_read.get()[0]) or {}
    except NoNodeError:
        status = {}
    view.leader = status.get("leader")
    unassigned = status.get("unassigned")
    view.unassigned = dict(unassigned) if isinstance(unassigned, dict) else {}
    for center_id, result in center_reads:
        try:
            info = decode(result.get()[0]) or {}
        except NoNodeError:
            continue
        view.centers.append({**info, "center_id": center_id, "leader": center_id == view.leader})
    view.centers.sort(key=lambda c: (not c["leader"], c["center_id"]))
    # owners: the assignments of live agents (a departed agent's leftovers are not owners)
    # (a leaving agent's tasks are counted, but it owns none: the leader is moving them)
    live = sorted(view.agents)
    child_reads = [(a, zk.get_children_async(paths.assignment_dir(a))) for a in live]
    for agent_id, result in child_reads:
        try:
            tasks = result.get()
        except NoNodeError:
            tasks = []
        view.task_counts[agent_id] = len(tasks)
        if view.agents[agent_id]["status"] != "online":
            continue
        for task_id in tasks:
            view.owners.setdefault(task_id, agent_id)
    return view


def merge_agents(view: ClusterView, recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Live agents (from ZooKeeper) and the ones that went away (from MongoDB), one list,
    sorted by group then id. Each has agent_id, group, host, pid, status, load, running,
    tasks and last_seen (a datetime, or None for a live agent: it is seen now)."""
    out: dict[str, dict[str, Any]] = {}
    for doc in recorded:
        info = doc.get("info") or {}
        out[doc["_id"]] = _agent_row(
            doc["_id"], doc.get("group") or info.get("group", ""), info, "offline"
        )
        out[doc["_id"]]["last_seen"] = doc.get("last_seen")
    for agent_id, info in view.agents.items():
        row = _agent_row(agent_id, info["group"], info, info["status"])
        row["tasks"] = view.task_counts.get(agent_id, 0)
        row["last_seen"] = None
        out[agent_id] = row
    return sorted(out.values(), key=lambda a: (a["group"], a["agent_id"]))


def _agent_row(agent_id: str, group: str, info: dict[str, Any], status: str) -> dict[str, Any]:
    load = info.get("load") if isinstance(info.get("load"), dict) else {}
    return {
        "agent_id": agent_id,
        "group": group,
        "host": info.get("host"),
        "pid": info.get("pid"),
        "version": info.get("version"),
        "platform": info.get("platform"),
        "cores": info.get("cores"),
        "max_parallel": info.get("max_parallel"),
        "started_at": info.get("started_at"),
        "status": status,
        "cpu_percent": load.get("cpu_percent"),
        "memory_percent": load.get("memory_percent"),
        "agent_cpu_percent": load.get("agent_cpu_percent"),
        "agent_rss_mb": load.get("agent_rss_mb"),
        "running": load.get("running", 0) if status != "offline" else 0,
        "tasks": 0,
        "last_seen": None,
    }


def _children(zk: Any, path: str) -> list[str]:
    try:
        return sorted(zk.get_children(path))
    except NoNodeError:
        return []


def iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def pool_usage(zk: Any, paths: Any, pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``pools`` (name, size) with ``running`` and ``waiting``: the runs holding a place
    and the runs waiting for one, as ZooKeeper shows them (None each without a cluster or
    when ZooKeeper does not answer)."""
    from kazoo.exceptions import KazooException, NoNodeError

    out = []
    for pool in pools:
        running = waiting = None
        if zk is not None:
            try:
                places = len(zk.get_children(f"{paths.pools}/{pool['name']}"))
            except NoNodeError:
                places = 0
            except KazooException:
                places = None
            if places is not None:
                running, waiting = min(pool["size"], places), max(0, places - pool["size"])
        out.append({**pool, "running": running, "waiting": waiting})
    return out
