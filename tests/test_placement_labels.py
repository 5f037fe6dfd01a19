"""Placement with what agents publish (cloudtask.center.placement): labels a task requires,
running counts at first placement, shards of mode-all tasks, weights. Pure: no servers."""

from __future__ import annotations

import random
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from uhashring import HashRing

from cloudtask.center.center import _infos
from cloudtask.center.placement import (
    LOAD_CHOICES,
    AgentInfo,
    Assignment,
    agent_info,
    diff_placement,
    place_group,
    plan_group,
    ring_epoch,
    shards,
)
from cloudtask.exceptions import ValidationError
from cloudtask.registry import decode_agent
from cloudtask.task import parse_task, validate_task

WIN = {"os": "windows"}
LINUX = {"os": "linux"}


def fleet() -> list[AgentInfo]:
    """Six agents: two Windows (one of them in zone eu-1), four Linux."""
    return [
        AgentInfo("w1", 1, 1, {**WIN, "zone": "eu-1"}),
        AgentInfo("w2", 1, 2, WIN),
        AgentInfo("l1", 1, 3, LINUX),
        AgentInfo("l2", 1, 4, {**LINUX, "zone": "eu-1"}),
        AgentInfo("l3", 2, 5, LINUX),
        AgentInfo("l4", 1, 6, LINUX),
    ]


def workload() -> tuple[list[str], dict[str, dict[str, str]]]:
    """900 tasks: a third require Windows, a ninth zone eu-1, a ninth Windows in eu-1."""
    tasks = [f"task-{i:04d}" for i in range(900)]
    requires: dict[str, dict[str, str]] = {}
    for i, task in enumerate(tasks):
        if i % 3 == 0:
            requires[task] = dict(WIN)
        elif i % 9 == 1:
            requires[task] = {"zone": "eu-1"}
        elif i % 9 == 2:
            requires[task] = {**WIN, "zone": "eu-1"}
    return tasks, requires


def as_current(placement: dict[str, str], agents: list[AgentInfo]) -> dict[str, Assignment]:
    epoch = ring_epoch(agents)
    return {task: Assignment(agent, epoch) for task, agent in placement.items()}


def labels_of(agents: list[AgentInfo]) -> dict[str, dict[str, str]]:
    return {a.agent_id: dict(a.labels) for a in agents}


def assert_requirements_met(placement, requires, agents) -> None:
    labels = labels_of(agents)
    for task, agent in placement.items():
        for name, value in requires.get(task, {}).items():
            assert labels[agent].get(name) == value, (task, agent, requires[task])


# --- requirements -------------------------------------------------------------------------


def test_every_task_goes_to_an_agent_with_the_labels_it_requires() -> None:
    agents = fleet()
    tasks, requires = workload()
    plan = plan_group(tasks, agents, {}, requires=requires)
    assert sorted(plan.placement) == tasks and plan.unmatched == {}
    assert_requirements_met(plan.placement, requires, agents)
    # the Windows-in-eu-1 tasks have one agent; tasks requiring nothing use every agent
    assert {plan.placement[t] for t, r in requires.items() if r == {**WIN, "zone": "eu-1"}} == {
        "w1"
    }
    free = [t for t in tasks if t not in requires]
    assert {plan.placement[t] for t in free} == {a.agent_id for a in agents}


def test_a_class_is_balanced_over_the_agents_that_match_it() -> None:
    agents = fleet()
    tasks = [f"win-{i:04d}" for i in range(1000)]
    placement = place_group(tasks, agents, {}, requires=dict.fromkeys(tasks, WIN))
    loads = Counter(placement.values())
    assert set(loads) == {"w1", "w2"}
    assert max(loads.values()) <= 625  # ceil(1.25 * 1000 / 2): the cap among the two


def test_a_class_prefers_the_owner_on_the_ring_of_its_agents() -> None:
    # with room to spare, a task sits where a ring of the matching agents alone puts it
    agents = fleet()
    tasks = [f"t{i}" for i in range(500)]
    placement = place_group(
        tasks, agents, {}, requires=dict.fromkeys(tasks, LINUX), load_factor=100.0
    )
    linux = [a for a in agents if dict(a.labels).get("os") == "linux"]
    ring = HashRing({a.agent_id: {"weight": a.weight, "vnodes": 160} for a in linux})
    assert placement == {t: ring.get_node(t) for t in tasks}


