"""The agent's recipes on their own, with fakes: no MongoDB, no ZooKeeper, nothing sleeps."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cloudtask.agent.armed import Armed
from cloudtask.agent.assigned import AssignedTask
from cloudtask.agent.claims import (
    MAX_MISSED_RECORDS,
    Claim,
    build_documents,
    collapse,
    given_ahead,
    run_tokens,
    token_hash,
    too_late,
)
from cloudtask.agent.leases import LeaseKeeper, lease_name
from cloudtask.agent.manual import WaitingRuns
from cloudtask.agent.scheduler import Fire, Scheduler
from cloudtask.exceptions import NotFound
from cloudtask.task import parse_task

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def spec(**over):
    data = {"name": "t", "schedule": {"every": "10s"}, "command": "true"}
    data.update(over)
    return parse_task(data)


def s(n: float) -> timedelta:
    return timedelta(seconds=n)


def claim(at: float, task_id="a", trigger="schedule", status=None, **over) -> Claim:
    fire = Fire(task_id, T0 + s(at), trigger, 1, status=status)
    return Claim(fire, spec(**over), 1, "token")


# --- claims made ahead, waiting for their time (armed.py) -----------------------------------


def test_armed_claims_come_out_at_their_time_once_and_leave_with_their_task():
    armed = Armed()
    claims = [claim(3), claim(1, "b"), claim(2), claim(2, "c")]
    for i, c in enumerate(claims):
        c.doc = {"_id": f"r{i}"}
    armed.add(claims)
    assert len(armed) == 4 and armed.next_at() == T0 + s(1)
    assert [c.doc["_id"] for c in armed.due(T0 + s(1))] == ["r1"]
    assert armed.due(T0 + s(1)) == []  # once
    assert [c.doc["_id"] for c in armed.of_task("a")] == ["r0", "r2"]  # the task left
    assert armed.take("r3").doc["_id"] == "r3"  # a kill request
    assert armed.take("r3") is None
    assert armed.next_at() is None and len(armed) == 0 and armed.due(T0 + s(9)) == []
    armed.add([claim(5, "d")])
    assert [c.fire.task_id for c in armed.take_all()] == ["d"] and armed.next_at() is None


def test_a_fire_given_ahead_is_claimed_claimed_and_not_collapsed():
    waiting = [claim(-1), claim(1), claim(2)]  # one due, two given ahead
    out = collapse(waiting, T0, Scheduler().late_verdict, "why")
    assert [c.fire.status for c in out] == [None, None, None]
    out.sort(key=lambda c: c.fire.scheduled_for)
    ahead = [given_ahead(c.fire.trigger, c.fire.scheduled_for, c.spec, T0) for c in out]
    assert ahead == [False, True, True]
    build_documents(
        out,
        T0,
        free=0,
        busy=lambda task_id: True,  # forbid: the due one is skipped; the others wait
        slot_of=lambda spec: "one",
        agent_id="a1",
        session=lambda: "s1",
    )
    assert [c.doc["status"] for c in out] == ["skipped", "claimed", "claimed"]


# --- the assigned task --------------------------------------------------------------------


def test_an_assigned_task_from_either_source():
    doc = {"_id": "t1", "revision": 4, "spec": {"name": "x"}, "enabled": 0, "updated_at": T0}
    assert AssignedTask.from_task(doc) == AssignedTask("t1", 4, {"name": "x"}, False, T0)
    node = {"revision": 2, "spec": {"name": "x"}, "updated_at": "2026-06-01T12:00:00+00:00"}
    assert AssignedTask.from_assignment("t1", node) == AssignedTask(
        "t1", 2, {"name": "x"}, True, "2026-06-01T12:00:00+00:00"
    )
    assert AssignedTask.from_assignment("t1", {"spec": {}}).revision == 0
    assert AssignedTask.from_assignment("t1", None) is None
    assert AssignedTask.from_assignment("t1", {"revision": 2, "spec": "broken"}) is None


# --- the rule of a late tick, and claims ----------------------------------------------------


def test_the_late_verdict_of_one_fire():
    verdict = Scheduler(on_time_tolerance=2.0).late_verdict
    catch_up = spec(misfire="run_once", misfire_grace=60)
    assert verdict(catch_up, T0, T0 + s(2)) == "run"
    assert verdict(catch_up, T0, T0 + s(60)) == "catch-up"
    assert verdict(catch_up, T0, T0 + s(61)) == "missed"
    assert verdict(spec(misfire="skip", misfire_grace=60), T0, T0 + s(3)) == "missed"


def test_a_backlog_collapses_to_its_newest_fire_and_records_the_rest():
    verdict = Scheduler().late_verdict
    waiting = [claim(20), claim(0), claim(10), claim(5, trigger="retry"), claim(0, "k")]
    waiting[-1].spec = spec(schedule={"keepalive": True})
    out = collapse(waiting, T0 + s(21), verdict, "not claimed in time: down")
    by_time = {(c.fire.task_id, c.fire.trigger, c.fire.scheduled_for): c for c in out}
    assert len(out) == 5
    assert by_time["a", "schedule", T0 + s(20)].fire.status is None  # on time: runs
    for at in (0, 10):
        older = by_time["a", "schedule", T0 + s(at)]
        assert older.fire.status == "missed" and older.reason == "not claimed in time: down"
    assert by_time["a", "retry", T0 + s(5)].fire.status is None  # kept as it is
    assert by_time["k", "schedule", T0].fire.status is None  # a keepalive start too
    # late: caught up within the grace (run_once, the default), else missed
    (late,) = collapse([claim(0)], T0 + s(30), verdict, "why")
    assert late.fire.trigger == "catch-up" and late.fire.status is None
    (gone,) = collapse([claim(0, misfire_grace=10)], T0 + s(30), verdict, "why")
    assert gone.fire.status == "missed" and gone.reason == "why"


def test_a_huge_backlog_keeps_a_bounded_number_of_records_and_counts_the_rest():
    waiting = [claim(i) for i in range(MAX_MISSED_RECORDS + 6)]
    out = collapse(waiting, T0 + s(MAX_MISSED_RECORDS + 5), Scheduler().late_verdict, "why")
    assert len(out) == MAX_MISSED_RECORDS + 1
    first = min(out, key=lambda c: c.fire.scheduled_for)
    assert first.fire.scheduled_for == T0 + s(5)
    assert "5 earlier fires from" in first.reason and "not recorded one by one" in first.reason


def test_claims_in_doubt_that_landed_too_late_are_not_started():
    verdict = Scheduler().late_verdict
    landed = [claim(0), claim(0, "b"), claim(0, "c", trigger="retry"), claim(0, "d")]
    for c in landed:
        c.doc = {"status": "running"}
    landed[3].doc = {"status": "missed"}
    # a newer fire of a waits, due; b's next fire is given ahead (not due: no reason to
    # drop this one); c's is a retry
    waiting = [claim(1), claim(10, "b"), claim(5, "c")]
    late, start = too_late(landed, waiting, T0 + s(1), verdict)
    assert [c.fire.task_id for c in late] == ["a"]
    assert [c.fire.task_id for c in start] == ["b", "c", "d"]
    late, _ = too_late([landed[1]], [], T0 + s(7200), verdict)  # past its grace now
    assert [c.fire.task_id for c in late] == ["b"]


def test_run_documents_fill_the_free_slots_then_queue_and_forbid_skips_a_busy_task():
    claims = [claim(0), claim(0, "b"), claim(0, "c"), claim(0, "f", concurrency="forbid")]
    claims.append(claim(0, "m", status="missed"))
    claims[-1].reason = "not claimed in time"
    claims[1].doc = {"_id": "kept-id"}
    build_documents(
        claims,
        T0,
        free=2,
        busy=lambda task_id: task_id == "f",
        slot_of=lambda spec: "one",
        agent_id="a1",
        session=lambda: "s1",
    )
    assert [c.doc["status"] for c in claims] == [
        "running",
        "running",
        "queued",
        "skipped",
        "missed",
    ]
    assert claims[1].doc["_id"] == "kept-id"
    assert "forbid" in claims[3].doc["error"] and claims[4].doc["error"] == "not claimed in time"
    assert {c.doc["agent"] for c in claims} == {"a1"} and claims[0].doc["session"] == "s1"
    assert claims[0].doc["token_hash"] == token_hash("token")


def test_run_tokens_are_distinct():
    tokens = run_tokens(50)
    assert len(set(tokens)) == 50 and all(len(t) == 32 for t in tokens)


# --- keepalive leases -------------------------------------------------------------------------


class FakeLeases:
    """The store's lease calls, in memory."""

    def __init__(self):
        self.leases: dict[str, str] = {}
        self.released: list[str] = []

    def acquire_lease(self, name, holder, ttl):
        return self.leases.setdefault(name, holder) == holder

    def read_lease(self, name):
        return {"holder": self.leases[name], "expires_at": 1} if name in self.leases else None

    def renew_lease(self, name, holder, ttl):
        return self.leases.get(name) == holder

    def release_lease(self, name, holder):
        if self.leases.get(name) == holder:
            del self.leases[name]
            self.released.append(holder)


