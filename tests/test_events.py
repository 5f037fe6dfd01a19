"""Events recorded where things happen (issue 5, item 1), on the real MongoDB wire server and,
where the center matters, a real ZooKeeper: final runs, recoveries, agents that join, leave
and come back, leadership, unassigned tasks, audited task changes; and that an event that
cannot be recorded never fails the write it hangs on."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime, timedelta, timezone

import pytest
from helpers import make_task, run_document, wait_for
from kazoo.client import KazooClient
from test_cluster import SESSION, Cluster, agent_count, assignments, make_tasks

from cloudtask import events as ev
from cloudtask.center.center import Center
from cloudtask.clock import to_bson_time
from cloudtask.config import Config
from cloudtask.operations import Operations
from cloudtask.zkpaths import ZkPaths, encode

PATHS = ZkPaths("/cloudtask")
NOW = to_bson_time(datetime.now(timezone.utc) - timedelta(minutes=5))
CONTRACT_FIELDS = {
    "_id",
    "version",
    "kind",
    "severity",
    "at",
    "ts",
    "message",
    "task_id",
    "task_name",
    "group",
    "run_id",
    "agent",
    "details",
    "delivery",
}
RUN_DETAILS = {
    "status",
    "trigger",
    "attempt",
    "scheduled_for",
    "started_at",
    "finished_at",
    "duration",
    "exit_code",
    "http_status",
    "error",
    "output_tail_lines",
}


def events(store, **query) -> list[dict]:
    """Events, oldest first (ids made in one process sort in order within a millisecond)."""
    return list(store.events.find(query).sort([("ts", 1), ("_id", 1)]))


def claimed(store, task, when=NOW, status="running", agent="a1") -> dict:
    doc = run_document(task, when, status=status, agent=agent)
    assert store.claim_runs([doc]) == [True]
    return doc


def finish(doc, status, *, exit_code=None, seconds=3.0, **more) -> dict:
    started = doc["claimed_at"]
    return {
        **doc,
        "status": status,
        "started_at": started,
        "finished_at": to_bson_time(started + timedelta(seconds=seconds)),
        "duration": seconds,
        "exit_code": exit_code,
        **more,
    }


def run_once(store, task, status, when, **more) -> dict:
    """A run of ``task`` scheduled at ``when`` that finishes with ``status``, written as the
    agent writes it (claim, then the final state through save_runs)."""
    done = finish(claimed(store, task, when), status, **more)
    store.save_runs([done])
    return done


# --- runs -------------------------------------------------------------------------------------

OUTPUT = "".join(f"line {i}\n" for i in range(1, 31))


@pytest.mark.parametrize(
    ("status", "kind", "severity", "words"),
    [
        ("failed", "run.failed", "error", "failed on agent a1 (exit 2)"),
        ("timed_out", "run.timed_out", "error", "timed out on agent a1 after 3s"),
        ("lost", "run.lost", "error", "run lost on agent a1"),
    ],
)
def test_a_final_run_records_one_event_also_when_written_again(
    store, status, kind, severity, words
):
    task = make_task(store, "nightly")
    doc = claimed(store, task)
    final = finish(doc, status, exit_code=2 if status == "failed" else None, output_tail=OUTPUT)
    store.save_runs([final])
    store.save_runs([final])  # the same final write again (a retry): still one event
    store.note_last_runs([final])
    (event,) = events(store)
    assert set(event) == CONTRACT_FIELDS
    assert event["_id"] == f"{kind}:{doc['_id']}"
    assert (event["kind"], event["severity"], event["version"]) == (kind, severity, 1)
    assert event["delivery"] == "new"
    assert event["at"] == final["finished_at"] and event["ts"] == final["finished_at"].timestamp()
    assert words in event["message"] and "nightly" in event["message"]
    assert (event["task_id"], event["task_name"], event["group"]) == (
        task["_id"],
        "nightly",
        "default",
    )
    assert (event["run_id"], event["agent"]) == (doc["_id"], "a1")
    details = event["details"]
    assert set(details) == RUN_DETAILS
    assert details["status"] == status and details["trigger"] == "schedule"
    assert details["scheduled_for"] == doc["scheduled_for"].isoformat()
    assert details["finished_at"] == final["finished_at"].isoformat()
    assert details["duration"] == 3.0 and details["attempt"] == 0
    assert details["output_tail_lines"] == "\n".join(f"line {i}" for i in range(11, 31))
    assert store.get_run(doc["_id"])["status"] == status


def test_a_missed_fire_records_one_event_also_when_the_claim_is_retried(store):
    task = make_task(store, "nightly")
    doc = run_document(task, NOW, status="missed", agent="a1")
    assert store.claim_runs([doc]) == [True]
    assert store.claim_runs([doc]) == [True]  # its answer was lost: the same claim again
    (event,) = events(store)
    assert event["_id"] == f"run.missed:{doc['_id']}"
    assert (event["kind"], event["severity"]) == ("run.missed", "warning")
    assert "missed its fire" in event["message"]
    assert event["details"]["status"] == "missed"
    # another process's claim of the same fire (another run id) is no event of ours
    rival = run_document(task, NOW, status="missed", agent="a2")
    assert store.claim_runs([rival]) == [False]
    assert len(events(store)) == 1


def test_runs_marked_lost_record_one_event_each(store):
    task = make_task(store, "nightly")
    docs = [claimed(store, task, NOW + timedelta(seconds=i), agent="gone") for i in range(3)]
    lost = store.mark_runs_lost({"agent": "gone"}, "its agent left the cluster")
    assert sorted(lost) == sorted(d["_id"] for d in docs)
    assert store.mark_runs_lost({"agent": "gone"}, "its agent left the cluster") == []
    found = events(store)
    assert sorted(e["_id"] for e in found) == sorted(f"run.lost:{d['_id']}" for d in docs)
    assert all("its agent left the cluster" in e["message"] for e in found)


def test_a_late_write_that_does_not_land_records_nothing(store):
    """The center marked the run lost; a write of another agent is not stored, nor alerted."""
    task = make_task(store, "nightly")
    doc = claimed(store, task, agent="gone")
    store.mark_runs_lost({"agent": "gone"}, "its agent left the cluster")
    store.save_runs([finish({**doc, "agent": "other"}, "failed", exit_code=1)])
    assert store.get_run(doc["_id"])["status"] == "lost"
    assert [e["kind"] for e in events(store)] == ["run.lost"]


def test_the_real_outcome_of_a_run_marked_lost_is_recorded_and_alerted(store):
    """Its own agent finishes it after all: the history and the events say what happened."""
    task = make_task(store, "nightly")
    doc = claimed(store, task, agent="gone")
    store.mark_runs_lost({"agent": "gone"}, "its agent left the cluster")
    store.save_runs([finish(doc, "failed", exit_code=1)])
    assert store.get_run(doc["_id"])["status"] == "failed"
    assert sorted(e["kind"] for e in events(store)) == ["run.failed", "run.lost"]


def test_killed_skipped_and_succeeded_runs_are_no_alerts(store):
    task = make_task(store, "nightly")
    store.save_runs([finish(claimed(store, task, NOW), "killed")])
    store.save_runs([finish(claimed(store, task, NOW + timedelta(seconds=1)), "succeeded")])
    assert store.claim_runs([run_document(task, NOW + timedelta(seconds=2), status="skipped")])
    manual = Operations(store).run_now("alice", task["_id"])
    assert Operations(store).kill_run("alice", manual["_id"])  # cancelled before any agent took it
    assert store.get_run(manual["_id"])["status"] == "killed"
    assert events(store) == []


def test_a_success_is_an_event_only_for_a_task_that_asks_for_it(store):
    quiet = make_task(store, "quiet", notify={"emails": ["a@example.com"]})
    loud = make_task(
        store, "loud", notify={"emails": ["a@example.com"], "on": ["failure", "success"]}
    )
    store.save_runs([finish(claimed(store, quiet, NOW), "succeeded")])
    done = finish(claimed(store, loud, NOW), "succeeded", exit_code=0, output_tail=OUTPUT)
    store.save_runs([done])
    store.save_runs([done])  # written again: still one event
    (event,) = events(store)
    assert event["_id"] == f"run.succeeded:{done['_id']}"
    assert (event["kind"], event["severity"], event["task_name"]) == (
        "run.succeeded",
        "info",
        "loud",
    )
    assert event["message"] == "task loud succeeded on agent a1 in 3s"
    assert event["details"]["status"] == "succeeded" and event["details"]["exit_code"] == 0
    # a failure of the same task is still its own alert, and the next success also counts
    run_once(store, loud, "failed", NOW + timedelta(minutes=1), exit_code=1)
    run_once(store, loud, "succeeded", NOW + timedelta(minutes=2))
    assert [e["kind"] for e in events(store)] == [
        "run.succeeded",
        "run.failed",
        "run.recovered",
        "run.succeeded",
    ]


def test_recovered_after_failures_counts_them(store):
    task = make_task(store, "nightly")
    t = NOW
    run_once(store, task, "succeeded", t)
    run_once(store, task, "failed", t + timedelta(minutes=1), exit_code=1)
    run_once(store, task, "timed_out", t + timedelta(minutes=2))
    run_once(store, task, "killed", t + timedelta(minutes=3))  # neither counts nor ends it
    assert store.get_task(task["_id"])["last_run"]["failures"] == 2
    ok = run_once(store, task, "succeeded", t + timedelta(minutes=4))
    (recovered,) = events(store, kind="run.recovered")
    assert recovered["_id"] == f"run.recovered:{ok['_id']}"
    assert recovered["severity"] == "info" and recovered["run_id"] == ok["_id"]
    assert recovered["details"]["failures"] == 2
    assert recovered["details"]["previous_status"] == "killed"
    assert "after 2 failing runs" in recovered["message"]
    assert store.get_task(task["_id"])["last_run"]["failures"] == 0
    # the same success written again, and a second success: no other recovery
    store.save_runs([ok])
    run_once(store, task, "succeeded", t + timedelta(minutes=5))
    assert len(events(store, kind="run.recovered")) == 1
    assert sorted(e["kind"] for e in events(store)) == [
        "run.failed",
        "run.recovered",
        "run.timed_out",
    ]


def test_recovered_from_a_lost_run_and_within_one_batch(store):
    lost_task, batch_task = make_task(store, "a"), make_task(store, "b")
    claimed(store, lost_task, agent="gone")
    store.mark_runs_lost({"agent": "gone"}, "its agent left the cluster")
    run_once(store, lost_task, "succeeded", NOW + timedelta(minutes=1))
    # a failure and the success after it in the same write
    failing = finish(claimed(store, batch_task, NOW), "failed", exit_code=3)
    fixed = finish(claimed(store, batch_task, NOW + timedelta(minutes=1)), "succeeded")
    store.save_runs([fixed, failing])
    by_task = {e["task_id"]: e for e in events(store, kind="run.recovered")}
    assert by_task[lost_task["_id"]]["details"]["previous_status"] == "lost"
    assert by_task[lost_task["_id"]]["details"]["failures"] == 1
    assert by_task[batch_task["_id"]]["run_id"] == fixed["_id"]
    assert by_task[batch_task["_id"]]["details"]["previous_status"] == "failed"
    assert len(by_task) == 2


def test_missed_fires_are_no_failures_and_not_what_a_recovery_ends():
    """A fire recorded missed (the cluster was down or restarting) neither counts as a
    failure, nor starts a streak, nor is the status a recovery comes after."""
    from cloudtask.runmodel import count_failures as _count_failures

    def run(n, status):
        return {"_id": f"r{n}", "status": status, "task_id": "t", "agent": "a1"}

    assert _count_failures({}, [run(1, "missed"), run(2, "missed")]) == (0, [])
    assert _count_failures({}, [run(1, "missed"), run(2, "succeeded")]) == (0, [])
    failures, (recovered,) = _count_failures(
        {"id": "r0", "status": "failed", "failures": 1},
        [run(1, "missed"), run(2, "failed"), run(3, "missed"), run(4, "succeeded")],
    )
    assert failures == 0 and recovered["details"]["failures"] == 2
    assert recovered["details"]["previous_status"] == "failed"


def test_no_recovery_after_a_success(store):
    task = make_task(store, "nightly")
    run_once(store, task, "succeeded", NOW)
    run_once(store, task, "succeeded", NOW + timedelta(minutes=1))
    assert events(store) == []


def test_a_run_write_succeeds_when_its_event_is_refused(store, caplog):
    """The events collection refuses every error event: a unique index on severity that an
    error event already holds. The run write, and the task's last run, still succeed."""
    task = make_task(store, "nightly")
    blocker = run_document(task, NOW - timedelta(hours=1), status="missed")
    store.events.insert_one({"_id": "blocker", "severity": "error"})
    store.events.create_index("severity", unique=True, name="refuse_errors")
    doc = claimed(store, task)
    with caplog.at_level(logging.WARNING, logger="cloudtask.store"):
        store.save_runs([finish(doc, "failed", exit_code=1)])
    assert store.get_run(doc["_id"])["status"] == "failed"
    assert store.get_task(task["_id"])["last_run"]["status"] == "failed"
    assert not store.events.find_one({"_id": f"run.failed:{doc['_id']}"})
    assert "cannot record the events" in caplog.text
    # and a refused event is not taken for one recorded already
    assert store.claim_runs([blocker]) == [True]  # a warning event: recorded
    assert store.events.find_one({"_id": f"run.missed:{blocker['_id']}"})


