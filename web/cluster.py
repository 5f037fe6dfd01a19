"""The cluster page: agents by group and centers with the leader marked.

Live agents, centers, the leader and the unassigned tasks come from ZooKeeper (the cached
:func:`web.context.cluster` view); agents that went away from MongoDB, where the leader keeps
every agent it saw (:func:`web.context.agents` joins both). Each group also shows how many
enabled tasks it has (one aggregation over the ``group_enabled`` index). A group with tasks
the leader could not place (no live agent) is flagged; while no center leads, so is a group
with enabled tasks and no live agent.

``?group=NAME`` shows one group only. Without ZooKeeper the page says the cluster is not
connected and lists the agents as the leader last recorded them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, render_template, request

from cloudtask.calendars import describe_blackout
from cloudtask.clusterview import merge_agents, pool_usage
from cloudtask.exceptions import CloudTaskError

from .auth import requires
from .context import agents, cluster, paths, store, zk

bp = Blueprint("cluster", __name__, url_prefix="/cluster")

GROUP_ARG_LIMIT = 200


@dataclass
class Group:
    name: str
    agents: list[dict[str, Any]] = field(default_factory=list)
    tasks: int = 0  # enabled tasks
    unassigned: int = 0  # tasks the leader could not place
    connected: bool = True  # without ZooKeeper no agent is known to be live
    leader: bool = True  # a center leads: its unassigned tasks are the ones with no agent

    @property
    def live(self) -> int:
        """Agents that take tasks (a leaving agent is finishing its runs, not taking new ones)."""
        return sum(1 for a in self.agents if a["status"] == "online")

    @property
    def problem(self) -> str | None:
        if not self.connected:
            return None
        if self.unassigned:
            n = self.unassigned
            return f"{n} task{'' if n == 1 else 's'} unassigned: no live agent in this group"
        if not self.leader and self.tasks and not self.live:
            # no leader says which tasks lack an agent: a group of enabled tasks and no agent
            return "enabled tasks but no live agent: start an agent in this group"
        return None


def enabled_tasks_by_group() -> dict[str, int]:
    """Enabled tasks per group that still fire (done one-shot tasks left out, as the task
    list's ``state=enabled`` filter does), in one aggregation."""
    return store().enabled_tasks_by_group()


def recorded_agents() -> list[dict[str, Any]]:
    """Without ZooKeeper: the agents as the leader last recorded them, their status unknown."""
    try:
        recorded = store().list_agents()
    except CloudTaskError:
        recorded = []
    status = {d["_id"]: d.get("status") for d in recorded}
    rows = merge_agents(cluster(), recorded)
    for row in rows:
        row["recorded_status"] = status.get(row["agent_id"])
        row["status"] = "unknown"
    return rows


def group_arg() -> tuple[str | None, str | None]:
    """(the ``group`` filter, or an error message about it)."""
    raw = request.args.get("group", "")
    value = raw.strip()
    if len(value) > GROUP_ARG_LIMIT:
        return None, f"group: at most {GROUP_ARG_LIMIT} characters, got {len(value)}"
    return value or None, None


def build_groups(
    rows: list[dict[str, Any]],
    tasks: dict[str, int],
    unassigned: dict[str, str],
    connected: bool,
    leader: bool,
) -> list[Group]:
    """Every group that has agents, enabled tasks or unassigned tasks."""
    groups: dict[str, Group] = {}

    def group(name: str) -> Group:
        return groups.setdefault(name, Group(name, connected=connected, leader=leader))

    for row in rows:
        group(row["group"]).agents.append(row)
    for name, n in tasks.items():
        group(name).tasks = n
    for name in unassigned.values():
        group(name).unassigned += 1
    # groups that need attention first, then by name
    return sorted(groups.values(), key=lambda g: (g.problem is None, g.name))


def _pools() -> list[dict[str, Any]]:
    """The concurrency pools and how full each is."""
    try:
        pools = store().list_pools()
    except CloudTaskError:
        return []
    return pool_usage(zk(), paths(), pools)


def _calendars() -> dict[str, list[dict[str, Any]]]:
    """The calendars and blackout windows (changed through the CLI and the API)."""
    try:
        calendars, blackouts = store().list_calendars(), store().list_blackouts()
    except CloudTaskError:
        return {"calendars": [], "blackouts": []}
    for blackout in blackouts:
        blackout["summary"] = describe_blackout(blackout)
    return {"calendars": calendars, "blackouts": blackouts}


@bp.get("")
@requires("viewer")
def index() -> Any:
    selected, error = group_arg()
    view = cluster()
    rows = agents() if view.connected else recorded_agents()
    leader_known = any(c["leader"] for c in view.centers)
    groups = build_groups(
        rows, enabled_tasks_by_group(), view.unassigned, view.connected, leader_known
    )
    all_names = sorted(g.name for g in groups)
    if selected is not None:
        groups = [g for g in groups if g.name == selected]
    return render_template(
        "cluster.html",
        connected=view.connected,
        groups=groups,
        group_names=all_names,
        selected=selected,
        error=error,
        centers=view.centers,
        leader=view.leader,
        leader_known=leader_known,
        unassigned_total=len(view.unassigned),
        pools=_pools(),
        calendars=_calendars(),
        totals={
            "online": sum(1 for r in rows if r["status"] == "online"),
            "leaving": sum(1 for r in rows if r["status"] == "leaving"),
            "offline": sum(1 for r in rows if r["status"] == "offline"),
        },
    ), (422 if error else 200)
