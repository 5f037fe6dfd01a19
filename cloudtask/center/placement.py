"""Placement of a group's mode-``one`` tasks on its live agents: pure logic, no I/O.

The leading center calls :func:`place_group` on every reconcile with the tasks that should
run, the live agents of the group (from ZooKeeper) and where every task is now, and writes
only the difference (:func:`diff_placement`). The result depends on nothing but the
arguments: not on their order, not on dict or set iteration order, not on
``PYTHONHASHSEED``, not on the clock. Feeding the result back as the current placement
(with ``epoch = ring_epoch(agents)``) and the same agents changes nothing.

How a group is placed
=====================

One consistent-hash ring per group: a :class:`uhashring.HashRing` with ``vnodes * weight``
points per agent. Its points are md5 digests of ``"<agent id>-<n>"`` and a task's point is
the md5 digest of its id, so the ring never touches Python's salted ``hash()``; agents are
added in sorted order, so even a (practically impossible) collision of two points resolves
the same way every time. The ring is uhashring's; the lookups are done here, with
``bisect`` over ``HashRing.get_points()`` and ``HashRing.hashi()``, exactly as uhashring's
``get_node`` does, because the bounded-load walk ("the first agent clockwise that still
has room") needs the ring's order, which uhashring only offers as a generator that copies
the key list on every call. A test checks that the preferred agent found here is
``HashRing.get_node``'s.

* ``cap(agent) = ceil(load_factor * N * weight / total_weight)`` for ``N`` tasks: no agent
  is ever given more than ``load_factor`` times its weighted share of the mean (bounded
  loads). Since the caps add up to at least ``N`` (``load_factor >= 1``), every task fits.
* The task's *preferred* agent is the ring's owner of the task id.
* **Sticky**: a task whose current agent is live stays there, except when its preferred
  agent ``p`` is another agent, ``p.joined > current[task].epoch`` (``p`` registered, or
  re-registered, after the assignment was written) and ``p`` is below its cap: then it
  moves to ``p``. So when an agent joins only the tasks the ring gives it move (to it), and
  when an agent leaves only its tasks move; no memory is needed beyond ZooKeeper's czxids.
  A task that stays because ``p`` is at its cap is *re-dated* (:attr:`GroupPlan.redated`):
  its assignment is written again with the new epoch, so the pull is settled at the join
  and not left pending for a later change (an agent leaving, a task added) to carry out.
* **Unplaced** tasks (new, or whose agent is gone) go to the first agent with room walking
  the ring clockwise from the task's point.
* **Over cap** agents (tasks deleted, weights changed, a join lowered the mean): exactly
  their excess moves, tasks not on their preferred agent first, each to the first agent
  with room clockwise from its point.

Tasks are handled in ring order (task point, then id) and agents in id order, so the
result never depends on the input order. A weight change alone does not pull a task onto
its newly preferred agent (that agent did not join); it moves only what the new caps force.

Requirements: agent labels
==========================

A task may require agent labels (its spec's ``requires``, such as ``{"os": "windows"}``):
only an agent whose labels (``agent.labels``, published in its registration) include every
one of them may run it. The tasks of a group are placed in *classes*, one per distinct
requirement (the tasks that require nothing are one class, placed on every agent). Each
class is placed by the rules above, on its own: on the group's ring with the points of the
agents that do not match left out (the same ring positions, so the same owners among the
matching agents), with caps computed over the class's tasks and the matching agents'
weights. A class is thus balanced over the agents that can run it, and every property above
holds for each class, so for the whole group: when an agent leaves only its tasks move, when
one joins only tasks it matches and the ring gives it move to it. A class no live agent
matches is not placed: its tasks are in :attr:`GroupPlan.unmatched` (the center records
them ``task.unassigned``, reason ``no_agent_matches``) and are placed as soon as a matching
agent registers. The classes share no caps: an agent's load is the sum of its share of each
class it matches, so tasks that require nothing are spread over every agent, also over those
that run the tasks only they match.

Load at first placement
=======================

Agents publish how many runs they are running (``AgentInfo.running``). A task with no
current placement (new, or whose agent is gone) is not simply given the first agent with
room clockwise: of the first ``LOAD_CHOICES`` (two) agents with room clockwise, it goes to
the one with fewer running runs per unit of weight, the first clockwise on a tie. So with
equal (or no) load figures the rule is the plain ring's. Running counts are arguments like
the rest, so the result stays a function of the arguments; and they are looked at only for a
task being placed: a placed task never moves because loads changed (its assignment's epoch
is at least its agents' registrations, so the join rule does not pull it back either).

Example::

    >>> agents = [AgentInfo("agent-a", weight=1, joined=101), AgentInfo("agent-b", 1, 102)]
    >>> placement = place_group(["t1", "t2", "t3", "t4"], agents, {})
    >>> sorted(placement) == ["t1", "t2", "t3", "t4"]
    True
    >>> epoch = ring_epoch(agents)
    >>> current = {task: Assignment(agent, epoch) for task, agent in placement.items()}
    >>> place_group(placement, agents, current) == placement  # nothing changed: nothing moves
    True
    >>> agents.append(AgentInfo("agent-c", weight=1, joined=103))  # joins after `epoch`
    >>> added, removed, moved = diff_placement(placement, place_group(placement, agents, current))
    >>> (added, removed, all(to == "agent-c" for _, to in moved.values()))
    ({}, {}, True)
    >>> agents.append(AgentInfo("agent-w", 1, 104, {"os": "windows"}))  # labels
    >>> needs = {"t5": {"os": "windows"}, "t6": {"os": "mac"}}
    >>> plan = plan_group(["t5", "t6"], agents, {}, requires=needs)
    >>> (plan.placement, plan.unmatched)
    ({'t5': 'agent-w'}, {'t6': {'os': 'mac'}})
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from uhashring import HashRing

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "DEFAULT_VNODES",
    "LOAD_CHOICES",
    "AgentInfo",
    "Assignment",
    "GroupPlan",
    "agent_info",
    "diff_placement",
    "matches",
    "place_group",
    "plan_group",
    "ring_epoch",
    "shards",
]

DEFAULT_VNODES = 160
DEFAULT_LOAD_FACTOR = 1.25
LOAD_CHOICES = 2  # agents with room a task being placed chooses from by their running runs


@dataclass(frozen=True)
class AgentInfo:
    """A live agent of a group, as the center sees it in ZooKeeper."""

    agent_id: str
    weight: int
    """Capacity share, >= 1: the agent gets ``vnodes * weight`` points on the ring."""
    joined: int
    """When this incarnation registered: the czxid of its ephemeral node (monotonic)."""
    labels: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    """Its labels (``agent.labels``); kept as sorted ``(name, value)`` pairs."""
    running: int = 0
    """How many runs it is running, as it last published (>= 0)."""

    def __post_init__(self) -> None:
        if not isinstance(self.agent_id, str) or not self.agent_id:
            raise ValueError(f"agent_id must be a non-empty string, got {self.agent_id!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 1:
            raise ValueError(f"weight of agent {self.agent_id!r} must be an int >= 1")
        if isinstance(self.joined, bool) or not isinstance(self.joined, int):
            raise ValueError(f"joined of agent {self.agent_id!r} must be an int")
        if isinstance(self.running, bool) or not isinstance(self.running, int) or self.running < 0:
            raise ValueError(f"running of agent {self.agent_id!r} must be an int >= 0")
        pairs = self.labels.items() if isinstance(self.labels, Mapping) else self.labels
        labels = tuple(sorted((name, value) for name, value in pairs))
        if not all(isinstance(n, str) and isinstance(v, str) for n, v in labels):
            raise ValueError(f"labels of agent {self.agent_id!r} must be strings")
        if len({name for name, _ in labels}) != len(labels):
            raise ValueError(f"labels of agent {self.agent_id!r} name a label twice")
        object.__setattr__(self, "labels", labels)  # hashable, and one order for equal labels

    def matches(self, requires: Mapping[str, str]) -> bool:
        """Whether this agent has every label of ``requires`` with its value."""
        return matches(dict(self.labels), requires)


def matches(labels: Mapping[str, str], requires: Mapping[str, str]) -> bool:
    """Whether ``labels`` include every ``name: value`` of ``requires``."""
    return all(labels.get(name) == value for name, value in requires.items())


def agent_info(agent_id: str, weight: int, joined: int, info: Mapping[str, Any]) -> AgentInfo:
    """The :class:`AgentInfo` of a registration whose published ``info`` may be anything: its
    ``labels`` (string values only; anything else is no label) and ``load.running`` (a
    whole number >= 0, else 0)."""
    raw = info.get("labels") if isinstance(info, Mapping) else None
    labels = (
        {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(raw, Mapping)
        else {}
    )
    load = info.get("load") if isinstance(info, Mapping) else None
    running = load.get("running") if isinstance(load, Mapping) else None
    if isinstance(running, bool) or not isinstance(running, int) or running < 0:
        running = 0
    return AgentInfo(agent_id, weight, joined, labels, running)


def shards(agent_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``agent id -> (index, total)`` for a ``mode: all`` task's agents: the index is the
    position in sorted agent ids (0-based), the total how many there are.

    >>> shards(["b", "a", "c"])
    {'a': (0, 3), 'b': (1, 3), 'c': (2, 3)}
    """
    ordered = sorted(set(agent_ids))
    return {aid: (index, len(ordered)) for index, aid in enumerate(ordered)}