# --- agents (the leader's view, through record_agents) ----------------------------------------


def info(czxid: int, **more) -> dict:
    return {"group": "default", "host": "h1", "pid": 42, "czxid": czxid, **more}


def test_agents_joined_left_returned_once_each(store):
    t = NOW
    store.record_agents({"a1": info(10)}, now=t)
    store.record_agents({"a1": info(10)}, now=t + timedelta(seconds=1))  # the same view
    (joined,) = events(store)
    assert set(joined) == CONTRACT_FIELDS
    assert joined["_id"] == "agent.joined:a1:10"
    assert (joined["kind"], joined["severity"], joined["agent"]) == ("agent.joined", "info", "a1")
    assert joined["details"]["host"] == "h1" and joined["details"]["pid"] == 42
    assert joined["group"] == "default"

    store.record_agents({}, now=t + timedelta(seconds=2))  # kill -9: its registration is gone
    store.record_agents({}, now=t + timedelta(seconds=3))
    left = events(store, kind="agent.left")
    assert len(left) == 1 and left[0]["severity"] == "error"
    assert "session ended" in left[0]["message"] and left[0]["details"]["host"] == "h1"

    store.record_agents({"a1": info(20)}, now=t + timedelta(seconds=4))
    store.record_agents({"a1": info(20)}, now=t + timedelta(seconds=5))
    (back,) = events(store, kind="agent.returned")
    assert back["details"]["offline_since"] == (t + timedelta(seconds=2)).isoformat()
    assert [e["kind"] for e in events(store)] == ["agent.joined", "agent.left", "agent.returned"]

    # stopped cleanly (leaving), then restarted under a new registration no leader saw go
    store.record_agents({"a1": info(20, leaving=True)}, now=t + timedelta(seconds=6))
    store.record_agents({}, now=t + timedelta(seconds=7))
    stopped = events(store, kind="agent.left")[-1]
    assert "it stopped" in stopped["message"] and stopped["severity"] == "info"
    assert stopped["details"]["reason"] == "stopped"
    store.record_agents({"a1": info(30)}, now=t + timedelta(seconds=8))
    store.record_agents({"a1": info(40)}, now=t + timedelta(seconds=9))  # restarted unseen
    kinds = [e["kind"] for e in events(store)]
    assert kinds[3:] == ["agent.left", "agent.returned", "agent.left", "agent.returned"]
    assert store.agents.find_one({"_id": "a1"})["czxid"] == 40