def test_no_matching_agent_leaves_the_task_unmatched_until_one_joins() -> None:
    agents = [a for a in fleet() if a.agent_id != "w1"]
    needs = {"zone": "eu-1", "os": "windows"}
    plan = plan_group(["only-w1", "any"], agents, {}, requires={"only-w1": needs})
    assert plan.placement == {"any": plan.placement["any"]}
    assert plan.unmatched == {"only-w1": needs}
    current = as_current(plan.placement, agents)
    joined = [*agents, AgentInfo("w1", 1, 99, {**WIN, "zone": "eu-1"})]
    later = plan_group(["only-w1", "any"], joined, current, requires={"only-w1": needs})
    assert later.placement["only-w1"] == "w1" and later.unmatched == {}
    # (a group without any live agent is the center's "no live agent", not unmatched)
    assert plan_group(["only-w1"], [], {}, requires={"only-w1": needs}).unmatched == {}


def test_an_agent_that_leaves_moves_only_its_own_tasks() -> None:
    agents = fleet()
    tasks, requires = workload()
    before = place_group(tasks, agents, {}, requires=requires)
    for gone in ("w2", "l3", "l2"):
        left = [a for a in agents if a.agent_id != gone]
        after = place_group(tasks, left, as_current(before, agents), requires=requires)
        _, _, moved = diff_placement(before, after)
        assert moved and all(src == gone for src, _ in moved.values()), gone
        assert set(moved) == {t for t, a in before.items() if a == gone}
        assert_requirements_met(after, requires, left)


def test_an_agent_that_joins_takes_only_tasks_it_matches() -> None:
    agents = fleet()
    tasks, requires = workload()
    before = place_group(tasks, agents, {}, requires=requires)
    newcomer = AgentInfo("w3", 1, 50, WIN)
    after = place_group(tasks, [*agents, newcomer], as_current(before, agents), requires=requires)
    _, _, moved = diff_placement(before, after)
    assert moved and all(to == "w3" for _, to in moved.values())
    # it matches the Windows tasks and those requiring nothing, not the eu-1 ones
    assert all(requires.get(t, {}) in ({}, WIN) for t in moved)


def test_idempotent_and_independent_of_input_order() -> None:
    agents = [
        AgentInfo(a.agent_id, a.weight, a.joined, a.labels, running=i * 3 % 5)
        for i, a in enumerate(fleet())
    ]
    tasks, requires = workload()
    current = as_current(place_group(tasks[:600], agents[:5], {}, requires=requires), agents[:5])
    expected = plan_group(tasks, agents, current, requires=requires)
    rng = random.Random(3)
    for _ in range(4):
        shuffled_tasks, shuffled_agents = tasks[:], agents[:]
        rng.shuffle(shuffled_tasks)
        rng.shuffle(shuffled_agents)
        items = list(requires.items())
        rng.shuffle(items)
        again = plan_group(shuffled_tasks, shuffled_agents, current, requires=dict(items))
        assert again == expected
    settled = as_current(expected.placement, agents)
    assert place_group(tasks, agents, settled, requires=requires) == expected.placement


# --- running runs at first placement ------------------------------------------------------------


def test_a_new_task_goes_to_the_less_busy_of_its_first_two_agents() -> None:
    idle = [AgentInfo(f"a{i}", 1, i + 1) for i in range(4)]
    tasks = [f"t{i:03d}" for i in range(200)]
    by_ring = place_group(tasks, idle, {}, load_factor=100.0)
    ring = HashRing({a.agent_id: {"weight": 1, "vnodes": 160} for a in idle})
    assert by_ring == {t: ring.get_node(t) for t in tasks}  # equal loads: the plain ring
    busy = [
        AgentInfo(a.agent_id, 1, a.joined, running=50 if a.agent_id == "a0" else 0) for a in idle
    ]
    by_load = place_group(tasks, busy, {}, load_factor=100.0)
    # every task the ring gives a0 goes to the next agent clockwise; none other changes
    moved = diff_placement(by_ring, by_load)[2]
    assert set(moved) == {t for t, a in by_ring.items() if a == "a0"} and moved
    assert "a0" not in by_load.values()
    assert LOAD_CHOICES == 2


def test_running_counts_are_per_unit_of_weight() -> None:
    agents = [AgentInfo("big", 4, 1, running=8), AgentInfo("small", 1, 2, running=3)]
    tasks = [f"t{i:03d}" for i in range(100)]
    placement = place_group(tasks, agents, {}, load_factor=100.0)
    assert set(placement.values()) == {"big"}  # 8/4 = 2 runs per unit, against 3


def test_load_changes_never_move_a_placed_task() -> None:
    agents = fleet()
    tasks, requires = workload()
    before = place_group(tasks, agents, {}, requires=requires)
    current = as_current(before, agents)
    for seed in range(3):
        rng = random.Random(seed)
        loaded = [
            AgentInfo(a.agent_id, a.weight, a.joined, a.labels, rng.randrange(100)) for a in agents
        ]
        assert place_group(tasks, loaded, current, requires=requires) == before


