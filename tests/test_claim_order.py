"""A dispatch of more claims than one write holds (``CLAIM_CHUNK``), cut short by kill -9 of
its agent: the fires it never wrote must still be accounted for by whoever takes the task
next, from the task's history.

The chaos run that found this (1,005 fault cycles, docs/architecture.md, "Measured"): an
agent took over many tasks at once, and one step gave it 507 claims (each task's backlog
since its last recorded fire, and its next fires, claimed ahead). They were written in
chunks of 250, the claims made ahead first; MongoDB stalled under the second chunk and the
agent was killed -9 before the third was sent. The third held the one due fire of seven
tasks, whose later fires (claimed ahead, in the first chunk) were stored: the next owner read
each task's latest recorded fire, a claim made ahead, took every fire before it for handled,
and the fire due before it was never claimed, run or recorded.

Here the backlog comes from a task that had no agent for a while (its last run, and its last
change, 700 s ago), the second chunk's answer is lost (a proxy drops it: the chunk lands, the
agent does not know), and the agent is killed while it waits for that answer. Judged from the
run documents and from what the task's runs themselves recorded. With the claims made ahead
written first (before claims.collapse kept each task's fires in time order), the third chunk
(the newest 203 due fires) was never claimed, run or recorded."""

from __future__ import annotations

import math
import struct
import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import run_document, wait_for
from test_cluster import SESSION, Cluster, no_fire_twice

from cloudtask.agent.agent import CLAIM_CHUNK
from cloudtask.agent.claims import Claim, collapse
from cloudtask.agent.scheduler import Fire, Scheduler
from cloudtask.runmodel import FINISHED_STATUSES
from cloudtask.task import parse_task
from cloudtask.testing import TcpProxy
from cloudtask.testing.records import read_records, recording_command

BACKLOG = 700  # seconds without an agent: 700 fires of an every-second task due at once
DROPPED = 351  # the fire (seconds after the last run) whose claim write loses its answer


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def bson_date(name: str, when: datetime) -> bytes:
    """The BSON element ``name: when`` as it travels in a write (a date: int64 milliseconds)."""
    millis = round(when.timestamp() * 1000)
    return b"\x09" + name.encode() + b"\x00" + struct.pack("<q", millis)


def unaccounted(store, task_id: str, first: datetime, last: datetime) -> list[str]:
    """The fires of an every-second task from ``first`` to ``last`` that have no run document,
    or one that is not final (each fire has at most one: the unique claim index)."""
    docs = {
        d["scheduled_for"].replace(tzinfo=timezone.utc): d
        for d in store.runs.find({"task_id": task_id, "attempt": 0})
    }
    out = []
    t = first
    while t <= last:
        doc = docs.get(t)
        if doc is None:
            out.append(f"{t.time()} no record")
        elif doc["status"] not in FINISHED_STATUSES:
            out.append(f"{t.time()} {doc['status']}")
        t += timedelta(seconds=1)
    return out


