"""The agent registry (cloudtask.registry): one reader of ``/agents/<group>/<agent_id>`` for the
leading center and the web's cluster view."""

from __future__ import annotations

import doctest
from types import SimpleNamespace
from typing import Any

from kazoo.exceptions import NoNodeError

from cloudtask import registry
from cloudtask.clusterview import read_cluster
from cloudtask.registry import decode_agent, read_agents
from cloudtask.zkpaths import ZkPaths, encode

PATHS = ZkPaths("/cloudtask")
STAT = SimpleNamespace(czxid=7, ephemeralOwner=0xABC, ctime=111, mtime=222)


def test_module_docstring_example() -> None:
    result = doctest.testmod(registry)
    assert result.attempted > 0
    assert result.failed == 0


def test_decode_keeps_the_info_and_reads_the_stat() -> None:
    info = {"host": "h1", "pid": 12, "weight": 3, "load": {"running": 2}}
    agent = decode_agent("g1", "a1", encode(info), STAT)
    assert agent.info == {"version": 1, **info}
    assert (agent.agent_id, agent.group, agent.weight) == ("a1", "g1", 3)
    assert (agent.joined, agent.session) == (7, 0xABC)
    assert (agent.registered_ms, agent.updated_ms) == (111, 222)
    assert not agent.leaving and agent.status == "online"


def test_decode_weight_falls_back_to_one() -> None:
    for weight in (0, -2, "3", 1.5, None):
        assert decode_agent("g", "a", encode({"weight": weight}), STAT).weight == 1
    assert decode_agent("g", "a", encode({}), STAT).weight == 1


def test_decode_unreadable_or_empty_data_is_an_empty_info() -> None:
    for data in (b"", None, b"\xff\xfe", b"[1, 2]", b"{not json"):
        agent = decode_agent("g", "a", data, STAT)
        assert agent.info == {} and agent.weight == 1 and not agent.leaving


def test_decode_leaving_is_its_truth_value() -> None:
    assert decode_agent("g", "a", encode({"leaving": True}), STAT).status == "leaving"
    assert decode_agent("g", "a", encode({"leaving": 0}), STAT).status == "online"


class _Result:
    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class FakeZk:
    """Children listed in a scrambled order; some nodes vanish between listing and reading."""

    def __init__(self, nodes: dict[str, bytes], vanished: set[str] = frozenset()) -> None:
        self.nodes = nodes
        self.vanished = vanished

    def get_children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix) :].split("/")[0] for p in self.nodes if p.startswith(prefix)}
        if not names and path not in self.nodes:
            raise NoNodeError(path)
        return sorted(names, reverse=True)

    def get_async(self, path: str) -> _Result:
        if path in self.vanished or path not in self.nodes:
            return _Result(NoNodeError(path))
        return _Result((self.nodes[path], STAT))


def test_read_agents_in_sorted_order_skipping_what_vanished() -> None:
    zk = FakeZk(
        {
            PATHS.agents: b"",
            PATHS.agent("g2", "b1"): encode({"weight": 2}),
            PATHS.agent("g1", "a2"): encode({}),
            PATHS.agent("g1", "a1"): encode({"leaving": True}),
            PATHS.agent("g1", "gone"): encode({}),
        },
        vanished={PATHS.agent("g1", "gone")},
    )
    agents = read_agents(zk, PATHS)
    assert list(agents) == ["a1", "a2", "b1"]
    assert [a.group for a in agents.values()] == ["g1", "g1", "g2"]
    assert agents["a1"].leaving and agents["b1"].weight == 2


def test_read_agents_without_the_agents_folder_is_empty() -> None:
    assert read_agents(FakeZk({}), PATHS) == {}


def test_center_and_cluster_view_read_the_same_registrations(zk) -> None:
    zk.create(PATHS.agent("g1", "a1"), encode({"host": "h1", "weight": 2}), makepath=True)
    zk.create(PATHS.agent("g2", "b1"), encode({"host": "h2", "leaving": True}), makepath=True)
    zk.create(PATHS.agent("g2", "b2"), b"garbage", makepath=True)
    agents = read_agents(zk, PATHS)
    assert sorted(agents) == ["a1", "b1", "b2"]
    stat = zk.exists(PATHS.agent("g1", "a1"))
    assert (agents["a1"].joined, agents["a1"].session) == (stat.czxid, stat.ephemeralOwner)
    view = read_cluster(zk, PATHS)
    assert view.agents["a1"] == {
        "version": 1,
        "host": "h1",
        "weight": 2,
        "agent_id": "a1",
        "group": "g1",
        "status": "online",
        "registered_ms": stat.ctime,
        "updated_ms": stat.mtime,
    }
    assert view.agents["b1"]["status"] == "leaving"
    assert set(view.agents["b2"]) == {"agent_id", "group", "status", "registered_ms", "updated_ms"}
    for agent_id, agent in agents.items():
        row = view.agents[agent_id]
        assert (row["group"], row["status"]) == (agent.group, agent.status)
        assert (row["registered_ms"], row["updated_ms"]) == (
            agent.registered_ms,
            agent.updated_ms,
        )