def test_a_lease_lives_while_its_run_starts_then_while_the_run_is_alive():
    store = FakeLeases()
    alive: set[str] = set()
    keeper = LeaseKeeper(
        store, kill=lambda *a: None, alive=alive.__contains__, fence_ok=lambda: True
    )
    assert lease_name("t1") == "keepalive:t1" and lease_name("t1", "a2") == "keepalive:t1:a2"
    assert keeper.acquire(lease_name("t1"), "r1")
    assert not keeper.acquire(lease_name("t1"), "r2")  # held by r1
    keeper.renew_all()
    assert keeper.holds("r1")  # not submitted yet, not alive: kept while it starts
    keeper.submitted("r1")
    alive.add("r1")
    keeper.renew_all()
    assert keeper.holds("r1")
    alive.discard("r1")
    keeper.renew_all()  # gone: released
    assert not keeper.holds("r1") and store.released == ["r1"]
    assert keeper.retry_delay == keeper.ttl / 3


# --- runs waiting for an agent ------------------------------------------------------------------


class FakeWaiting:
    """The store's calls for runs waiting for an agent, the journal and the writer, in memory."""

    def __init__(self, pending, tasks=None):
        self.pending = pending
        self.tasks = tasks or {}
        self.claimed: list[str] = []
        self.finished: list[tuple[str, str, str]] = []

    def pending_runs(self, group):
        return [d for d in self.pending if d.get("agent") is None]

    def take_pending_run(self, run_id, agent, session, hashed, trigger=None, status=None):
        for d in self.pending:
            if d["_id"] == run_id and d.get("agent") is None:
                d.update(agent=agent, session=session, token_hash=hashed)
                if trigger is not None:
                    d["trigger"] = trigger
                if status is not None:
                    d["status"] = status
                return dict(d)
        return None

    def get_task(self, task_id):
        if task_id not in self.tasks:
            raise NotFound(task_id)
        return self.tasks[task_id]

    def claimed_(self, run_ids):
        self.claimed.extend(run_ids)

    def finish_unstarted(self, doc, status, reason, finished_at):
        self.finished.append((doc["_id"], status, reason))


