"""The agent registry: which agents are in the cluster now, as ZooKeeper shows it.

Every agent keeps an ephemeral node ``/agents/<group>/<agent_id>`` (written by
cloudtask/agent/registration.py) whose data is its registration info: host, pid, version,
weight, load, ... and ``leaving`` once it stops cleanly. The node lives exactly as long as
the agent's session. The leading center places tasks and judges runs by what it reads here,
and the web's cluster view shows it: both read it with :func:`read_agents` and decode a node
with :func:`decode_agent`, so they never disagree about what a registration says.

What a registration tells, besides its info:

* ``joined``: the node's ``czxid``. It names this life of the agent: a restarted agent
  registers again and gets a higher one, so an assignment written for an earlier life
  (``for_agent``) is told from one written for this life.
* ``session``: the node's ``ephemeralOwner``. A run claimed under a session that is not
  registered now belongs to an agent that left (or came back under a new session).
* ``weight``: the info's ``weight`` if it is a positive integer, else 1.
* ``leaving``: the agent is stopping cleanly: it gets no tasks, and its runs are not lost.
* ``registered_ms`` and ``updated_ms``: the node's ``ctime`` and ``mtime``.

Reading: the groups, then each group's agents (a group gone meanwhile is skipped), then
every node asynchronously, gathered at the end (a node gone meanwhile is skipped): a few
round trips for hundreds of agents. Groups and agents are read in sorted order, so the
result does not depend on the order ZooKeeper lists them in (an id registered in two groups
at once is the later group's). Other ZooKeeper errors are the caller's.

Example::

    >>> from types import SimpleNamespace
    >>> stat = SimpleNamespace(czxid=42, ephemeralOwner=0x1F, ctime=1000, mtime=2000)
    >>> agent = decode_agent("default", "a1", b'{"version":1,"weight":0,"leaving":true}', stat)
    >>> (agent.agent_id, agent.group, agent.joined, agent.session, agent.weight)
    ('a1', 'default', 42, 31, 1)
    >>> (agent.leaving, agent.status, agent.registered_ms, agent.updated_ms)
    (True, 'leaving', 1000, 2000)
    >>> decode_agent("default", "a2", b"not json", stat).info
    {}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kazoo.exceptions import NoNodeError

from .zkpaths import ZkPaths, decode

__all__ = ["LiveAgent", "decode_agent", "read_agents"]


@dataclass(frozen=True)
class LiveAgent:
    """One registered agent (see the module's docstring for what each field means)."""

    agent_id: str
    group: str
    weight: int
    joined: int  # czxid of its registration: when this life of the agent joined
    session: int  # the session that holds the registration (ephemeralOwner)
    info: dict[str, Any] = field(default_factory=dict)
    leaving: bool = False  # stopping cleanly: gets no tasks, but its runs are not lost
    registered_ms: int = 0  # ctime of the registration
    updated_ms: int = 0  # mtime: when the agent last rewrote its info

    @property
    def status(self) -> str:
        return "leaving" if self.leaving else "online"


def decode_agent(group: str, agent_id: str, data: bytes | None, stat: Any) -> LiveAgent:
    """The registration read from ``/agents/<group>/<agent_id>`` (its data and ZnodeStat).
    Unreadable data is an empty info: the agent is registered all the same."""
    info = decode(data) or {}
    weight = info.get("weight", 1)
    return LiveAgent(
        agent_id=agent_id,
        group=group,
        weight=weight if isinstance(weight, int) and weight > 0 else 1,
        joined=stat.czxid,
        session=stat.ephemeralOwner,
        info=info,
        leaving=bool(info.get("leaving")),
        registered_ms=stat.ctime,
        updated_ms=stat.mtime,
    )


def read_agents(zk: Any, paths: ZkPaths) -> dict[str, LiveAgent]:
    """Every registered agent by id (groups, then agents, in sorted order)."""
    reads = []
    for group in _children(zk, paths.agents):
        for agent_id in _children(zk, paths.agent_group(group)):
            reads.append((group, agent_id, zk.get_async(paths.agent(group, agent_id))))
    agents: dict[str, LiveAgent] = {}
    for group, agent_id, result in reads:
        try:
            data, stat = result.get()
        except NoNodeError:
            continue
        agents[agent_id] = decode_agent(group, agent_id, data, stat)
    return agents


def _children(zk: Any, path: str) -> list[str]:
    try:
        return sorted(zk.get_children(path))
    except NoNodeError:
        return []