def test_a_second_leader_does_not_record_an_agent_change_twice(store):
    """A leader recorded the events of a change but stopped before writing the agents: the
    next leader sees the same stored state and records the same ids (nothing new)."""
    store.record_agents({"a1": info(10), "a2": info(11)}, now=NOW)
    before = {d["_id"]: d for d in store.agents.find()}
    store.record_agents({"a2": info(11)}, now=NOW + timedelta(seconds=1))
    assert len(events(store, kind="agent.left")) == 1
    store.agents.replace_one({"_id": "a1"}, before["a1"])  # as if never written
    store.record_agents({"a2": info(11)}, now=NOW + timedelta(seconds=2))
    assert len(events(store, kind="agent.left")) == 1
    assert store.agents.find_one({"_id": "a1"})["status"] == "offline"


def registration(czxid: int) -> dict:
    """What an agent registers (and the leader stores as its info)."""
    return info(czxid, agent_id="a1", started_at="2026-12-01T03:00:00+00:00")


def test_a_clean_stop_the_leader_never_saw_leaving_is_no_alert(store):
    """The agent records its own departure (``agent_stopped``) before it deletes its
    registration; the leader, too slow to see ``leaving``, records the same id: one
    agent.left, "stopped", info; and the return after it is no alert either."""
    store.record_agents({"a1": registration(10)}, now=NOW)
    mine = ev.agent_stopped("a1", registration(10), 10, NOW + timedelta(seconds=1))
    assert store.record_event(mine)
    store.record_agents({}, now=NOW + timedelta(seconds=2))  # the node is gone, no leaving seen
    (left,) = events(store, kind="agent.left")
    assert left["_id"] == mine["_id"] == "agent.left:a1:10:1796094000000"
    assert left["severity"] == "info" and left["details"]["reason"] == "stopped"
    assert "stopped" in left["message"] and "crashed" not in left["message"]
    assert ev.clean_stop(left)
    stored = store.agents.find_one({"_id": "a1"})
    assert (stored["status"], stored["left_reason"]) == ("offline", "stopped")

    store.record_agents({"a1": registration(20)}, now=NOW + timedelta(seconds=30))
    (back,) = events(store, kind="agent.returned")
    assert back["severity"] == "info" and back["details"]["left_reason"] == "stopped"
    assert "after a clean stop" in back["message"] and ev.clean_stop(back)