@dataclass(frozen=True)
class Assignment:
    """Where a task is placed now."""

    agent_id: str
    epoch: int
    """``ring_epoch(agents)`` when this assignment was written."""


@dataclass(frozen=True)
class GroupPlan:
    """A group's placement (task id -> agent id, sorted by task id) and the tasks whose
    assignment is to be re-dated: kept where they are although their preferred agent joined
    after the assignment was written, because it had no room."""

    placement: dict[str, str]
    redated: frozenset[str]
    unmatched: dict[str, dict[str, str]] = field(default_factory=dict)
    """Tasks not placed because no live agent has the labels they require (task id ->
    its requirements), sorted by task id."""


def ring_epoch(agents: Iterable[AgentInfo]) -> int:
    """The newest registration among ``agents`` (max ``joined``), 0 if there are none."""
    return max((agent.joined for agent in agents), default=0)


def diff_placement(
    old: Mapping[str, str], new: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str, str]]]:
    """``(added, removed, moved)`` between two placements (task id -> agent id).

    ``added``: tasks only in ``new`` (with their new agent); ``removed``: tasks only in
    ``old`` (with their old agent); ``moved``: task -> ``(from, to)`` for tasks in both whose
    agent changed. Each dict is sorted by task id.
    """
    added = {task: new[task] for task in sorted(new) if task not in old}
    removed = {task: old[task] for task in sorted(old) if task not in new}
    moved = {
        task: (old[task], new[task])
        for task in sorted(new)
        if task in old and old[task] != new[task]
    }
    return added, removed, moved


