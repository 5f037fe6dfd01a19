"""The standalone agent end to end on a real MongoDB wire server: claims, policies, task changes."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from helpers import QuietHandler, holds, make_task, serve_http, wait_for

from cloudtask.agent.agent import Agent
from cloudtask.agent.identity import resolve_agent_id
from cloudtask.config import Config
from cloudtask.operations import Operations
from cloudtask.runmodel import RUNNING_STATUSES, new_run_document
from cloudtask.store import Store
from cloudtask.testing.records import overlaps, read_records, recording_command

PY = sys.executable


class Running:
    """Agents running in threads, stopped at the end of the test."""

    def __init__(self, mongo_client, db_name, tmp_path):
        self.mongo_client, self.db_name, self.tmp_path = mongo_client, db_name, tmp_path
        self.agents: list[tuple[Agent, threading.Thread]] = []

    def start(self, agent_id: str, config: Config | None = None, **agent_cfg) -> Agent:
        settings = {
            "data_dir": str(self.tmp_path / agent_id),
            "poll_interval": 0.2,
            "kill_grace": 1.0,
        }
        settings.update(agent_cfg)
        cfg = (config or Config()).with_section("agent", **settings)
        agent = Agent(cfg, Store(self.mongo_client, self.db_name), agent_id=agent_id)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        self.agents.append((agent, thread))
        return agent

    def stop_all(self):
        for agent, _ in self.agents:
            agent.stop()
        for _, thread in self.agents:
            thread.join(timeout=30)
            assert not thread.is_alive(), "agent did not stop"


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


def make(store, **over) -> dict:
    return make_task(store, over.pop("name", "t"), **{"schedule": {"every": "1s"}, **over})


def runs(store, task_id, **query):
    return list(
        store.runs.find({"task_id": task_id, **query}).sort([("scheduled_for", 1), ("attempt", 1)])
    )


def test_two_agents_fire_each_time_once(store, agents):
    task = make(store)
    agents.start("a1")
    agents.start("a2")
    wait_for(
        lambda: len(runs(store, task["_id"], status="succeeded")) >= 5,
        timeout=15,
        message="too few runs",
    )
    agents.stop_all()
    docs = runs(store, task["_id"])
    per_fire = Counter((d["scheduled_for"], d["attempt"]) for d in docs)
    assert max(per_fire.values()) == 1, "a fire ran twice"
    # the fires claimed ahead of their due time when the agents stopped are handed back for
    # the task's next agent, never started
    for d in docs:
        released = d["status"] == "queued" and d["agent"] is None
        assert d["status"] in ("succeeded", "missed") or released, d
        if released:
            assert "stopped before it was due" in d["error"] and d["started_at"] is None
    assert any(d["status"] == "queued" for d in docs)
    # fires are one second apart on the grid, with none skipped in the window
    times = sorted(d["scheduled_for"] for d in docs)
    assert all((b - a) == timedelta(seconds=1) for a, b in zip(times, times[1:]))
    assert all(t.microsecond == 0 for t in times)


def test_mode_all_runs_once_per_agent(store, agents):
    task = make(store, mode="all")
    agents.start("a1")
    agents.start("a2")
    wait_for(
        lambda: {d["agent"] for d in runs(store, task["_id"], status="succeeded")} == {"a1", "a2"},
        timeout=10,
        message="not every agent ran it",
    )
    agents.stop_all()
    per_slot = Counter((d["scheduled_for"], d["slot"]) for d in runs(store, task["_id"]))
    assert max(per_slot.values()) == 1
    for d in runs(store, task["_id"]):  # (a claim made ahead is handed back at the stop)
        assert d["slot"] == d["agent"] or (d["status"] == "queued" and d["agent"] is None)


def test_forbid_skips_while_previous_runs(store, agents):
    task = make(store, command=[PY, "-c", "import time; time.sleep(2.5)"], concurrency="forbid")
    agents.start("a1")
    wait_for(
        lambda: runs(store, task["_id"], status="skipped"), timeout=10, message="nothing skipped"
    )
    agents.stop_all()
    docs = runs(store, task["_id"])
    skipped = [d for d in docs if d["status"] == "skipped"]
    assert "still running" in skipped[0]["error"]
    running_at_once = [d for d in docs if d["status"] in ("succeeded", "killed", "running")]
    for a, b in zip(running_at_once, running_at_once[1:]):
        assert b["started_at"] >= a["finished_at"], "forbid let two runs overlap"


def test_replace_kills_the_running_one(store, agents):
    task = make(store, command=["sleep", "30"], concurrency="replace", schedule={"every": "2s"})
    agents.start("a1")
    killed = wait_for(
        lambda: runs(store, task["_id"], status="killed"), timeout=10, message="none replaced"
    )
    assert killed[0]["error"].startswith("replaced by run ")


def test_retries_keep_the_fire_time_and_count_attempts(store, agents):
    task = make(
        store,
        command=[PY, "-c", "import sys; sys.exit(3)"],
        retries=2,
        retry_delay="0s",
        schedule={"every": "1h"},
        misfire_grace="2h",
    )
    # run it now by giving it a one-shot schedule instead
    store.replace_task(
        task["_id"],
        {
            **task["spec"],
            "schedule": {"at": (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()},
        },
    )
    agents.start("a1")
    docs = wait_for(
        lambda: (d := runs(store, task["_id"], status="failed")) and len(d) == 3 and d,
        timeout=15,
        message="not 3 attempts",
    )
    assert [d["attempt"] for d in docs] == [0, 1, 2]
    assert [d["trigger"] for d in docs] == ["schedule", "retry", "retry"]
    assert len({d["scheduled_for"] for d in docs}) == 1
    assert all(d["exit_code"] == 3 for d in docs)
    # the one-shot task is done after its last attempt
    wait_for(
        lambda: store.get_task(task["_id"]).get("done_at"), timeout=5, message="not marked done"
    )


def test_one_shot_runs_once_and_is_marked_done(store, agents):
    at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=2)
    task = make(store, schedule={"at": at.isoformat()})
    agents.start("a1")
    agents.start("a2")
    wait_for(
        lambda: (
            store.get_task(task["_id"]).get("done_at")
            and all(d["status"] not in RUNNING_STATUSES for d in runs(store, task["_id"]))
        ),
        timeout=10,
        message="not done",
    )  # done_at and the run's final write come from two threads, in either order
    docs = runs(store, task["_id"])
    assert [(d["scheduled_for"], d["status"]) for d in docs] == [(at, "succeeded")]


def test_keepalive_restarts_with_backoff(store, agents):
    task = make(store, schedule={"keepalive": True}, command=[PY, "-c", "print('up')"])
    agents.start("a1")
    docs = wait_for(
        lambda: (d := runs(store, task["_id"], status="succeeded")) and len(d) >= 3 and d,
        timeout=15,
        message="not restarted",
    )
    assert [d["trigger"] for d in docs[:3]] == ["schedule", "restart", "restart"]
    gaps = [(b["started_at"] - a["finished_at"]).total_seconds() for a, b in zip(docs, docs[1:3])]
    assert 0.8 <= gaps[0] <= 2.5 and 1.8 <= gaps[1] <= 3.5  # 1 s, then 2 s


def test_changes_are_picked_up_without_restart(store, agents):
    task = make(store, command=[PY, "-c", "print('v1')"])
    agents.start("a1")
    wait_for(lambda: runs(store, task["_id"], status="succeeded"), timeout=10, message="no v1 run")
    store.replace_task(task["_id"], {**task["spec"], "command": [PY, "-c", "print('v2')"]})
    wait_for(
        lambda: any(d["output_tail"].strip() == "v2" for d in runs(store, task["_id"])),
        timeout=10,
        message="v2 never ran",
    )
    latest = runs(store, task["_id"])[-1]
    assert latest["revision"] == 2


def test_paused_and_deleted_tasks_stop_firing(store, agents):
    never = make(store, name="never", enabled=False)
    deleted = make(store, name="deleted")
    paused = make(store, name="paused")
    agents.start("a1")
    wait_for(
        lambda: runs(store, deleted["_id"]) and runs(store, paused["_id"]),
        timeout=10,
        message="no run",
    )
    store.delete_task(deleted["_id"])
    Operations(store).set_enabled("test", paused["_id"], False)
    # the runs already claimed finish; then nothing more (poll interval 0.2 s: many polls)
    gone = (deleted["_id"], paused["_id"])
    wait_for(lambda: not any(store.unfinished_runs({"task_id": t}) for t in gone), timeout=10)
    before = {t: len(runs(store, t)) for t in gone}
    holds(lambda: {t: len(runs(store, t)) for t in before} == before, 2.5)
    assert runs(store, never["_id"]) == []


class _Handler(QuietHandler):
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Handler.seen.append((self.path, self.headers, body))  # case-insensitive
        self.reply(201 if self.path == "/ok" else 500, b'{"done": true}')


@pytest.fixture
def http_server():
    _Handler.seen = []
    with serve_http(_Handler) as url:
        yield url


def test_http_task_headers_status_and_failover(store, agents, http_server):
    from cloudtask.localservers import free_port

    dead = f"http://127.0.0.1:{free_port()}/ok"
    task = make(
        store,
        command=None,
        http={
            "urls": [dead, f"{http_server}/ok"],
            "strategy": "failover",
            "method": "POST",
            "body": {"x": 1},
            "expect_status": [201],
        },
    )
    bad = make(
        store, name="bad", command=None, http={"url": f"{http_server}/fail", "method": "POST"}
    )
    agents.start("a1")
    ok = wait_for(
        lambda: runs(store, task["_id"], status="succeeded"), timeout=10, message="http run failed"
    )[0]
    assert ok["http_status"] == 201 and '"done"' in ok["output_tail"]
    failed = wait_for(
        lambda: runs(store, bad["_id"], status="failed"), timeout=10, message="no failure"
    )[0]
    assert failed["http_status"] == 500 and "expected 2xx" in failed["error"]
    path, headers, body = next(s for s in _Handler.seen if s[0] == "/ok")
    assert json.loads(body) == {"x": 1}
    assert headers["X-CloudTask-Run-Id"] in {d["_id"] for d in runs(store, task["_id"])}
    assert headers["X-CloudTask-Task"] == "t" and headers["X-CloudTask-Agent"] == "a1"
    assert headers["X-CloudTask-Token"] and headers["X-CloudTask-Trigger"] == "schedule"


def test_agent_id_is_kept_in_data_dir(tmp_path):
    first = resolve_agent_id("", tmp_path)
    assert resolve_agent_id("", tmp_path) == first
    assert resolve_agent_id("fixed", tmp_path) == "fixed"


def running_runs(store, task_id):
    return runs(store, task_id, status="running")


def test_keepalive_runs_once_across_agents(store, agents):
    task = make(store, schedule={"keepalive": True}, command=["sleep", "60"])
    agents.start("a1")
    agents.start("a2")
    wait_for(lambda: running_runs(store, task["_id"]), timeout=10, message="never started")
    holds(lambda: len(running_runs(store, task["_id"])) <= 1, 4.0, message="two at once")
    assert store.leases.count_documents({}) == 1


def test_keepalive_stops_when_paused_and_runs_once_when_resumed(store, agents):
    task = make(store, schedule={"keepalive": True}, command=["sleep", "60"])
    agents.start("a1")
    first = wait_for(lambda: running_runs(store, task["_id"]), timeout=10, message="never started")[
        0
    ]
    Operations(store).set_enabled("test", task["_id"], False)
    wait_for(
        lambda: store.get_run(first["_id"])["status"] == "killed", timeout=10, message="not stopped"
    )
    assert "paused" in store.get_run(first["_id"])["error"]
    Operations(store).set_enabled("test", task["_id"], True)
    second = wait_for(lambda: running_runs(store, task["_id"]), timeout=20, message="not resumed")
    assert len(second) == 1 and second[0]["_id"] != first["_id"]
    holds(lambda: len(running_runs(store, task["_id"])) == 1, 1.0)


def test_keepalive_edit_restarts_with_new_definition(store, agents):
    task = make(
        store,
        schedule={"keepalive": True},
        command=[PY, "-u", "-c", "print('v1'); import time; time.sleep(60)"],
    )
    agents.start("a1")
    wait_for(
        lambda: "v1" in "".join(d["output_tail"] for d in running_runs(store, task["_id"])),
        timeout=10,
        message="v1 not up",
    )
    store.replace_task(
        task["_id"],
        {**task["spec"], "command": [PY, "-u", "-c", "print('v2'); import time; time.sleep(60)"]},
    )
    wait_for(
        lambda: "v2" in "".join(d["output_tail"] for d in running_runs(store, task["_id"])),
        timeout=15,
        message="v2 not up",
    )
    killed = runs(store, task["_id"], status="killed")
    assert killed and "restarted for revision 2" in killed[0]["error"]


def test_killed_keepalive_is_restarted(store, agents):
    task = make(store, schedule={"keepalive": True}, command=["sleep", "60"])
    agent = agents.start("a1")
    first = wait_for(lambda: running_runs(store, task["_id"]), timeout=10, message="never started")[
        0
    ]
    assert agent.executor.kill(first["_id"], "killed by an operator")
    again = wait_for(
        lambda: [d for d in running_runs(store, task["_id"]) if d["_id"] != first["_id"]],
        timeout=10,
        message="not restarted",
    )
    assert again[0]["trigger"] == "restart"


def test_agent_loop_survives_an_unexpected_error(store, agents, monkeypatch):
    task = make(store)
    agent = agents.start("a1")
    original = agent.scheduler.tick
    calls = {"n": 0}

    def flaky(now):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(now)

    monkeypatch.setattr(agent.scheduler, "tick", flaky)
    wait_for(
        lambda: calls["n"] > 3 and runs(store, task["_id"], status="succeeded"),
        timeout=10,
        message="loop died",
    )


def test_restarted_agent_records_what_it_missed(store, agents):
    task = make(store, misfire="run_once", misfire_grace="1h")
    first = agents.start("a1")
    wait_for(
        lambda: len(runs(store, task["_id"], status="succeeded")) >= 2,
        timeout=10,
        message="no runs",
    )
    first.stop()
    agents.agents[0][1].join(timeout=30)
    # the last fire it ran (the ones it had claimed ahead are handed back at the stop)
    last = [d for d in runs(store, task["_id"]) if d["agent"]][-1]["scheduled_for"]
    time.sleep(3.5)  # three or four fires pass with no agent
    agents.start("a1")
    wait_for(
        lambda: runs(store, task["_id"], status="missed"),
        timeout=10,
        message="nothing recorded missed",
    )
    wait_for(lambda: len(runs(store, task["_id"], status="succeeded")) >= 4, timeout=10)
    docs = runs(store, task["_id"])
    times = [d["scheduled_for"] for d in docs]
    assert times == sorted(set(times)), "a fire was recorded twice"
    assert all((b - a) == timedelta(seconds=1) for a, b in zip(times, times[1:])), (
        "a fire is missing"
    )
    missed = [d for d in docs if d["status"] == "missed"]
    assert len(missed) >= 2 and all(d["scheduled_for"] > last for d in missed)


def test_retries_owed_by_a_stopped_agent_are_made_by_the_next(store, agents):
    at = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    task = make(
        store,
        schedule={"at": at},
        command=[PY, "-c", "import sys; sys.exit(2)"],
        retries=1,
        retry_delay="3s",
    )
    first = agents.start("a1")
    wait_for(
        lambda: runs(store, task["_id"], status="failed"), timeout=10, message="no first attempt"
    )
    first.stop()  # before its retry is due
    agents.agents[0][1].join(timeout=30)
    assert [d["attempt"] for d in runs(store, task["_id"])] == [0]
    agents.start("a2")
    second = wait_for(lambda: runs(store, task["_id"], attempt=1), timeout=15, message="retry lost")
    assert second[0]["agent"] == "a2" and second[0]["trigger"] == "retry"


def test_forbid_holds_across_agents_when_a_task_changes_hands(store, agents):
    task = make(store, command=["sleep", "3"], concurrency="forbid")
    first = agents.start("a1", kill_grace=6.0)
    run = wait_for(
        lambda: runs(store, task["_id"], status="running"), timeout=10, message="no run"
    )[0]
    first.stop()  # a1 lets its run finish (up to 6 s) while a2 takes over
    agents.start("a2")
    wait_for(lambda: store.get_run(run["_id"])["status"] == "succeeded", timeout=15)
    wait_for(lambda: runs(store, task["_id"], agent="a2", status="succeeded"), timeout=15)
    skipped = runs(store, task["_id"], agent="a2", status="skipped")
    assert skipped and "still running" in skipped[0]["error"]
    ran = [d for d in runs(store, task["_id"]) if d.get("started_at") and d.get("finished_at")]
    ran.sort(key=lambda d: d["started_at"])
    for a, b in zip(ran, ran[1:]):
        assert b["started_at"] >= a["finished_at"], "two runs of a forbid task overlapped"


def test_forbid_holds_against_a_former_owner_that_has_not_seen_the_move(store, agents, tmp_path):
    """The task came here, and only then does its former owner (cut off, so it did not see the
    move) start a run of it: this agent's next claims see that run once they are written and
    are recorded skipped until it ends. The task's own records show no overlap."""
    records = tmp_path / "records"
    command = recording_command(records, work="sleep 0.2", lock=tmp_path / "t.lock")
    task = make(store, command=command, concurrency="forbid")
    agents.start("a1")
    wait_for(lambda: runs(store, task["_id"], status="succeeded"), timeout=10, message="no run")
    # the former owner's late run: claimed (running) after a1 read the task's history
    now = datetime.now(timezone.utc)
    foreign = new_run_document(
        task_id=task["_id"],
        task_name="t",
        group="default",
        revision=task["revision"],
        scheduled_for=now - timedelta(milliseconds=300),  # off the grid: its own fire
        slot="one",
        attempt=0,
        trigger="schedule",
        agent="a0",
        status="running",
        now=now,
    )
    assert store.claim_runs([foreign]) == [True]
    skipped = wait_for(
        lambda: [d for d in runs(store, task["_id"], status="skipped") if "a0" in d["error"]],
        timeout=10,
        message="a1 did not see the former owner's run",
    )
    assert "still running on a0" in skipped[0]["error"]
    assert not runs(store, task["_id"], status="running", agent="a1")
    # the former owner's run ends: a1 runs the task again
    store.runs.update_one({"_id": foreign["_id"]}, {"$set": {"status": "succeeded"}})
    ended = datetime.now(timezone.utc)
    wait_for(
        lambda: [
            d for d in runs(store, task["_id"], status="succeeded") if d["scheduled_for"] > ended
        ],
        timeout=15,
        message="a1 did not run the task again",
    )
    assert overlaps(read_records(records)) == []