def test_a_clean_stop_seen_only_when_the_agent_is_back_is_no_alert(store):
    """`cloudtask up` stopped with Ctrl-C: the agents and the center stop at once, so no
    leader sees them go; the next leader finds them registered again under new czxids."""
    store.record_agents({"a1": registration(10)}, now=NOW)
    store.record_event(ev.agent_stopped("a1", registration(10), 10, NOW + timedelta(seconds=1)))
    store.record_agents({"a1": registration(20)}, now=NOW + timedelta(seconds=60))
    kinds = [(e["kind"], e["severity"], ev.clean_stop(e)) for e in events(store)]
    assert kinds == [
        ("agent.joined", "info", False),
        ("agent.left", "info", True),
        ("agent.returned", "info", True),
    ]


def test_a_crash_stays_an_error_and_its_return_an_alert(store):
    store.record_agents({"a1": registration(10)}, now=NOW)
    store.record_agents({}, now=NOW + timedelta(seconds=2))  # the session ended: no stop
    (left,) = events(store, kind="agent.left")
    assert (left["severity"], left["details"]["reason"]) == ("error", "session ended")
    assert "killed, crashed or cut off" in left["message"] and not ev.clean_stop(left)
    assert store.agents.find_one({"_id": "a1"})["left_reason"] == "session ended"
    store.record_agents({"a1": registration(20)}, now=NOW + timedelta(seconds=30))
    (back,) = events(store, kind="agent.returned")
    assert back["message"] == "agent a1 is back (group default, host h1)"
    assert not ev.clean_stop(back)
    # a stop recorded for another registration (the one before) does not hide this crash
    store.record_event(ev.agent_stopped("a1", registration(10), 10, NOW))
    store.record_agents({}, now=NOW + timedelta(seconds=40))
    assert [e["severity"] for e in events(store, kind="agent.left")] == ["error", "error"]


