"""Events recorded where things happen, on the real MongoDB wire server: final runs and
recoveries, audited task changes; and that an event that cannot be recorded never fails the
write it hangs on. (Agents and the leading center: test_events_cluster.py.)"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from eventing import CONTRACT_FIELDS, NOW, RUN_DETAILS, claimed, events, finish, run_once
from helpers import make_task, run_document

from cloudtask.operations import Operations

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