class _Ring:
    """A uhashring ring, with its points as sorted parallel lists for bisect and walks."""

    def __init__(self, agents: Mapping[str, AgentInfo], vnodes: int) -> None:
        ring = HashRing(
            {aid: {"weight": agents[aid].weight, "vnodes": vnodes} for aid in sorted(agents)}
        )
        points = ring.get_points()  # [(point, agent id)] sorted by point
        self.hashi = ring.hashi  # md5 of str(key) as an int: no salted hash()
        self.points = [point for point, _ in points]
        self.owners = [owner for _, owner in points]
        self.distinct = len(set(self.owners))
        self._by_owner: dict[str, list[tuple[int, str]]] | None = None  # (only() builds it)

    def only(self, agent_ids: Iterable[str]) -> _Ring:
        """This ring with only the points of ``agent_ids``: the ring of those agents alone
        (a point depends on nothing but its agent's id, weight and ``vnodes``). Costs the
        points kept, not the whole ring: a group of 300 agents each with a class of its own
        (``requires: {"host": ...}``) takes milliseconds."""
        if self._by_owner is None:
            self._by_owner = {}
            for point, owner in zip(self.points, self.owners):
                self._by_owner.setdefault(owner, []).append((point, owner))
        sub = object.__new__(_Ring)
        sub.hashi = self.hashi
        sub._by_owner = None
        lists = [self._by_owner.get(aid, []) for aid in sorted(set(agent_ids))]
        pairs = lists[0] if len(lists) == 1 else list(heapq.merge(*lists))
        sub.points = [p for p, _ in pairs]
        sub.owners = [o for _, o in pairs]
        sub.distinct = len(set(sub.owners))
        return sub

    def start(self, key: str) -> tuple[int, int]:
        """``(point of key, index of the first ring point clockwise)``, as uhashring does."""
        point = self.hashi(key)
        index = bisect(self.points, point)
        return point, 0 if index == len(self.points) else index

    def walk(self, index: int) -> Iterator[str]:
        """The distinct agents clockwise from ring index ``index``, each once."""
        seen: set[str] = set()
        owners = self.owners
        count = len(owners)
        for step in range(count):
            owner = owners[(index + step) % count]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self.distinct:
                    return