# --- audited task changes -----------------------------------------------------------------------


def test_task_changes_through_operations_record_events_with_the_actor(store):
    ops = Operations(store)
    task = ops.create_task("alice", {"name": "job", "schedule": {"every": "1h"}, "command": "true"})
    ops.replace_task(
        "bob", task["_id"], {"name": "job", "schedule": {"every": "2h"}, "command": "true"}
    )
    ops.set_enabled("carol", task["_id"], False)
    ops.set_enabled("carol", task["_id"], False)  # no change: no audit, no event
    ops.set_enabled("carol", task["_id"], True)
    copy = ops.clone_task("dave", task["_id"], "job-copy")
    outcome, _ = ops.apply_task(
        "cli:erin", {"name": "job", "schedule": {"every": "2h"}, "command": "true"}
    )
    assert outcome == "unchanged"
    ops.apply_task("cli:erin", {"name": "applied", "schedule": {"every": "1h"}, "command": "true"})
    ops.delete_task("frank", task["_id"])
    found = events(store)
    assert [(e["kind"], e["details"]["actor"], e["task_name"]) for e in found] == [
        ("task.created", "alice", "job"),
        ("task.changed", "bob", "job"),
        ("task.changed", "carol", "job"),
        ("task.changed", "carol", "job"),
        ("task.created", "dave", "job-copy"),
        ("task.created", "cli:erin", "applied"),
        ("task.deleted", "frank", "job"),
    ]
    assert all(set(e) == CONTRACT_FIELDS and e["severity"] == "info" for e in found)
    assert [e["task_id"] for e in found[:4]] == [task["_id"]] * 4
    assert found[4]["task_id"] == copy["_id"]
    assert found[1]["details"]["changed"] == ["schedule"]
    assert "changed by bob (schedule)" in found[1]["message"]
    assert "paused by carol" in found[2]["message"] and "resumed" in found[3]["message"]
    assert found[4]["details"]["cloned_from"] == "job"
    assert "deleted by frank" in found[6]["message"]
    for event in found:  # each names its audit entry
        entry = store.audit.find_one({"_id": event["details"]["audit_id"]})
        assert entry["actor"] == event["details"]["actor"]
    # a manual run is audited but is no task change
    ops.run_now("gina", copy["_id"])
    assert len(events(store)) == 7