def waiting_runs(fake, known, busy=lambda task_id: False, may_claim=True, armed=None):
    submitted, killed = [], []
    journal = type("J", (), {"claimed": lambda self, ids: fake.claimed_(ids)})()
    runs = WaitingRuns(
        fake,
        journal,
        fake,
        agent_id="a1",
        group="default",
        poll_interval=60.0,
        clock=lambda: T0,
        may_claim=lambda: may_claim,
        session=lambda: "s1",
        known=known.get,
        busy=busy,
        kill_task=lambda task_id, why: killed.append((task_id, why)),
        late_verdict=Scheduler().late_verdict,
        submit=lambda doc, spec, revision, token, trigger, attempt: submitted.append(
            (doc["_id"], trigger, attempt)
        ),
        arm=None if armed is None else lambda doc, *_: armed.append((doc["_id"], doc["status"])),
    )
    return runs, submitted, killed


def test_a_manual_run_is_taken_once_by_the_agent_of_its_task():
    fake = FakeWaiting([{"_id": "m1", "task_id": "t1", "trigger": "manual"}])
    runs, submitted, _ = waiting_runs(fake, {"t1": (1, spec())})
    runs.look(T0)
    assert submitted == [("m1", "manual", 0)] and fake.claimed == ["m1"]
    assert fake.pending[0]["agent"] == "a1" and fake.pending[0]["session"] == "s1"
    runs.look(T0)  # not due again before the poll, and not signalled
    runs.signal()
    runs.look(T0)  # signalled: looks, finds nothing left
    assert submitted == [("m1", "manual", 0)]


def test_a_manual_run_of_a_live_task_another_agent_owns_is_left_to_it():
    tasks = {"t1": {"enabled": True, "revision": 1, "spec": {}}}
    fake = FakeWaiting([{"_id": "m1", "task_id": "t1", "trigger": "manual"}], tasks)
    runs, submitted, _ = waiting_runs(fake, {})
    runs.look(T0)
    assert submitted == [] and fake.pending[0].get("agent") is None
    # paused: whichever agent of the group comes first takes it
    paused = {"name": "t", "schedule": {"every": "1h"}, "command": "true"}
    tasks["t1"] = {"enabled": False, "revision": 1, "spec": paused}
    runs.signal()
    runs.look(T0)
    assert submitted == [("m1", "manual", 0)]