def _live_agents(agents: Iterable[AgentInfo]) -> dict[str, AgentInfo]:
    """Agents by id, sorted; of two entries with one id the newest incarnation wins."""
    by_id: dict[str, AgentInfo] = {}
    for agent in agents:
        seen = by_id.get(agent.agent_id)
        if seen is None or _newer(agent, seen):
            by_id[agent.agent_id] = agent
    return {aid: by_id[aid] for aid in sorted(by_id)}


def _newer(agent: AgentInfo, seen: AgentInfo) -> bool:
    """Which of two entries with one id wins: the later registration (then any other field,
    so that the choice never depends on the order they came in)."""
    return (agent.joined, agent.weight, agent.labels, agent.running) > (
        seen.joined,
        seen.weight,
        seen.labels,
        seen.running,
    )


def _caps(agents: Mapping[str, AgentInfo], tasks: int, load_factor: float) -> dict[str, int]:
    """``ceil(load_factor * tasks * weight / total_weight)`` per agent, in exact arithmetic."""
    total = sum(agent.weight for agent in agents.values())
    factor = Fraction(load_factor) * tasks
    return {aid: math.ceil(factor * agent.weight / total) for aid, agent in agents.items()}


def place_group(
    task_ids: Iterable[str],
    agents: Iterable[AgentInfo],
    current: Mapping[str, Assignment],
    *,
    requires: Mapping[str, Mapping[str, str]] | None = None,
    vnodes: int = DEFAULT_VNODES,
    load_factor: float = DEFAULT_LOAD_FACTOR,
) -> dict[str, str]:
    """Task id -> agent id for every task of ``task_ids`` that can be placed (none if there
    are no agents): ``plan_group(...).placement``."""
    return plan_group(
        task_ids, agents, current, requires=requires, vnodes=vnodes, load_factor=load_factor
    ).placement


def plan_group(
    task_ids: Iterable[str],
    agents: Iterable[AgentInfo],
    current: Mapping[str, Assignment],
    *,
    requires: Mapping[str, Mapping[str, str]] | None = None,
    vnodes: int = DEFAULT_VNODES,
    load_factor: float = DEFAULT_LOAD_FACTOR,
) -> GroupPlan:
    """Where every task of ``task_ids`` goes, and which kept assignments are re-dated.

    ``task_ids``: the group's mode-``one`` tasks that should run (duplicates are ignored).
    ``agents``: its live agents (if an id appears twice, the higher ``joined`` wins).
    ``current``: where tasks are now; entries for other tasks or dead agents are fine.
    ``requires``: task id -> the labels it requires (a task not in it requires none).
    The result is sorted by task id. See the module docstring for the rules.
    """
    if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
        raise ValueError(f"vnodes must be an int >= 1, got {vnodes!r}")
    if not load_factor >= 1.0 or math.isinf(load_factor):  # also rejects NaN
        raise ValueError(f"load_factor must be a finite number >= 1, got {load_factor!r}")
    tasks = sorted(set(task_ids))
    live = _live_agents(agents)
    if not tasks or not live:
        return GroupPlan({}, frozenset())
    needs = requires or {}
    classes: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for task in tasks:
        classes.setdefault(tuple(sorted(needs.get(task, {}).items())), []).append(task)

    ring = _Ring(live, vnodes)
    labels = {aid: dict(agent.labels) for aid, agent in live.items()}
    placement: dict[str, str] = {}
    redated: set[str] = set()
    unmatched: dict[str, dict[str, str]] = {}
    for key in sorted(classes):
        wanted = dict(key)
        eligible = {aid: agent for aid, agent in live.items() if matches(labels[aid], wanted)}
        if not eligible:
            unmatched.update((task, dict(wanted)) for task in classes[key])
            continue
        sub = ring if len(eligible) == len(live) else ring.only(eligible)
        part, kept = _place_class(classes[key], eligible, sub, current, load_factor)
        placement.update(part)
        redated |= kept
    return GroupPlan(
        {task: placement[task] for task in tasks if task in placement},
        frozenset(redated),
        {task: unmatched[task] for task in sorted(unmatched)},
    )