def test_a_dead_agents_tasks_prefer_the_less_busy_agents() -> None:
    agents = [AgentInfo(f"a{i}", 1, i + 1) for i in range(5)]
    tasks = [f"t{i:04d}" for i in range(1000)]
    before = place_group(tasks, agents, {})
    survivors = [
        AgentInfo(a.agent_id, 1, a.joined, running=40 if a.agent_id == "a1" else 0)
        for a in agents
        if a.agent_id != "a0"
    ]
    after = place_group(tasks, survivors, as_current(before, agents))
    moved = diff_placement(before, after)[2]
    assert all(src == "a0" for src, _ in moved.values())
    to = Counter(dst for _, dst in moved.values())
    assert to["a1"] < min(to[a] for a in ("a2", "a3", "a4")), to


# --- shards and what registrations publish ----------------------------------------------------


def test_shards_are_sorted_agent_ids() -> None:
    assert shards(["b", "c", "a", "b"]) == {"a": (0, 3), "b": (1, 3), "c": (2, 3)}
    assert shards([]) == {}


def test_registrations_feed_weights_labels_and_running_counts() -> None:
    stat = SimpleNamespace(czxid=7, ephemeralOwner=1, ctime=0, mtime=0)
    data = b'{"weight": 3, "labels": {"os": "windows", "n": 5}, "load": {"running": 4}}'
    (info,) = _infos([decode_agent("g", "a1", data, stat)])
    assert info == AgentInfo("a1", 3, 7, {"os": "windows"}, 4)
    junk = decode_agent("g", "a2", b'{"weight": "x", "labels": [1], "load": {"running": -2}}', stat)
    assert _infos([junk]) == [AgentInfo("a2", 1, 7)]
    assert agent_info("a3", 1, 1, {"load": {"running": True}}).running == 0


def test_agent_info_checks_its_fields() -> None:
    with pytest.raises(ValueError):
        AgentInfo("a", 1, 1, running=-1)
    with pytest.raises(ValueError):
        AgentInfo("a", 1, 1, {"os": 3})  # type: ignore[dict-item]
    assert AgentInfo("a", 1, 1, {"b": "2", "a": "1"}) == AgentInfo(
        "a", 1, 1, (("a", "1"), ("b", "2"))
    )
    assert hash(AgentInfo("a", 1, 1, WIN)) == hash(AgentInfo("a", 1, 1, dict(WIN)))


# --- the task's requires -----------------------------------------------------------------------


def test_requires_in_a_task_spec() -> None:
    base = {"name": "t", "schedule": {"every": "1h"}, "command": "true"}
    spec = parse_task({**base, "requires": {"zone": "eu-1", "os": "windows"}})
    assert list(spec.requires.items()) == [("os", "windows"), ("zone", "eu-1")]
    assert spec.to_dict()["requires"] == {"os": "windows", "zone": "eu-1"}
    assert parse_task(base).requires == {}
    cases = [
        ({"requires": "os=windows"}, "requires"),
        ({"requires": {"os": 3}}, "requires.os"),
        ({"requires": {"-x": "y"}}, "requires.-x"),
        ({"requires": {"zone": "a\nb"}}, "requires.zone"),
        ({"requires": {"zone": "x" * 256}}, "requires.zone"),
        ({"requires": {f"k{i}": "v" for i in range(17)}}, "requires"),
        ({"requires": None}, "requires"),
    ]
    for extra, path in cases:
        problems = validate_task({**base, **extra})
        assert [p.path for p in problems] == [path], (extra, problems)
    with pytest.raises(ValidationError):
        parse_task({**base, "requires": {"os": 3}})


def test_a_class_per_host_places_quickly() -> None:
    # 300 crontabs moved with requires host=...: 300 classes of one task, 300 agents
    agents = [AgentInfo(f"agent-{i:03d}", 1, i + 1, {"host": f"h{i}"}) for i in range(300)]
    tasks = [f"t{i:05d}" for i in range(3300)]
    requires = {f"t{i:05d}": {"host": f"h{i}"} for i in range(300)}
    started = time.perf_counter()
    placement = place_group(tasks, agents, {}, requires=requires)
    took = time.perf_counter() - started
    print(f"\n300 classes of one task and 3000 free tasks on 300 agents: {took * 1000:.0f} ms")
    assert all(placement[f"t{i:05d}"] == f"agent-{i:03d}" for i in range(300))
    assert len(placement) == 3300
    assert took < 3.0
