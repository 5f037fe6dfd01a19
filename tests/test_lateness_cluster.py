"""Lateness alerts in a real cluster: centers and agents as processes, a real SMTP server.

* A run of a task with ``warn_after: 2s`` running ``sleep 6`` is mailed once as slow while it
  runs, is not killed, ends succeeded, and its end is mailed.
* A task with ``expect_every: 3s`` that stops succeeding is mailed once as overdue; the leading
  center is killed with kill -9 while it is overdue, and the next leader mails nothing again;
  when it succeeds again, one recovery mail.
* A task with a deadline a minute or two ahead in its own time zone (the centers' clock is moved
  just before it: cloudtask/testing/clock.py) that has not succeeded by then is mailed once as
  late, and once more when it succeeds after it."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import test_alerts_cluster
from helpers import wait_for
from test_cluster import leader

from cloudtask.testing.clock import ENV as CLOCK_ENV

OPS = "ops@example.com"


# the cluster whose centers mail OPS through the test's SMTP server (conftest's ``smtp``)
cluster = test_alerts_cluster.cluster


def subjects(smtp, recipient: str = OPS) -> list[str]:
    return [
        " ".join(str(m["Subject"]).split()) for m in smtp.inbox.by_recipient().get(recipient, [])
    ]


def count(smtp, *words: str) -> int:
    return sum(all(w in s for w in words) for s in subjects(smtp))


def mailed(smtp, *words: str, timeout: float = 60, message: str = "") -> None:
    wait_for(lambda: count(smtp, *words) >= 1, timeout=timeout, message=message or " ".join(words))


def start(cluster, zk, centers=("c1",), agents=("a1",)) -> None:
    """The first center, leading; then the others and the agents."""
    cluster.center(centers[0])
    wait_for(lambda: leader(zk) == centers[0], timeout=30, message=f"{centers[0]} leads")
    for c in centers[1:]:
        cluster.center(c)
    for a in agents:
        cluster.agent(a)


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.mark.timeout(150)
def test_a_slow_run_is_mailed_once_while_it_runs_and_is_not_killed(cluster, smtp, store, zk):
    start(cluster, zk)
    fire = datetime.now(timezone.utc) + timedelta(seconds=4)
    task = store.create_task(
        {
            "name": "slow-report",
            "schedule": {"at": iso(fire)},
            "command": "sleep 6",
            "warn_after": "2s",
        }
    )
    mailed(smtp, "SLOW slow-report still running", message="the slow run was mailed")
    (run,) = list(store.runs.find({"task_id": task["_id"]}))
    assert run["status"] == "running"  # mailed while it runs
    wait_for(
        lambda: store.runs.find_one({"_id": run["_id"]})["status"] == "succeeded",
        timeout=30,
        message="the run ends succeeded: it was not killed",
    )
    mailed(smtp, "SLOW RUN ENDED slow-report succeeded", timeout=30)
    time.sleep(5)  # a few more rounds of the checks
    assert count(smtp, "SLOW slow-report still running") == 1
    assert count(smtp, "SLOW RUN ENDED slow-report") == 1
    message = next(
        m for m in smtp.inbox.by_recipient()[OPS] if "still running" in str(m["Subject"])
    )
    body = message.get_body(("plain",)).get_content()
    assert "Warn after:  2s" in body
    assert f"https://cloudtask.example.com/runs/{run['_id']}" in body


@pytest.mark.timeout(240)
def test_an_overdue_task_is_mailed_once_across_a_leader_change_then_its_recovery(
    cluster, smtp, store, zk, tmp_path
):
    start(cluster, zk, centers=("c1", "c2"))
    stop = tmp_path / "stop-succeeding"
    store.create_task(
        {
            "name": "flaky-sync",
            "schedule": {"every": "1s"},
            "command": f"test ! -e {stop}",
            "expect_every": "3s",
        }
    )
    wait_for(
        lambda: store.runs.count_documents({"task_name": "flaky-sync", "status": "succeeded"}) >= 3,
        timeout=60,
        message="the task succeeds",
    )
    time.sleep(4)
    assert count(smtp, "OVERDUE flaky-sync") == 0  # succeeding every second: never overdue
    stop.write_text("")
    mailed(smtp, "OVERDUE flaky-sync has not succeeded", message="the task was mailed overdue")

    # the leader dies between two checks while the task is still overdue
    cluster.kill("c1")
    wait_for(lambda: leader(zk) == "c2", timeout=30, message="c2 leads")
    time.sleep(8)  # rounds of the new leader's checks
    assert count(smtp, "OVERDUE flaky-sync") == 1

    stop.unlink()
    mailed(smtp, "RECOVERED flaky-sync succeeded again", message="the recovery was mailed")
    time.sleep(5)
    assert count(smtp, "OVERDUE flaky-sync") == 1
    assert count(smtp, "RECOVERED flaky-sync succeeded again") == 1
    kinds = [e["kind"] for e in store.events.find({"kind": {"$regex": "^task.overdue"}})]
    assert sorted(kinds) == ["task.overdue", "task.overdue_recovered"]
    ids = [str(m["Message-ID"]) for _, m in smtp.inbox.messages()]
    assert len(ids) == len(set(ids))  # no message sent twice


@pytest.mark.timeout(240)
def test_a_missed_deadline_is_mailed_once_then_the_late_success(cluster, smtp, store, zk, tmp_path):
    zone = ZoneInfo("Europe/Berlin")
    now = datetime.now(timezone.utc)
    deadline = (now + timedelta(minutes=2)).astimezone(zone).replace(second=0, microsecond=0)
    # the centers' clock runs just short of the deadline: it passes a few seconds from now
    offset = tmp_path / "center-clock"
    offset.write_text(str((deadline - now).total_seconds() - 8))
    cluster.env[CLOCK_ENV] = str(offset)
    start(cluster, zk, centers=("c1", "c2"), agents=())
    del cluster.env[CLOCK_ENV]
    cluster.agent("a1")
    ok = tmp_path / "input-ready"
    clock = deadline.strftime("%H:%M")
    task = store.create_task(
        {
            "name": "nightly-report",
            "schedule": {"every": "2s", "timezone": "Europe/Berlin"},
            "command": f"test -e {ok}",
            "deadline": clock,
        }
    )
    mailed(
        smtp,
        f"LATE nightly-report missed its {clock} deadline (Europe/Berlin) of {deadline.date()}",
        timeout=90,
        message="the missed deadline was mailed",
    )
    assert store.runs.count_documents({"task_id": task["_id"], "status": "succeeded"}) == 0
    # the leader dies; the next one sends nothing again, and the success after it is mailed
    cluster.kill("c1")
    wait_for(lambda: leader(zk) == "c2", timeout=30, message="c2 leads")
    ok.write_text("")
    mailed(smtp, "DONE LATE nightly-report succeeded after its", message="the late success")
    time.sleep(5)
    assert count(smtp, "LATE nightly-report missed") == 1
    assert count(smtp, "DONE LATE nightly-report") == 1
    (event,) = store.events.find({"kind": "task.deadline_missed"})
    assert event["_id"] == f"task.deadline_missed:{task['_id']}:{deadline.date()}"
    assert event["details"]["closes"] == deadline.astimezone(timezone.utc).isoformat()
