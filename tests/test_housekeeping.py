"""The leader's periodic upkeep (cloudtask.center.housekeeping), with a fake store, writer and
clock: verdicts on unheard runs, the unassigned tasks, the agents' records, the purge."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from helpers import holds, wait_for
from kazoo.exceptions import NoNodeError

from cloudtask.center import housekeeping as hk
from cloudtask.center.housekeeping import Housekeeping, agent_record
from cloudtask.center.tasks import TaskRecord
from cloudtask.center.writer import LeadershipLost
from cloudtask.clock import utcnow
from cloudtask.config import Config
from cloudtask.exceptions import CloudTaskError
from cloudtask.registry import LiveAgent
from cloudtask.runmodel import BEAT_INTERVAL
from cloudtask.zkpaths import ZkPaths, encode

PATHS = ZkPaths("/cloudtask")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeStore:
    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.released: list[dict[str, Any]] = []
        self.calls: list[tuple[str, Any]] = []
        self.failing: set[str] = set()

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if name in self.failing:
            raise CloudTaskError(f"{name} failed")

    def unfinished_runs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        self._call("unfinished_runs", query)
        return list(self.runs)

    def finish_unheard_runs(self, docs: list[dict[str, Any]], reason: str) -> None:
        self._call("finish_unheard_runs", [d["_id"] for d in docs])

    def released_claims(self) -> list[dict[str, Any]]:
        self._call("released_claims")
        return list(self.released)

    def finish_released_claims(self, verdicts: list[tuple[dict[str, Any], str, str]]) -> None:
        self._call("finish_released_claims", [(d["_id"], status) for d, status, _ in verdicts])

    def record_events(self, events: list[dict[str, Any]]) -> None:
        self._call("record_events", [e["task_id"] for e in events])

    def record_agents(self, live: dict[str, dict[str, Any]]) -> None:
        self._call("record_agents", live)

    def purge_runs(self) -> None:
        self._call("purge_runs")

    def named(self, name: str) -> list[Any]:
        return [arg for called, arg in self.calls if called == name]


class FakeWriter:
    def __init__(self) -> None:
        self.leading = True
        self.statuses: list[dict[str, Any]] = []

    def check_fence(self) -> None:
        if not self.leading:
            raise LeadershipLost("gone")

    def put_status(self, status: dict[str, Any]) -> bool:
        self.statuses.append(status)
        return True


class FakeZk:
    connected = False  # the agents are not signalled (they look every few seconds anyway)

    def __init__(self, status: dict[str, Any] | None = None) -> None:
        self.status = status

    def get(self, path: str) -> tuple[bytes, Any]:
        assert path == PATHS.status
        if self.status is None:
            raise NoNodeError(path)
        return encode(self.status), None


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(hk, "time", c)
    return c


def chores(status: dict[str, Any] | None = None, **graces: float) -> Housekeeping:
    return Housekeeping(Config(), FakeStore(), FakeZk(status), PATHS, FakeWriter(), "c1", **graces)


def agent(agent_id: str, session: int, *, leaving: bool = False) -> LiveAgent:
    return LiveAgent(agent_id, "default", 1, 100, session, {"host": "h"}, leaving)


def task(task_id: str, misfire_grace: float = 0.0) -> TaskRecord:
    return TaskRecord(
        task_id, "default", "one", 1, {"name": f"name-{task_id}"}, None, misfire_grace
    )


def run(run_id: str, status: str, session: int, beat: int = 0, agent_id: str | None = "a9"):
    claimed = utcnow() - timedelta(seconds=5)
    return {
        "_id": run_id,
        "status": status,
        "session": f"{session:x}",
        "agent": agent_id,
        "beat": beat,
        "claimed_at": claimed,
    }


def test_default_graces_come_from_the_configuration() -> None:
    config = Config()
    c = chores()
    assert c.unassigned_grace == config.zookeeper.session_timeout
    assert c.lost_grace == 2 * BEAT_INTERVAL + config.agent.kill_grace + 1.0
    assert chores(unassigned_grace=0, lost_grace=3).lost_grace == 3


def test_unheard_runs_released_at_once_or_lost_after_their_grace(clock) -> None:
    c = chores(lost_grace=10)
    live = {"a1": agent("a1", 0x11)}
    c.store.runs = [
        run("queued-gone", "queued", 0x99),
        run("running-gone", "running", 0x99, beat=1),
        run("running-live", "running", 0x11),  # its agent's session is registered
        run("waiting", "queued", 0x99, agent_id=None),  # waits for an agent: not lost
    ]
    late = run("claimed-later", "running", 0x99)
    late["claimed_at"] = utcnow() + timedelta(seconds=60)  # after the agents were read
    c.store.runs.append(late)
    c.judge_unheard_runs(live, utcnow(), {})
    assert c.store.named("finish_unheard_runs") == [["queued-gone"]]
    assert c.due_in() == 10
    clock.now += 6
    c.judge_unheard_runs(live, utcnow(), {})
    assert c.store.named("finish_unheard_runs") == [["queued-gone"], ["queued-gone"]]
    c.store.runs[1]["beat"] = 2  # it beats: its agent still runs it
    clock.now += 6
    c.judge_unheard_runs(live, utcnow(), {})
    assert c.store.named("finish_unheard_runs")[-1] == ["queued-gone"]
    assert c.due_in() == 10
    clock.now += 10
    c.judge_unheard_runs(live, utcnow(), {})
    assert c.store.named("finish_unheard_runs")[-1] == ["queued-gone", "running-gone"]
    assert c.due_in() is None


def test_a_deposed_leader_judges_nothing(clock) -> None:
    c = chores()
    c.writer.leading = False
    c.store.runs = [run("queued-gone", "queued", 0x99)]
    with pytest.raises(LeadershipLost):
        c.judge_unheard_runs({}, utcnow(), {})
    assert c.store.calls == []


def test_released_claims_nobody_took_are_skipped_or_missed(clock) -> None:
    c = chores()
    now = utcnow()
    c.store.released = [
        {"_id": "r1", "task_id": "gone", "scheduled_for": now},
        {"_id": "r2", "task_id": "t1", "scheduled_for": now - timedelta(seconds=100)},
        {"_id": "r3", "task_id": "t1", "scheduled_for": now - timedelta(seconds=5)},
        {"_id": "r4", "task_id": "t2", "scheduled_for": now - timedelta(seconds=100)},
    ]
    tasks = {"t1": task("t1", misfire_grace=10), "t2": task("t2", misfire_grace=3600)}
    c.judge_unheard_runs({}, now, tasks)
    assert c.store.named("finish_released_claims") == [[("r1", "skipped"), ("r2", "missed")]]


def test_a_store_that_does_not_answer_is_tried_on_a_later_pass(clock) -> None:
    c = chores()
    c.store.runs = [run("queued-gone", "queued", 0x99)]
    c.store.failing = {"unfinished_runs"}
    c.judge_unheard_runs({}, utcnow(), {})
    assert c.store.named("finish_unheard_runs") == [] and not c.store.named("released_claims")
    c.store.failing = set()
    c.judge_unheard_runs({}, utcnow(), {})
    assert c.store.named("finish_unheard_runs") == [["queued-gone"]]


def test_unassigned_tasks_are_reported_once_after_their_grace(clock) -> None:
    c = chores(unassigned_grace=5)
    tasks = {"t1": task("t1"), "t2": task("t2")}
    c.note_unassigned({"t1": "night"}, tasks)
    assert c.store.named("record_events") == [] and c.due_in() == 5
    clock.now += 5
    c.store.failing = {"record_events"}
    c.note_unassigned({"t1": "night"}, tasks)  # refused: due again on the next pass
    c.store.failing = set()
    c.note_unassigned({"t1": "night", "t2": "night"}, tasks)
    assert c.store.named("record_events") == [["t1"], ["t1"]]
    clock.now += 5
    c.note_unassigned({"t1": "night", "t2": "night"}, tasks)
    assert c.store.named("record_events")[-1] == ["t2"] and c.due_in() is None
    c.note_unassigned({}, tasks)  # assigned again; unassigned again: a new transition
    c.note_unassigned({"t1": "night"}, tasks)
    clock.now += 5
    c.note_unassigned({"t1": "night"}, tasks)
    assert c.store.named("record_events")[-1] == ["t1"]


def test_a_new_leader_starts_from_what_its_predecessor_published(clock) -> None:
    c = chores({"leader": "c0", "unassigned": {"t1": "night"}}, unassigned_grace=0)
    assert c.take_over()["leader"] == "c0"
    c.note_unassigned({"t1": "night", "t2": "night"}, {})
    assert c.store.named("record_events") == [["t2"]]
    assert chores(None).take_over() == {}


def test_a_new_leader_reports_the_tasks_its_predecessor_left_in_their_grace(clock) -> None:
    # t1 was reported; t2 was still in its grace when the predecessor stopped: not lost
    status = {"leader": "c0", "unassigned": {"t1": "night", "t2": "night"}, "reported": ["t1"]}
    c = chores(status, unassigned_grace=10)
    c.take_over()
    c.note_unassigned({"t1": "night", "t2": "night"}, {})
    assert c.store.named("record_events") == []  # t2's grace starts again here
    clock.now += 10
    c.note_unassigned({"t1": "night", "t2": "night"}, {})
    assert c.store.named("record_events") == [["t2"]]


def test_status_says_which_unassigned_tasks_are_reported(clock) -> None:
    c = chores(None, unassigned_grace=10)
    c.take_over()
    c.note_unassigned({"t1": "night"}, {})
    c.publish_status({}, {"t1": "night"})
    assert c.writer.statuses[-1]["reported"] == []
    clock.now += 10
    c.note_unassigned({"t1": "night"}, {})
    c.publish_status({}, {"t1": "night"})
    assert c.writer.statuses[-1]["reported"] == ["t1"]


def test_status_is_published_when_it_changes(clock) -> None:
    c = chores()
    live = {"a2": agent("a2", 2), "a1": agent("a1", 1), "a3": agent("a3", 3, leaving=True)}
    c.publish_status(live, {"t2": "g", "t1": "g"})
    c.publish_status(live, {"t1": "g", "t2": "g"})
    assert c.writer.statuses == [
        {
            "leader": "c1",
            "unassigned": {"t1": "g", "t2": "g"},
            "reported": [],
            "agents": ["a1", "a2"],
        }
    ]
    c.forget_written()  # the view was rebuilt: written again
    c.publish_status(live, {"t1": "g", "t2": "g"})
    assert len(c.writer.statuses) == 2


def test_agents_are_recorded_when_they_change_and_every_interval(clock) -> None:
    c = chores()
    live = {"a1": agent("a1", 1)}
    c.record_agents(live)
    c.record_agents(live)
    assert len(c.store.named("record_agents")) == 1
    assert c.store.named("record_agents")[0] == {
        "a1": {"host": "h", "group": "default", "leaving": False, "czxid": 100}
    }
    c.record_agents({**live, "a2": agent("a2", 2)})
    assert len(c.store.named("record_agents")) == 2
    clock.now += hk.AGENT_RECORD_INTERVAL
    c.record_agents({**live, "a2": agent("a2", 2)})
    assert len(c.store.named("record_agents")) == 3
    assert agent_record(agent("a9", 9, leaving=True))["leaving"] is True


def test_old_runs_are_purged_hourly(clock) -> None:
    c = chores()
    c.purge_runs()
    c.purge_runs()
    clock.now += hk.PURGE_INTERVAL
    c.store.failing = {"purge_runs"}
    c.purge_runs()  # logged; the next try is an hour later
    c.purge_runs()
    assert len(c.store.named("purge_runs")) == 2


# --- the upkeep thread --------------------------------------------------------------------


class Chores:
    """Rounds of upkeep as the thread calls them: each view seen, a round held until let go,
    a grace that ends, a deposed leader."""

    def __init__(self) -> None:
        self.views: list[str] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.due: float | None = None
        self.deposed = False

    def upkeep(self, view: str, halted: Any = None) -> None:
        self.views.append(view)
        self.entered.set()
        assert self.go.wait(10)
        if self.deposed:
            raise LeadershipLost("the election node is gone")

    def due_in(self) -> float | None:
        return self.due


def test_upkeep_rounds_never_hold_up_the_pass_and_take_the_newest_view() -> None:
    chores = Chores()
    chores.go.clear()  # the first round waits (a MongoDB that stalls)
    thread = hk.UpkeepThread(chores)
    thread.start()
    try:
        thread.submit("v1")
        assert chores.entered.wait(5)
        for view in ("v2", "v3", "v4"):  # passes go on meanwhile: submit does not wait
            thread.submit(view)
        assert chores.views == ["v1"]
        chores.go.set()
        wait_for(lambda: thread.rounds == 2, timeout=5)
        assert chores.views == ["v1", "v4"]  # one round more, on the newest view only
    finally:
        thread.stop()
    assert not thread._thread.is_alive()


def test_a_grace_that_ends_is_a_round_on_the_view_held() -> None:
    chores = Chores()
    thread = hk.UpkeepThread(chores)
    thread.start()
    try:
        thread.submit("v1")
        wait_for(lambda: thread.rounds == 1, timeout=5)
        chores.due = 0.3  # e.g. a departed agent's run is lost in 0.3 s
        thread.submit("v2")
        wait_for(lambda: thread.rounds >= 3, timeout=5)
        assert set(chores.views) == {"v1", "v2"}
        chores.due = None
        thread.submit("v3")
        wait_for(lambda: chores.views[-1] == "v3" and thread.rounds == len(chores.views))
        rounds = thread.rounds
        holds(lambda: thread.rounds == rounds, seconds=0.6)  # no grace: no round
    finally:
        thread.stop()


def test_an_upkeep_that_finds_the_fence_gone_deposes_the_leader() -> None:
    chores = Chores()
    chores.deposed = True
    woken = threading.Event()
    thread = hk.UpkeepThread(chores, on_deposed=woken.set)
    thread.start()
    thread.submit("v1")
    assert woken.wait(5) and thread.deposed
    thread._thread.join(5)
    assert not thread._thread.is_alive()  # no round after that


def test_a_round_stops_between_chores_once_the_leadership_ends(clock) -> None:
    c = chores(None, unassigned_grace=0)
    halted = iter([False, True])  # the second chore finds the leadership ended
    view = hk.PassView(agents={}, tasks={}, unassigned={"t1": "night"}, read_at=None)
    c.upkeep(view, lambda: next(halted))
    assert c.store.named("record_events") == [["t1"]]
    assert c.writer.statuses == []  # nothing published for the ended leadership


def test_leading_again_waits_for_the_previous_leaderships_round() -> None:
    chores = Chores()
    chores.go.clear()  # a round waits for MongoDB when the leadership ends
    thread = hk.UpkeepThread(chores)
    thread.start()
    thread.submit("v1")
    assert chores.entered.wait(5)
    thread.stop(timeout=0.1)  # gives up waiting; the round goes on alone
    ended = []
    waiter = threading.Thread(target=lambda: ended.append(thread.ended(threading.Event())))
    waiter.start()
    holds(lambda: not ended, seconds=0.5)  # the new leadership does not start beside it
    chores.go.set()
    waiter.join(5)
    assert ended == [True] and chores.views == ["v1"]
    stopping = threading.Event()
    stopping.set()
    assert hk.UpkeepThread(chores).ended(stopping)  # never started: nothing to wait for
