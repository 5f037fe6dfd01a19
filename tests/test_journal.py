"""The run journal: what an agent's processes really did, read by the agent's next life.

The journal itself is tested without servers; what a restarted agent makes of an earlier
life's runs is tested on a real MongoDB wire server, with the task's own execution records
as the evidence of what ran."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from helpers import run_document, wait_for

from cloudtask.agent.agent import Agent
from cloudtask.agent.journal import Journal, entry_line
from cloudtask.clock import utcnow
from cloudtask.config import Config
from cloudtask.store import Store
from cloudtask.testing.records import read_records, recording_command


def test_verdicts_from_claims_starts_and_ends(tmp_path):
    earlier = Journal(tmp_path)
    earlier.open()
    earlier.claimed(["never", "ran", "cut"])
    earlier.started("ran")
    earlier.ended("ran", {"status": "succeeded", "exit_code": 0})
    earlier.started("cut")
    earlier.close()
    # a line cut short by a crash is skipped, the rest is read
    path = next(tmp_path.glob("runs-*.log"))
    with open(path, "a") as out:
        out.write('{"start": "hal')
    seen = Journal(tmp_path).read_earlier()
    assert seen.verdict("never") == ("never started", None)
    assert seen.verdict("ran") == ("ended", {"status": "succeeded", "exit_code": 0})
    assert seen.verdict("cut") == ("unknown", None)  # started, never ended: lost
    assert seen.verdict("not-journaled") == ("unknown", None)


def test_a_guarded_start_the_guard_never_noted_never_started(tmp_path):
    """The agent wrote ``start`` for a process its guard was to start, then died before the
    guard's ``spawn`` line: nothing ran. With the guard's line (and no end) it may have run."""
    earlier = Journal(tmp_path)
    earlier.open()
    earlier.claimed(["asked", "spawned", "ended", "http"])
    for run_id in ("asked", "spawned", "ended"):
        earlier.started(run_id, noted=True)
    earlier.started("http")  # not started through the guard: nothing notes it
    segment = earlier.current_path()
    with open(segment, "ab") as out:  # as the guard writes it
        out.write(entry_line({"spawn": "spawned"}))
        out.write(entry_line({"spawn": "ended"}))
    earlier.ended("ended", {"status": "failed", "exit_code": 1})
    earlier.close()
    seen = Journal(tmp_path).read_earlier()
    assert seen.verdict("asked") == ("never started", None)
    assert seen.verdict("spawned") == ("unknown", None)  # it ran, its end is not known: lost
    assert seen.verdict("ended") == ("ended", {"status": "failed", "exit_code": 1})
    assert seen.verdict("http") == ("unknown", None)
    assert seen.never_started() == {"asked"}


def test_an_unreadable_segment_makes_every_run_unknown(tmp_path):
    journal = Journal(tmp_path)
    journal.open()
    journal.claimed(["a"])
    journal.close()
    (tmp_path / "runs-99999999T000000000000-1.log").mkdir()  # reading it fails
    seen = Journal(tmp_path).read_earlier()
    assert seen.verdict("a") == ("unknown", None)  # never taken for not started on a guess
    assert len(seen.files) == 2


def test_segments_go_once_their_claims_are_settled(tmp_path):
    now = [1000.0]
    journal = Journal(tmp_path, clock=lambda: now[0])
    journal.open()
    journal.claimed(["old"])
    now[0] += 121  # a new segment
    unsettled = {"old"}
    journal.tidy(lambda r: r in unsettled)
    journal.claimed(["new"])
    assert len(list(tmp_path.glob("runs-*.log"))) == 2  # "old" still needs the first one
    assert journal.own_claims() == {"old", "new"}  # this life's, in both segments
    unsettled = {"new"}
    journal.tidy(lambda r: r in unsettled)
    (left,) = tmp_path.glob("runs-*.log")  # only the current segment: never deleted
    assert "new" in left.read_text()
    assert journal.own_claims() == {"new"}
    journal.close()


def test_a_restarted_agent_tells_the_truth_about_its_earlier_life(
    mongo_client, mongo_db_name, tmp_path
):
    """An earlier life of agent a1 died (kill -9) leaving: a claim it never started, which the
    leader has meanwhile marked lost; a run that ended (succeeded) before its final write;
    a run that started and never ended; and a process run it wrote ``start`` for but died
    before its guard noted a spawn. The next life releases the first and the last, so those
    fires run (catch-ups, within the grace), records the second's real outcome, and marks only
    the third lost."""
    store = Store(mongo_client, mongo_db_name)
    records = tmp_path / "records"
    hourly = {
        "schedule": {"every": "1h"},
        "misfire": "run_once",
        "misfire_grace": "2h",
        "command": recording_command(records),
    }
    names = ("never", "ran", "cut", "asked")
    tasks = {n: store.create_task({"name": n, **hourly}) for n in names}
    now = utcnow()
    due = now.replace(minute=0, second=0, microsecond=0)
    docs = {}
    for name, task in tasks.items():
        docs[name] = run_document(task, due, agent="a1")
    assert store.claim_runs(list(docs.values())) == [True] * 4
    # the leader's verdict on the never-started claim, made while a1 was dead
    store.finish_unheard_runs([store.get_run(docs["never"]["_id"])], "its agent left")
    assert store.get_run(docs["never"]["_id"])["status"] == "lost"

    data_dir = tmp_path / "a1"
    earlier = Journal(data_dir / "journal")
    earlier.open()
    earlier.claimed([d["_id"] for d in docs.values()])
    started = (due + timedelta(seconds=1)).timestamp()
    earlier.started(docs["ran"]["_id"])
    earlier.ended(
        docs["ran"]["_id"],
        {
            "status": "succeeded",
            "exit_code": 0,
            "error": None,
            "started_at": started,
            "finished_at": started + 2.5,
            "duration": 2.5,
        },
    )
    earlier.started(docs["cut"]["_id"])
    earlier.started(docs["asked"]["_id"], noted=True)  # the guard never wrote its spawn
    earlier.close()
    (earlier_path,) = (data_dir / "journal").glob("runs-*.log")

    cfg = Config().with_section(
        "agent", data_dir=str(data_dir), poll_interval=0.2, kill_grace=1.0, id="a1"
    )
    agent = Agent(cfg, store, agent_id="a1")
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        ran = wait_for(
            lambda: (
                store.get_run(docs["ran"]["_id"])
                if store.get_run(docs["ran"]["_id"])["status"] != "running"
                else None
            ),
            timeout=15,
        )
        assert ran["status"] == "succeeded" and ran["exit_code"] == 0
        finished = datetime.fromtimestamp(started + 2.5, timezone.utc)
        assert abs((ran["finished_at"] - finished).total_seconds()) < 0.01
        cut = store.get_run(docs["cut"]["_id"])
        assert cut["status"] == "lost"
        # the fire that never started runs now, once, under its own run document
        never = wait_for(
            lambda: (
                store.get_run(docs["never"]["_id"])
                if store.get_run(docs["never"]["_id"])["status"] == "succeeded"
                else None
            ),
            timeout=20,
        )
        assert never["trigger"] == "catch-up" and never["released_by"] == "a1"
        asked = wait_for(
            lambda: (
                store.get_run(docs["asked"]["_id"])
                if store.get_run(docs["asked"]["_id"])["status"] == "succeeded"
                else None
            ),
            timeout=20,
        )
        assert asked["trigger"] == "catch-up" and asked["released_by"] == "a1"
        starts = [r for r in read_records(records) if r.kind == "start"]
        assert sorted((r.task, r.run_id) for r in starts) == sorted(
            [("never", docs["never"]["_id"]), ("asked", docs["asked"]["_id"])]
        )
    finally:
        agent.stop()
        thread.join(timeout=30)
    # the earlier life's journal is gone once its runs are settled
    assert not earlier_path.exists()


def test_a_claim_of_an_earlier_life_that_lands_after_the_restart_is_released(
    mongo_client, mongo_db_name, tmp_path
):
    """An earlier life of a1 wrote a claim and died before its answer; the write was held
    (a frozen server, a cut link) and lands only after the next life has recovered. It must
    not stay ``running`` under a dead session (to be called ``lost``, though it never ran):
    the new life releases it and the fire runs once, as a catch-up."""
    store = Store(mongo_client, mongo_db_name)
    records = tmp_path / "records"
    task = store.create_task(
        {
            "name": "late",
            "schedule": {"every": "1h"},
            "misfire": "run_once",
            "misfire_grace": "2h",
            "command": recording_command(records),
        }
    )
    due = utcnow().replace(minute=0, second=0, microsecond=0)
    doc = run_document(task, due, agent="a1")
    data_dir = tmp_path / "a1"
    earlier = Journal(data_dir / "journal")
    earlier.open()
    earlier.claimed([doc["_id"]])
    earlier.close()

    cfg = Config().with_section(
        "agent", data_dir=str(data_dir), poll_interval=0.2, kill_grace=1.0, id="a1"
    )
    agent = Agent(cfg, store, agent_id="a1")
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent._recovered, timeout=15, message="the agent never recovered")
        assert store.runs_by_id([doc["_id"]]) == []
        assert store.claim_runs([doc]) == [True]  # the held claim lands now
        ran = wait_for(
            lambda: (
                store.get_run(doc["_id"])
                if store.get_run(doc["_id"])["status"] == "succeeded"
                else None
            ),
            timeout=60,
            message="the late claim was never released and run",
        )
        assert ran["trigger"] == "catch-up" and ran["released_by"] == "a1"
        starts = [r for r in read_records(records) if r.kind == "start"]
        assert [(r.task, r.run_id) for r in starts] == [("late", doc["_id"])]
    finally:
        agent.stop()
        thread.join(timeout=30)