def test_forbid_skips_and_replace_ends_the_run_going():
    pending = [
        {"_id": "m1", "task_id": "f", "trigger": "manual"},
        {"_id": "m2", "task_id": "r", "trigger": "manual"},
    ]
    fake = FakeWaiting(pending)
    known = {"f": (1, spec(concurrency="forbid")), "r": (1, spec(concurrency="replace"))}
    runs, submitted, killed = waiting_runs(fake, known, busy=lambda task_id: True)
    runs.look(T0)
    assert fake.finished == [
        ("m1", "skipped", "the previous run was still running (concurrency: forbid)")
    ]
    assert killed == [("r", "replaced by run m2")] and submitted == [("m2", "manual", 0)]


def test_a_released_claim_is_run_by_its_owner_like_a_late_fire():
    def released(run_id, at, task_id, **over):
        doc = {"_id": run_id, "task_id": task_id, "trigger": "schedule", "slot": "one"}
        return {**doc, "scheduled_for": T0 + s(at), "released_by": "a9", **over}

    pending = [
        released("on-time", 0, "t1"),
        released("late", -30, "t2"),
        released("too-late", -7200, "t3"),
        released("older", -2, "t4"),  # on time, but a newer fire of t4 waits too
        released("newer", -1, "t4"),
        released("not-due", 2, "t5"),  # claimed ahead: started here at its time
        released("other-slot", 0, "t1", slot="a2"),
    ]
    fake = FakeWaiting(pending)
    armed = []
    known = {t: (1, spec()) for t in ("t1", "t2", "t3", "t4", "t5")}
    runs, submitted, _ = waiting_runs(fake, known, armed=armed)
    runs.look(T0)
    assert submitted == [
        ("on-time", "schedule", 0),
        ("late", "catch-up", 0),
        ("newer", "schedule", 0),
    ]
    assert fake.finished == [
        ("too-late", "missed", "released by a9; too late to run"),
        ("older", "missed", "released by a9; a newer fire of the task waited too"),
    ]
    assert armed == [("not-due", "claimed")]
    assert pending[-1].get("agent") is None  # another agent's slot


def test_nothing_is_taken_while_the_fence_does_not_hold():
    fake = FakeWaiting([{"_id": "m1", "task_id": "t1", "trigger": "manual"}])
    runs, submitted, _ = waiting_runs(fake, {"t1": (1, spec())}, may_claim=False)
    runs.look(T0)
    assert submitted == [] and fake.claimed == []


# --- runs of a task's previous owner (handover.py) -----------------------------------------


class FakeRunStates:
    """What the previous owner's runs look like now, by run id."""

    def __init__(self, found, states):
        self.found, self.states = found, states

    def unfinished_runs(self, query):
        return self.found

    def run_states(self, run_ids):
        return {r: self.states[r] for r in run_ids if r in self.states}


def test_a_claim_its_previous_owner_released_holds_nothing_up():
    from cloudtask.agent.handover import ForeignRuns

    found = [
        {"_id": r, "task_id": "t1", "agent": "a9", "trigger": "schedule", "slot": "one"}
        | {"scheduled_for": T0, "attempt": 0}
        for r in ("released", "taken", "going")
    ]
    store = FakeRunStates(found, {})
    retried = []
    foreign = ForeignRuns(
        store, "a1", poll_interval=0.0, spec_of=lambda t: spec(), retry=lambda *a: retried.append(a)
    )
    foreign.note(["t1"])
    assert foreign.running("t1")
    store.states = {
        "released": {"status": "queued", "agent": None},  # handed back, never started
        "taken": {"status": "claimed", "agent": "a1"},  # taken here since
        "going": {"status": "running", "agent": "a9"},
    }
    foreign.check(T0)
    assert foreign.running("t1")  # "going" still runs on a9
    store.states["going"] = {"status": "succeeded", "agent": "a9"}
    foreign.check(T0)
    assert not foreign.running("t1") and retried == []
    foreign.note(["t1"])
    foreign.forget_run("t1", "released")
    foreign.forget_run("t1", "taken")
    foreign.forget_run("t1", "going")
    assert not foreign.running("t1")