# --- the leading center -----------------------------------------------------------------------


class Centers:
    """Centers in threads, each with its own ZooKeeper session."""

    def __init__(self, zk_hosts: str, store) -> None:
        self.zk_hosts, self.store = zk_hosts, store
        self.running: dict[str, tuple[Center, threading.Thread, KazooClient]] = {}

    def start(self, center_id: str, **options) -> Center:
        client = KazooClient(self.zk_hosts, timeout=2)
        client.start(timeout=15)
        cfg = Config().with_section("zookeeper", hosts=self.zk_hosts)
        options.setdefault("resync_interval", 0.3)
        center = Center(cfg, self.store, client, center_id=center_id, **options)
        thread = threading.Thread(target=center.run, daemon=True)
        thread.start()
        self.running[center_id] = (center, thread, client)
        return center

    def stop(self, center_id: str) -> None:
        center, thread, client = self.running.pop(center_id)
        center.stop()
        thread.join(timeout=30)
        client.stop()
        client.close()

    def stop_all(self) -> None:
        for center_id in list(self.running):
            self.stop(center_id)


@pytest.fixture
def centers(zk_hosts, store):
    running = Centers(zk_hosts, store)
    yield running
    running.stop_all()


@pytest.fixture
def fake_agent(zk_hosts):
    clients: list[KazooClient] = []

    def join(agent_id: str, group: str = "default") -> KazooClient:
        client = KazooClient(hosts=zk_hosts, timeout=2)
        client.start()
        client.ensure_path(PATHS.agent_group(group))
        doc = {"weight": 1, "host": "fake", "pid": 1}
        client.create(PATHS.agent(group, agent_id), encode(doc), ephemeral=True)
        clients.append(client)
        return client

    yield join
    for client in clients:
        client.stop()
        client.close()


def test_a_leader_change_records_center_leader(centers, store):
    first = centers.start("c1")
    wait_for(lambda: first.leading and first.reconciles, timeout=20)
    second = centers.start("c2")
    wait_for(lambda: events(store, kind="center.leader"), timeout=10)
    assert not second.leading
    centers.stop("c1")
    wait_for(lambda: second.leading and second.reconciles, timeout=20)
    led = events(store, kind="center.leader")
    assert [e["details"]["center_id"] for e in led] == ["c1", "c2"]
    assert led[0]["details"]["previous"] is None and led[1]["details"]["previous"] == "c1"
    assert "taking over from c1" in led[1]["message"] and led[1]["severity"] == "info"
    assert led[1]["_id"].startswith("center.leader:c2:") and set(led[1]) == CONTRACT_FIELDS


