"""The API's view of the cluster: every agent (live or gone), and the cluster as ZooKeeper
shows it (the leading center, every center and agent, the tasks no live agent can take)."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from ..auth import requires
from ..context import agents, cluster, jsonable, store
from ..openapi import Reply
from .table import api

UNASSIGNED_LISTED = 1000


def agent_json(row: dict[str, Any]) -> dict[str, Any]:
    out = jsonable(row)
    out["load"] = {
        "cpu_percent": out.pop("cpu_percent", None),
        "memory_percent": out.pop("memory_percent", None),
        "agent_cpu_percent": out.pop("agent_cpu_percent", None),
        "agent_rss_mb": out.pop("agent_rss_mb", None),
    }
    return out


@api.route(
    "GET",
    "/agents",
    summary="Every agent",
    description="Live ones (from ZooKeeper) and those that went away (offline, last seen), "
    "with host, pid, load, running runs and assigned tasks.",
    replies={200: Reply("The agents, by group", "AgentList")},
)
@requires("viewer")
def list_agents() -> Any:
    return jsonify(items=[agent_json(a) for a in agents()])


@api.route(
    "GET",
    "/cluster",
    summary="The cluster",
    description="The leading center, every center and agent, and the tasks no live agent can "
    f"take (at most {UNASSIGNED_LISTED} listed; `unassigned_total` counts them all).",
    replies={200: Reply("The cluster as ZooKeeper shows it", "Cluster")},
)
@requires("viewer")
def get_cluster() -> Any:
    view = cluster()
    unassigned = sorted(view.unassigned.items())
    listed = unassigned[:UNASSIGNED_LISTED]
    names = {}
    if listed:
        names = store().task_names(t for t, _ in listed)
    return jsonify(
        connected=view.connected,
        leader=view.leader,
        centers=jsonable(view.centers),
        agents=[agent_json(a) for a in agents()],
        unassigned=[{"task_id": t, "name": names.get(t), "group": g} for t, g in listed],
        unassigned_total=len(unassigned),
    )
