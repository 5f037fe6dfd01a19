"""The MongoDB store over a real wire-protocol server: indexes, tasks, claims, runs, files."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import datetime, timedelta, timezone

import pytest
from helpers import task_spec

from cloudtask.exceptions import Conflict, NotFound, StoreError, ValidationError
from cloudtask.operations import Operations
from cloudtask.runmodel import new_run_document
from cloudtask.store import Store, all_revisions, first_call_budget, indexed, scan_tasks, task_pages
from cloudtask.store.tasks import FIRST_CALL_PER_TASK

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def task(name="nightly", **over):
    return task_spec(name, **{"schedule": {"cron": "0 3 * * *"}, **over})


def run_doc(task_id="t1", scheduled_for=NOW, slot="one", attempt=0, status="queued"):
    return new_run_document(
        task_id=task_id,
        task_name="nightly",
        group="default",
        revision=1,
        scheduled_for=scheduled_for,
        slot=slot,
        attempt=attempt,
        trigger="schedule",
        agent="a1",
        status=status,
        now=NOW,
    )


def test_indexes_created(store):
    runs = store.runs.index_information()
    claim = [i for i in runs.values() if i.get("unique") and len(i["key"]) == 4]
    assert claim and [k for k, _ in claim[0]["key"]] == [
        "task_id",
        "scheduled_for",
        "slot",
        "attempt",
    ]
    assert any(i["key"] == [("finished_at", 1)] for i in runs.values())  # for purge_runs
    assert any(i.get("unique") for n, i in store.tasks.index_information().items() if n != "_id_")
    assert any(i.get("unique") for n, i in store.users.index_information().items() if n != "_id_")
    assert len(store.events.index_information()) >= 2
    assert len(store.audit.index_information()) >= 2


def test_old_finished_runs_are_purged(store):
    old, fresh = run_doc(status="missed"), run_doc(task_id="t2", status="missed")
    fresh["finished_at"] = datetime.now(timezone.utc)
    running = run_doc(task_id="t3", status="running")
    store.claim_runs([old, fresh, running])  # `old` finished at NOW, months ago: past 90 days
    assert store.purge_runs() == 1
    assert sorted(d["_id"] for d in store.runs.find()) == sorted([fresh["_id"], running["_id"]])


def test_purge_follows_retention_setting(mongo_client, mongo_db_name):
    s = Store(mongo_client, mongo_db_name, run_retention_days=7)
    doc = run_doc(status="missed")
    doc["finished_at"] = datetime.now(timezone.utc) - timedelta(days=8)
    s.claim_runs([doc])
    assert s.purge_runs(datetime.now(timezone.utc) - timedelta(days=2)) == 0
    assert s.purge_runs() == 1
    # no TTL index: the wire server used on one machine would check it on every query
    assert not [i for i in s.runs.index_information().values() if "expireAfterSeconds" in i]


def test_create_get_and_unique_name(store):
    doc = store.create_task(task(), now=NOW)
    assert doc["revision"] == 1 and doc["version"] == 1
    assert store.get_task(doc["_id"])["spec"]["name"] == "nightly"
    assert store.get_task_by_name("nightly")["_id"] == doc["_id"]
    with pytest.raises(Conflict, match="already exists"):
        store.create_task(task(), now=NOW)


def test_invalid_task_is_refused_and_nothing_stored(store):
    with pytest.raises(ValidationError) as err:
        store.create_task(task(schedule={"cron": "0 0 31 2 *"}, timeout="forever"), now=NOW)
    paths = {p.path for p in err.value.problems}
    assert {"schedule.cron", "timeout"} <= paths
    assert store.list_tasks() == []


def test_replace_bumps_revision_and_detects_stale_edit(store):
    doc = store.create_task(task(), now=NOW)
    new = store.replace_task(doc["_id"], task(command="echo hi"), now=NOW, expected_revision=1)
    assert new["revision"] == 2 and new["spec"]["command"] == "echo hi"
    with pytest.raises(Conflict, match="changed meanwhile"):
        store.replace_task(doc["_id"], task(command="echo stale"), now=NOW, expected_revision=1)
    assert store.get_task(doc["_id"])["spec"]["command"] == "echo hi"


def test_bad_replace_keeps_what_was_stored(store):
    doc = store.create_task(task(), now=NOW)
    with pytest.raises(ValidationError):
        store.replace_task(doc["_id"], task(schedule={"every": "500ms"}), now=NOW)
    assert store.get_task(doc["_id"])["revision"] == 1


def test_at_in_past_refused_on_create_and_change(store):
    past = (NOW - timedelta(hours=1)).isoformat()
    with pytest.raises(ValidationError, match="past"):
        store.create_task(task(schedule={"at": past}), now=NOW)
    doc = store.create_task(task(), now=NOW)
    with pytest.raises(ValidationError, match="past"):
        store.replace_task(doc["_id"], task(schedule={"at": past}), now=NOW)


def test_apply_creates_updates_and_leaves_unchanged(store):
    ops = Operations(store)
    assert ops.apply_task("test", task())[0] == "created"
    assert ops.apply_task("test", task())[0] == "unchanged"
    outcome, doc = ops.apply_task("test", task(command="echo 2"))
    assert outcome == "updated" and doc["revision"] == 2
    actions = [e["action"] for e in store.audit.find({}).sort("at", 1)]
    assert actions == ["task.create", "task.update"]  # nothing audited for "unchanged"


def test_a_changed_schedule_is_checked_for_past_instants_an_unchanged_one_is_not(store):
    ops = Operations(store)
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    with pytest.raises(ValidationError, match="past"):
        ops.create_task("test", task(schedule={"at": past}))
    doc = ops.create_task("test", task())
    with pytest.raises(ValidationError, match="past"):
        ops.replace_task("test", doc["_id"], task(schedule={"at": past}))
    # a one-shot task that ran long ago can still get a new description
    old = store.create_task(task(name="once", schedule={"at": past}), now=NOW - timedelta(days=1))
    changed = ops.replace_task("test", old["_id"], {**old["spec"], "description": "kept"})
    assert changed["spec"]["description"] == "kept"


def test_a_name_clash_is_a_conflict_at_the_name(store):
    ops = Operations(store)
    ops.create_task("test", task(name="one"))
    other = ops.create_task("test", task(name="two"))
    with pytest.raises(Conflict) as caught:
        ops.create_task("test", task(name="one"))
    assert [p.path for p in caught.value.problems] == ["name"]
    with pytest.raises(Conflict) as caught:
        ops.replace_task("test", other["_id"], task(name="one"))
    assert [p.path for p in caught.value.problems] == ["name"]
    assert store.get_task(other["_id"])["name"] == "two"  # nothing lost


def test_every_revision_and_task_is_read_in_pages_each_call_in_its_own_context(store):
    """A reader with a deadline per call (the leader, a standalone agent) reads many tasks in
    calls that each end in time: one query read in batches, the first call in its own (longer)
    context, none missed or read twice."""
    ids = [store.create_task(task(f"t{i}"))["_id"] for i in range(7)]
    store.mark_tasks_done([(ids[3], 1)])
    calls = []

    def each():
        calls.append("each")
        return nullcontext()

    def first():
        calls.append("first")
        return nullcontext()

    revisions = all_revisions(store, each=each, first=first, page=3)
    assert revisions == {i: (1, i == ids[3]) for i in ids}
    assert calls == ["first", "each", "each"]  # 3 + 3 + 1
    assert all_revisions(store, ["other"], page=3) == {}
    calls.clear()
    scanned = list(scan_tasks(store, each=each, page=3))
    assert [len(p) for p in scanned] == [3, 3, 1] and calls == ["each"] * 3
    assert sorted(d["_id"] for p in scanned for d in p) == sorted(ids)
    assert scanned[0][0]["spec"]["name"].startswith("t")  # whole documents
    assert list(scan_tasks(store, ["other"], page=3)) == []
    calls.clear()
    pages = list(task_pages(store, sorted(ids), each=each, page=3))
    assert [len(p) for p in pages] == [3, 3, 1] and len(calls) == 3
    assert sorted(d["_id"] for p in pages for d in p) == sorted(ids)
    # the first call's budget grows with the collection (its count is metadata, not a scan)
    assert first_call_budget(store, 5.0) == pytest.approx(5.0 + 7 * FIRST_CALL_PER_TASK)


def test_enable_disable_and_delete(store):
    doc = store.create_task(task(), now=NOW)
    paused = Operations(store).set_enabled("test", doc["_id"], False)
    assert not paused["enabled"] and paused["revision"] == 2
    assert store.list_tasks(enabled=True) == []
    assert len(store.list_tasks(enabled=False)) == 1
    store.delete_task(doc["_id"])
    with pytest.raises(NotFound):
        store.get_task(doc["_id"])
    with pytest.raises(NotFound):
        store.delete_task(doc["_id"])


def test_mark_done_only_for_the_revision_that_ran(store):
    doc = store.create_task(task(), now=NOW)
    store.replace_task(doc["_id"], task(command="echo 2"), now=NOW)
    assert store.mark_tasks_done([(doc["_id"], 1)], NOW) == 0
    assert store.mark_tasks_done([(doc["_id"], 2)], NOW) == 1
    assert store.task_revisions()[doc["_id"]] == (2, True)
    assert store.get_task(doc["_id"])["done_at"] == NOW  # a date, not a string


def test_claim_is_exclusive_per_fire_slot_and_attempt(store):
    assert store.claim_runs([run_doc()]) == [True]
    assert store.claim_runs([run_doc()]) == [False]
    # a batch: duplicates lose, the rest win, in order
    batch = [
        run_doc(scheduled_for=NOW + timedelta(seconds=1)),
        run_doc(),
        run_doc(attempt=1),
        run_doc(slot="agent-2"),
        run_doc(task_id="t2"),
    ]
    assert store.claim_runs(batch) == [True, False, True, True, True]
    assert store.runs.count_documents({}) == 5


def test_latest_fires_of_many_tasks_are_read_in_one_call(store):
    later = NOW + timedelta(seconds=30)
    store.claim_runs(
        [
            run_doc("t1", NOW),
            run_doc("t1", later, status="missed"),  # any status counts
            run_doc("t1", later, attempt=1),
            run_doc("t2", NOW, slot="a1"),  # another slot: not a "one" fire
            run_doc("t3", NOW - timedelta(days=3)),
        ]
    )
    assert store.last_fires(["t1", "t2", "t3", "t4"], "one") == {
        "t1": later,
        "t3": NOW - timedelta(days=3),
    }
    assert store.last_fires(["t2"], "a1") == {"t2": NOW}
    assert store.last_fires([], "one") == {}


def test_update_runs_in_bulk_and_list(store):
    docs = [run_doc(scheduled_for=NOW + timedelta(seconds=i)) for i in range(3)]
    store.claim_runs(docs)
    done = datetime.now(timezone.utc).replace(microsecond=0)  # recent: the TTL index keeps it
    store.save_runs(
        [{**d, "status": "succeeded", "exit_code": 0, "finished_at": done} for d in docs[:2]]
    )
    assert [r["status"] for r in store.list_runs(task_id="t1")] == [
        "queued",
        "succeeded",
        "succeeded",
    ]
    assert len(store.list_runs(status=["succeeded"])) == 2
    got = store.get_run(docs[0]["_id"])
    assert got["scheduled_for"] == NOW and got["scheduled_for"].tzinfo is not None
    assert got["finished_at"] == done  # a date stays a date after an update


def test_save_never_overwrites_a_finished_run(store):
    doc = run_doc(status="running")
    store.claim_runs([doc])
    store.save_runs([{**doc, "status": "killed"}])
    store.save_runs([{**doc, "status": "succeeded"}])  # a late write after the final one
    assert store.get_run(doc["_id"])["status"] == "killed"


def test_a_run_marked_lost_gets_its_real_outcome_from_its_own_agent_only(store):
    """A run "lost" means its agent went silent; when the agent finishes the run after all, its
    outcome is the truth. Nobody else overwrites the verdict."""
    doc, other = run_doc(status="running"), run_doc(task_id="t2", status="running")
    store.claim_runs([doc, other])
    store.mark_runs_lost({}, "its agent left")
    store.save_runs([{**doc, "status": "succeeded"}])
    assert store.get_run(doc["_id"])["status"] == "succeeded"
    store.save_runs([{**other, "status": "succeeded"}], owner="a2")  # another agent's write
    store.save_runs([{**other, "agent": "a2", "status": "succeeded"}])
    assert store.get_run(other["_id"])["status"] == "lost"


def test_a_released_claim_is_no_longer_its_old_agents(store):
    doc = run_doc(status="queued")
    store.claim_runs([doc])
    released = store.finish_unheard_runs([store.get_run(doc["_id"])], "its agent left")
    assert released == [doc["_id"]]
    stored = store.get_run(doc["_id"])
    assert stored["status"] == "queued" and stored["agent"] is None
    assert stored["released_by"] == "a1"
    store.save_runs([{**doc, "status": "running"}])  # the old agent wakes up: refused
    assert store.get_run(doc["_id"])["agent"] is None
    assert not store.start_queued_run(doc["_id"], "a1", "k1")
    taken = store.take_pending_run(doc["_id"], "a2", "s2", "h", trigger="catch-up")
    assert taken["agent"] == "a2" and taken["trigger"] == "catch-up"
    assert store.start_queued_run(doc["_id"], "a2", "k2")
    assert store.get_run(doc["_id"])["status"] == "running"


def test_a_queued_claim_is_started_once_and_a_lost_answer_can_be_asked_again(store):
    mine, other = run_doc("t1"), {**run_doc("t9"), "agent": "a2"}
    store.claim_runs([mine, other])
    assert not store.start_queued_run(other["_id"], "a1", "k-x")  # not a1's to start
    assert store.start_queued_run(mine["_id"], "a1", "k1")
    assert store.get_run(mine["_id"])["status"] == "running"
    # the same write again (its answer was lost): the same token counts as started
    assert store.start_queued_run(mine["_id"], "a1", "k1")
    # another token does not: the run is running already
    assert not store.start_queued_run(mine["_id"], "a1", "k2")
    assert store.get_run(other["_id"])["status"] == "queued"


def test_unheard_runs_are_judged_only_as_read(store):
    """The leader's verdict applies only to a run exactly as it read it: a heartbeat or a
    final write of its agent in between wins."""
    beating, finishing = run_doc(status="running"), run_doc(task_id="t2", status="running")
    store.claim_runs([beating, finishing])
    read = {d["_id"]: d for d in store.unfinished_runs({})}
    assert store.beat_runs("a1", [beating["_id"]], 123.0) == 1
    store.save_runs([{**finishing, "status": "succeeded"}])
    store.finish_unheard_runs(list(read.values()), "its agent left")
    assert store.get_run(beating["_id"])["status"] == "running"
    assert store.get_run(finishing["_id"])["status"] == "succeeded"


def test_runs_left_by_an_earlier_life_are_told_from_its_own_by_the_journal(store):
    """A restarted agent finds its earlier life's unfinished runs whatever their claim time
    says (that life's clock may have been ahead, or the claim fell in the second this life
    started), but not what this life claimed itself (its journal's claims)."""
    left, own = run_doc(status="running"), run_doc(task_id="t2", status="running")
    left["claimed_at"] = NOW + timedelta(seconds=5)  # a clock that ran ahead
    store.claim_runs([left, own])
    found = store.left_runs("a1", {own["_id"]}, set(), NOW)
    assert [d["_id"] for d in found] == [left["_id"]]


def test_plain_equalities_are_written_as_eq_for_the_embedded_servers_indexes(store):
    query = {"status": "queued", "attempt": 0, "agent": None, "_id": "r1", "ts": {"$lt": 5.0}}
    query["scheduled_for"] = NOW
    assert indexed(query) == {
        "status": {"$eq": "queued"},
        "attempt": {"$eq": 0},
        "agent": None,
        "_id": "r1",
        "ts": {"$lt": 5.0},
        "scheduled_for": NOW,  # dates as they were
    }
    doc = run_doc(status="queued")
    store.claim_runs([doc])
    assert [d["_id"] for d in store.runs.find(indexed({"status": "queued", "slot": "one"}))] == [
        doc["_id"]
    ]


def test_skipped_and_missed_runs_are_finished_at_once(store):
    doc = run_doc(status="missed")
    assert doc["finished_at"] == NOW and doc["duration"] == 0.0
    assert run_doc()["finished_at"] is None


def test_events_and_audit(store):
    store.add_event("run.failed", "nightly failed", task_id="t1")
    store.add_audit("alice", "task.create", "nightly", before=None, after={"name": "nightly"})
    assert store.events.find_one()["kind"] == "run.failed"
    assert store.audit.find_one()["actor"] == "alice"


def test_files_by_hash_and_latest(store):
    first = store.put_file("cleanup.sh", b"echo one\n")
    second = store.put_file("cleanup.sh", b"echo two\n")
    assert first["sha256"] != second["sha256"] and second["size"] == 9
    assert store.get_file_by_hash(first["sha256"]) == b"echo one\n"
    assert store.latest_file("cleanup.sh")["sha256"] == second["sha256"]
    with pytest.raises(NotFound):
        store.latest_file("nope")


def test_unreachable_mongodb_gives_a_clear_error():
    from cloudtask.localservers import free_port

    with pytest.raises(StoreError, match="check that it runs"):
        Store(f"mongodb://127.0.0.1:{free_port()}", "x", server_selection_timeout_ms=300)


def test_empty_uri_is_refused():
    with pytest.raises(StoreError, match="CLOUDTASK_MONGO_URI"):
        Store("", "x")


def test_a_claim_whose_first_insert_landed_is_still_ours(store):
    doc = run_doc()
    assert store.claim_runs([doc]) == [True]
    # the same document again (the answer to the first insert was lost): ours
    assert store.claim_runs([doc]) == [True]
    # another process's document for the same fire: not ours
    assert store.claim_runs([run_doc()]) == [False]


def test_leases_exclusive_renewable_and_taken_over_only_as_seen(store):
    """A lease is never judged expired by the taker's clock: it is taken over only if it is
    still exactly as the taker saw it a whole lease life earlier (see agent/leases.py)."""
    t = NOW
    assert store.acquire_lease("k", "run-1", 30, t)
    assert not store.acquire_lease("k", "run-2", 30, t + timedelta(seconds=100))
    seen = store.read_lease("k")
    assert store.renew_lease("k", "run-1", 30, t + timedelta(seconds=20))
    assert not store.take_over_lease("k", "run-2", 30, seen)  # renewed since it was seen
    assert store.read_lease("k")["holder"] == "run-1"
    seen = store.read_lease("k")
    assert store.take_over_lease("k", "run-2", 30, seen)  # unchanged: taken over
    assert not store.renew_lease("k", "run-1", 30, t + timedelta(seconds=52))
    store.release_lease("k", "run-1")  # not the holder: nothing happens
    assert store.leases.find_one({"_id": "k"})["holder"] == "run-2"
    store.release_lease("k", "run-2")
    assert store.acquire_lease("k", "run-3", 30, t + timedelta(seconds=53))


def test_mark_runs_lost_frees_their_leases_only_when_asked(store):
    doc, other = run_doc(status="running"), run_doc(task_id="t2", status="running")
    store.claim_runs([doc, other])
    store.acquire_lease("keepalive:t1", doc["_id"], 30)
    store.acquire_lease("keepalive:t2", other["_id"], 30)
    assert store.mark_runs_lost({"task_id": "t1"}, "gone") == [doc["_id"]]
    assert store.get_run(doc["_id"])["status"] == "lost"
    assert store.leases.count_documents({}) == 2  # its instance may still run: the lease runs out
    assert store.mark_runs_lost({"task_id": "t2"}, "gone", free_leases=True) == [other["_id"]]
    assert store.leases.count_documents({}) == 1


def test_a_change_keeps_the_last_run_noted_after_the_task_was_read(store):
    """A run that finishes between an edit's read and its write moves the task's last_run
    without a new revision: the edit does not put back the copy it read."""
    doc = store.create_task(task(), now=NOW)
    stale = store.get_task(doc["_id"])  # read by the edit, before the run ends
    run = run_doc(task_id=doc["_id"], status="running")
    assert store.claim_runs([run]) == [True]
    run.update(status="failed", finished_at=NOW + timedelta(seconds=3), duration=3.0)
    store.save_runs([run])  # notes the failure on the task
    assert store.get_task(doc["_id"])["last_run"]["id"] == run["_id"]
    changed = Operations(store).replace_task(
        "test", doc["_id"], task(command="echo 2"), current=stale
    )
    stored = store.get_task(doc["_id"])
    assert changed["revision"] == stored["revision"] == 2
    assert stored["spec"]["command"] == "echo 2"
    assert stored["last_run"]["id"] == run["_id"] and stored["last_run"]["status"] == "failed"


def test_a_clone_is_checked_like_a_new_task(store):
    past = (datetime.now(timezone.utc) - timedelta(minutes=20)).isoformat()
    once = store.create_task(task(name="once", schedule={"at": past}), now=NOW - timedelta(days=1))
    with pytest.raises(ValidationError, match="past"):
        Operations(store).clone_task("test", once["_id"], "once-again")
    assert [t["name"] for t in store.list_tasks()] == ["once"]