def test_a_group_without_agents_records_task_unassigned_once(centers, store, fake_agent, zk):
    task = make_task(store, "lonely", group="night")
    first = centers.start("c1", unassigned_grace=0)
    (event,) = wait_for(lambda: events(store, kind="task.unassigned"), timeout=20)
    assert (event["task_id"], event["task_name"], event["group"]) == (
        task["_id"],
        "lonely",
        "night",
    )
    assert event["severity"] == "error" and "group night has no live agent" in event["message"]
    passes = first.reconciles
    wait_for(lambda: first.reconciles >= passes + 5, timeout=20)
    assert len(events(store, kind="task.unassigned")) == 1  # not on every pass
    # the next leader starts from the /status its predecessor wrote: no second event
    second = centers.start("c2", unassigned_grace=0)
    centers.stop("c1")
    wait_for(lambda: second.leading and second.reconciles >= 3, timeout=20)
    assert len(events(store, kind="task.unassigned")) == 1
    # an agent comes, the task is placed; it goes, the task is unassigned again: a new event
    agent = fake_agent("n1", group="night")
    wait_for(lambda: zk.exists(PATHS.assignment("n1", task["_id"])), timeout=20)
    joined = wait_for(lambda: events(store, kind="agent.joined"), timeout=20)
    assert joined[0]["agent"] == "n1" and joined[0]["group"] == "night"
    agent.stop()
    agent.close()
    wait_for(lambda: len(events(store, kind="task.unassigned")) == 2, timeout=20)
    left = wait_for(lambda: events(store, kind="agent.left"), timeout=20)
    assert left[0]["agent"] == "n1" and left[0]["details"]["host"] == "fake"


def test_a_brief_gap_within_the_grace_is_no_event(centers, store):
    make_task(store, "lonely", group="night")
    center = centers.start("c1", unassigned_grace=600)
    wait_for(lambda: center.reconciles >= 5, timeout=20)
    assert center.unassigned  # it is unassigned, but not for long enough to alert
    assert events(store, kind="task.unassigned") == []


# --- end to end: an agent killed with kill -9 ---------------------------------------------------


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()


@pytest.mark.timeout(180)
def test_an_agent_stopped_while_no_center_runs_is_a_clean_stop(cluster, zk, store):
    """No leader sees the agent leaving (the center was killed first): the agent's own record
    of its stop makes the next leader's agent.left a clean stop, and its return no alert."""
    cluster.center("c1")
    cluster.agent("a1")
    wait_for(lambda: events(store, kind="agent.joined"), timeout=30)
    cluster.kill("c1")
    cluster.kill("a1", signal.SIGTERM)  # a clean stop, with no leader to see it
    (left,) = wait_for(lambda: events(store, kind="agent.left"), timeout=10)
    assert left["details"]["reason"] == "stopped" and left["severity"] == "info"
    cluster.center("c2")
    wait_for(
        lambda: store.agents.find_one({"_id": "a1"})["status"] == "offline", timeout=SESSION + 30
    )
    assert store.agents.find_one({"_id": "a1"})["left_reason"] == "stopped"
    assert len(events(store, kind="agent.left")) == 1
    cluster.agent("a1")
    (back,) = wait_for(lambda: events(store, kind="agent.returned"), timeout=30)
    assert ev.clean_stop(back) and "after a clean stop" in back["message"]


@pytest.mark.timeout(180)
def test_an_agent_killed_records_one_left_event_and_its_run_lost(cluster, zk, store):
    (task_id,) = make_tasks(store, 1, command=["sleep", "60"], schedule={"keepalive": True})
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")
    wait_for(lambda: len(assignments(zk)) == 1 and agent_count(zk) == 2, timeout=30)
    wait_for(lambda: len(events(store, kind="agent.joined")) == 2, timeout=30)
    run = wait_for(
        lambda: store.runs.find_one({"task_id": task_id, "status": "running"}), timeout=30
    )
    cluster.kill(run["agent"])
    lost = wait_for(
        lambda: events(store, kind="run.lost"), timeout=SESSION + 20, message="no run.lost"
    )
    assert [e["run_id"] for e in lost] == [run["_id"]]
    left = wait_for(lambda: events(store, kind="agent.left"), timeout=20)
    assert [e["agent"] for e in left] == [run["agent"]]
    assert left[0]["details"]["pid"] and left[0]["details"]["host"]
    assert len(events(store, kind="center.leader")) == 1
    cluster.kill("c1")  # another leader starts: the departure is not recorded again
    cluster.center("c2")
    led = wait_for(lambda: events(store, kind="center.leader")[1:], timeout=30)
    survivor = "a2" if run["agent"] == "a1" else "a1"
    wait_for(  # the new leader has recorded the agents it sees
        lambda: store.agents.find_one({"_id": survivor})["last_seen"] >= led[0]["at"],
        timeout=30,
    )
    assert store.agents.find_one({"_id": run["agent"]})["status"] == "offline"
    assert len(events(store, kind="agent.left")) == 1
    assert len(events(store, kind="run.lost")) == 1