def _place_class(
    tasks: list[str],
    live: Mapping[str, AgentInfo],
    ring: _Ring,
    current: Mapping[str, Assignment],
    load_factor: float,
) -> tuple[dict[str, str], frozenset[str]]:
    """One class of tasks (sorted ids, one requirement) on the agents that match it (by id,
    sorted) and their ring: the rules of the module's docstring."""
    caps = _caps(live, len(tasks), load_factor)
    load = dict.fromkeys(live, 0)
    start: dict[str, int] = {}  # task -> ring index of its preferred agent
    keyed: list[tuple[int, str]] = []
    for task in tasks:
        point, start[task] = ring.start(task)
        keyed.append((point, task))
    keyed.sort()
    ring_order = [task for _, task in keyed]
    rank = {task: position for position, task in enumerate(ring_order)}

    def preferred(task: str) -> str:
        return ring.owners[start[task]]

    def first_with_room(task: str, choices: int = 1) -> str:
        """The first agent with room clockwise; of the first ``choices`` such agents, the
        one running the fewest runs per unit of weight (the first of them on a tie)."""
        found: list[str] = []
        for aid in ring.walk(start[task]):
            if load[aid] < caps[aid]:
                found.append(aid)
                if len(found) == choices:
                    break
        if found:
            return min(
                enumerate(found),
                key=lambda item: (Fraction(live[item[1]].running, live[item[1]].weight), item[0]),
            )[1]
        # Only reachable if an agent lost every ring point to md5 collisions.
        return min(live, key=lambda aid: (load[aid] - caps[aid], aid))

    placement: dict[str, str] = {}
    joiners: list[str] = []  # candidates to move to a newly (re)joined preferred agent
    unplaced: list[str] = []
    for task in ring_order:
        assignment = current.get(task)
        if assignment is None or assignment.agent_id not in live:
            unplaced.append(task)
            continue
        owner = preferred(task)
        if owner != assignment.agent_id and live[owner].joined > assignment.epoch:
            joiners.append(task)
            continue
        placement[task] = assignment.agent_id
        load[assignment.agent_id] += 1

    blocked: set[str] = set()
    for task in joiners:
        owner = preferred(task)
        target = owner if load[owner] < caps[owner] else current[task].agent_id
        if target != owner:
            blocked.add(task)
        placement[task] = target
        load[target] += 1

    for task in unplaced:  # (placed for the first time, or again: the load figures count)
        target = first_with_room(task, LOAD_CHOICES)
        placement[task] = target
        load[target] += 1

    over = [aid for aid in live if load[aid] > caps[aid]]
    if over:
        held: dict[str, list[str]] = {aid: [] for aid in over}
        for task in ring_order:
            if placement[task] in held:
                held[placement[task]].append(task)
        for aid in over:
            # Tasks not on their preferred agent first, then in ring order.
            held[aid].sort(key=lambda task: (preferred(task) == aid, rank[task]))
            for task in held[aid][: load[aid] - caps[aid]]:
                load[aid] -= 1  # stays >= its cap until the last one, so never chosen again
                target = first_with_room(task)
                placement[task] = target
                load[target] += 1

    kept = frozenset(t for t in blocked if placement[t] == current[t].agent_id)
    return placement, kept