@pytest.mark.timeout(240)
def test_a_kill_between_claim_chunks_leaves_no_fire_without_a_record(
    cluster, zk, store, mongo_server
):
    """Agent a1 (its MongoDB link through a proxy) takes an every-second task whose last run
    was 700 s ago: one step gives it 700 due fires and the next few claimed ahead, more than
    two chunks of claims. The answer to the chunk holding the fire 351 s after the last run is
    dropped, and a1 is killed -9 while it waits for it: later chunks are never written. a1
    comes back (straight to MongoDB) and takes the task again. Every fire from the last run
    on has one final record (ran, caught up, or missed with the reason), none started twice."""
    assert BACKLOG > 2 * CLAIM_CHUNK + 3 and CLAIM_CHUNK + 3 < DROPPED < 2 * CLAIM_CHUNK - 3
    records = cluster.records
    last_run = datetime.fromtimestamp(math.floor(time.time()) - BACKLOG, timezone.utc)
    spec = {
        "name": "t",
        "schedule": {"every": "1s"},
        "command": recording_command(records),
        "misfire": "run_once",
        "misfire_grace": "1h",
    }
    # the task has existed since before its last run, and nobody ran it since
    task = store.create_task(spec, now=last_run - timedelta(seconds=1))
    done = run_document(task, last_run, status="succeeded", agent="a0")
    assert store.claim_runs([done]) == [True]
    with TcpProxy(("127.0.0.1", mongo_server.port)) as proxy:
        proxy.drop_next_reply(bson_date("scheduled_for", last_run + timedelta(seconds=DROPPED)))
        cluster.env["CLOUDTASK_MONGO_URI"] = proxy.mongo_uri
        cluster.agent("a1")
        cluster.env["CLOUDTASK_MONGO_URI"] = mongo_server.uri
        cluster.center("c1")
        wait_for(
            lambda: proxy.dropped_replies >= 1,
            timeout=60,
            interval=0.01,
            message="no claim write held the fire aimed at",
        )
        cluster.kill("a1")  # SIGKILL, well within the 4 s the claim write waits for its answer
    killed_at = datetime.now(timezone.utc)
    # the dispatch was cut short between chunks: some claims were written, not all
    first_life = wait_for(
        lambda: list(store.runs.find({"task_id": task["_id"], "agent": "a1"})),
        message="the first claims never landed",
    )
    assert CLAIM_CHUNK <= len(first_life) < BACKLOG
    cluster.agent("a1")  # back, straight to MongoDB (it waits out its old session first)
    wait_for(
        lambda: store.runs.find_one(
            {
                "task_id": task["_id"],
                "status": "succeeded",
                "trigger": "schedule",
                "scheduled_for": {"$gt": killed_at + timedelta(seconds=SESSION + 5)},
            }
        ),
        timeout=90,
        message="the task did not run on time again after a1 came back",
    )
    cluster.stop_all()
    last = datetime.fromtimestamp(math.floor(killed_at.timestamp()) + 5, timezone.utc)
    holes = unaccounted(store, task["_id"], last_run, last)
    assert not holes, f"{len(holes)} fires without a final record: {holes[:5]} ... {holes[-3:]}"
    no_fire_twice(records)
    starts = [r for r in read_records(records) if r.kind == "start"]
    assert all(r.time >= r.scheduled_for.timestamp() - 0.05 for r in starts)  # none early


def test_claims_are_written_in_each_tasks_time_order():
    """The order ``collapse`` gives is the order of the writes: cut it anywhere (a chunk
    boundary, a write that fails, kill -9) and each task's fires written so far are its
    earliest ones: a claim made ahead never goes before an earlier due fire of its task."""
    t0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
    every = parse_task({"name": "t", "schedule": {"every": "1s"}, "command": "true"})

    def claim(task_id: str, at: int, trigger: str = "schedule") -> Claim:
        return Claim(Fire(task_id, t0 + timedelta(seconds=at), trigger, 1), every, 1, "token")

    # as a step gives them: a backlog kept from before, then the tick's fires (due, ahead)
    waiting = [
        claim("a", -3),
        claim("b", 2),
        claim("a", -2),
        claim("a", 1),
        claim("b", -1),
        claim("a", -1),
        claim("c", -5, trigger="retry"),
        claim("a", 2),
        claim("b", 1),
    ]
    out = collapse(waiting, t0, Scheduler().late_verdict, "why")
    order = [(c.fire.task_id, (c.fire.scheduled_for - t0).total_seconds()) for c in out]
    assert order == [
        ("c", -5),  # a retry first, as it is
        ("a", -3),  # missed
        ("a", -2),  # missed
        ("a", -1),  # runs
        ("a", 1),  # ahead
        ("a", 2),
        ("b", -1),
        ("b", 1),
        ("b", 2),
    ]
    assert [c.fire.status for c in out[1:4]] == ["missed", "missed", None]
    for cut in range(len(out) + 1):
        for task_id in "ab":
            every_fire = sorted(t for k, t in order if k == task_id)
            written = [t for k, t in order[:cut] if k == task_id]
            assert written == every_fire[: len(written)], (cut, task_id)
