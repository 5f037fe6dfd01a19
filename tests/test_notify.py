"""The notifier against real servers: an aiosmtpd SMTP server and an HTTP webhook receiver on
free ports, the real MongoDB wire server. Time is passed to ``Notifier.run_once`` explicitly
(throttling and retries need no sleeping); only the network is real.

This file: the mail of a failure, throttling into digests, missed fires.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from typing import Any

from notifying import (
    BASE,
    SECRET,
    T0,
    config,
    finished_run,
    make_task,
    run_event,
    ts,
)

from cloudtask import events
from cloudtask.notify import (
    Notifier,
)
from cloudtask.notify.deliveries import Deliveries
from cloudtask.store import Store

# --- mail of one failure -----------------------------------------------------------------------


def test_failure_mails_each_recipient_once_with_subject_links_and_output(store, smtp):
    cfg = config(
        smtp.port,
        operators=("ops@example.com",),
        operators_by_kind={"run.failed": ("oncall@example.com", "OPS@example.com")},
        operators_by_group={"batch": ("batch-team@example.com",), "web": ("web@example.com",)},
    )
    task = make_task(store, notify={"emails": ["owner@example.com", "Ops@Example.com"]})
    output = "".join(f"line {i}\n" for i in range(1, 31)) + "Traceback: disk full\n"
    event = run_event(store, task, T0, output=output)

    counts = Notifier(store, cfg).run_once(ts(T0, 5))
    assert counts["events"] == 1 and counts["sent"] == 4 and counts["retried"] == 0

    got = smtp.inbox.by_recipient()
    assert sorted(got) == [
        "batch-team@example.com",
        "oncall@example.com",
        "ops@example.com",
        "owner@example.com",
    ]
    assert all(len(msgs) == 1 for msgs in got.values())
    msg = got["owner@example.com"][0]
    assert msg["Subject"] == "[CloudTask] FAILED nightly-cleanup (exit 2) 2026-12-01 03:00 UTC"
    assert msg["From"] == "CloudTask <alerts@example.com>"
    assert msg["To"] == "owner@example.com"
    assert msg["Date"] and msg["Message-ID"] and msg["X-CloudTask-Event"] == "run.failed"
    body = msg.get_content().replace("\r\n", "\n")
    assert "Traceback: disk full" in body and "line 30" in body
    assert "line 11\n" not in body  # only the last 20 lines of the output
    assert f"{BASE}/runs/{event['run_id']}" in body
    assert f"{BASE}/tasks/{task['_id']}" in body
    assert "cron 0 3 * * *" in body and "a1" in body and "Exit code:   2" in body
    assert "2026-12-01 03:00:00 UTC" in body  # scheduled
    assert store.events.find_one({"_id": event["_id"]})["delivery"] == "planned"
    sent = Deliveries(store).for_event(event["_id"])
    assert {d["status"] for d in sent} == {"sent"} and len(sent) == 4

    # a second pass, and a second notifier (the next leader), send nothing again
    assert Notifier(store, cfg).run_once(ts(T0, 6))["sent"] == 0
    assert Notifier(store, cfg).run_once(ts(T0, 3600))["sent"] == 0
    assert len(smtp.inbox.messages()) == 4


def test_task_notify_on_decides_its_own_recipients(store, smtp):
    cfg = config(smtp.port, operators=())
    quiet = make_task(store, "quiet", notify={"emails": ["q@example.com"], "on": ["timeout"]})
    loud = make_task(store, "loud", notify={"emails": ["l@example.com"], "on": ["failure"]})
    run_event(store, quiet, T0)
    run_event(store, loud, T0)
    run_event(store, quiet, T0 + timedelta(minutes=1), status="timed_out")
    Notifier(store, cfg).run_once(ts(T0, 120))
    got = smtp.inbox.by_recipient()
    assert [m["Subject"] for m in got["l@example.com"]] == [
        "[CloudTask] FAILED loud (exit 2) 2026-12-01 03:00 UTC"
    ]
    assert [m["Subject"] for m in got["q@example.com"]] == [
        "[CloudTask] TIMED OUT quiet (after 2s) 2026-12-01 03:01 UTC"
    ]


def test_success_mails_go_only_to_tasks_that_ask_one_per_success(store, smtp):
    cfg = config(smtp.port, operators=("ops@example.com",))
    loud = make_task(store, "loud", notify={"emails": ["l@example.com"], "on": ["success"]})
    quiet = make_task(store, "quiet", notify={"emails": ["q@example.com"]})
    for task, at in ((loud, T0), (loud, T0 + timedelta(minutes=1)), (quiet, T0)):
        run = finished_run(store, task, at, status="succeeded", output="42 rows archived\n")
        store.note_last_runs([run])  # what every final run write does
    assert Notifier(store, cfg).run_once(ts(T0, 180))["sent"] == 2
    got = smtp.inbox.by_recipient()
    assert sorted(got) == ["l@example.com"]  # not the operators, not the quiet task's owner
    assert [m["Subject"] for m in got["l@example.com"]] == [
        "[CloudTask] SUCCEEDED loud (exit 0) 2026-12-01 03:00 UTC",
        "[CloudTask] SUCCEEDED loud (exit 0) 2026-12-01 03:01 UTC",
    ]
    body = got["l@example.com"][0].get_content()
    assert "task loud succeeded on agent a1 in 2s" in body and "42 rows archived" in body


# --- throttling --------------------------------------------------------------------------------


def test_ten_failures_in_the_interval_make_one_digest_then_recovery_mails_once(store, smtp):
    cfg = config(smtp.port, operators=("ops@example.com",))
    task = make_task(store, notify={"emails": ["owner@example.com"]})
    notifier = Notifier(store, cfg)

    run_event(store, task, T0, output="boom\n")
    assert notifier.run_once(ts(T0, 5))["sent"] == 2  # owner and ops, at once
    for i in range(1, 11):  # a failure every minute
        run_event(store, task, T0 + timedelta(minutes=i))
        counts = notifier.run_once(ts(T0, 60 * i + 5))
        assert counts["held"] == 2 and counts["sent"] == 0  # for each recipient
    assert len(smtp.inbox.messages()) == 2

    # the interval (15 min after the first mail) has passed: one digest to each
    counts = Notifier(store, cfg).run_once(ts(T0, 905))
    assert counts["digests"] == 2 and counts["sent"] == 2
    got = smtp.inbox.by_recipient()
    digest = got["owner@example.com"][-1]
    assert digest["Subject"] == "[CloudTask] DIGEST nightly-cleanup failed 10 more times"
    body = digest.get_content().replace("\r\n", "\n")
    assert body.count(f"{BASE}/runs/") == 10 and "2026-12-01 03:10:02 UTC" in body
    assert "failing since 2026-12-01 03:00 UTC" in body
    assert notifier.run_once(ts(T0, 1000))["sent"] == 0  # nothing held: no second digest

    # two more failures within the interval after the digest are held; then it succeeds:
    # one recovery mail lists them
    run_event(store, task, T0 + timedelta(minutes=20))
    run_event(store, task, T0 + timedelta(minutes=21))
    assert notifier.run_once(ts(T0, 21 * 60 + 5))["held"] == 4
    run_event(store, task, T0 + timedelta(minutes=22), status="succeeded")
    counts = notifier.run_once(ts(T0, 22 * 60 + 5))
    assert counts["sent"] == 2 and counts["digests"] == 0
    recovery = smtp.inbox.by_recipient()["owner@example.com"][-1]
    assert recovery["Subject"] == "[CloudTask] RECOVERED nightly-cleanup 2026-12-01 03:22 UTC"
    text = recovery.get_content().replace("\r\n", "\n")
    assert "succeeded again" in text and "Failures since the last alert (2)" in text
    assert store.db["alert_state"].find_one({"_id": task["_id"]}) is None
    # the digest that was due for the two held failures does not come after the recovery
    assert notifier.run_once(ts(T0, 3 * 3600))["sent"] == 0
    assert {k: len(v) for k, v in smtp.inbox.by_recipient().items()} == {
        "owner@example.com": 3,
        "ops@example.com": 3,
    }

    # failing again after the recovery is a first failure: mailed at once
    run_event(store, task, T0 + timedelta(hours=4))
    assert notifier.run_once(ts(T0, 4 * 3600 + 5))["sent"] == 2


def test_a_failure_after_a_quiet_interval_is_mailed_at_once(store, smtp):
    cfg = config(smtp.port, operators=("ops@example.com",), alert_interval=600.0)
    task = make_task(store)
    notifier = Notifier(store, cfg)
    run_event(store, task, T0)
    assert notifier.run_once(ts(T0, 1))["sent"] == 1
    run_event(store, task, T0 + timedelta(minutes=20))  # 20 min later, nothing held
    counts = notifier.run_once(ts(T0, 20 * 60 + 1))
    assert counts["sent"] == 1 and counts["held"] == 0
    assert [m["Subject"].split()[1] for _, m in smtp.inbox.messages()] == ["FAILED", "FAILED"]


def test_planning_again_after_a_crash_sends_nothing_twice(store, smtp):
    """A crash after the deliveries (or the alert state) were written but before the event was
    marked planned: the next leader plans it again, and nothing is mailed twice."""
    cfg = config(smtp.port, operators=("ops@example.com",))
    task = make_task(store)
    first = Notifier(store, cfg)
    failure = run_event(store, task, T0)
    first.planner.plan_event(failure, first.settings(), ts(T0, 1))  # then "crashed"
    held = run_event(store, task, T0 + timedelta(minutes=1))

    second = Notifier(store, cfg)
    counts = second.run_once(ts(T0, 65))
    assert counts["events"] == 2 and counts["sent"] == 1 and counts["held"] == 1
    # the held failure planned again (a crash after its state was saved) is not held twice
    second.planner.plan_event(held, second.settings(), ts(T0, 70))
    state = store.db["alert_state"].find_one({"_id": task["_id"]})
    assert [r["held"] for r in state["recipients"]] == [[held["_id"]]]
    second.run_once(ts(T0, 1000))
    subjects = [m["Subject"] for _, m in smtp.inbox.messages()]
    assert subjects == [
        "[CloudTask] FAILED nightly-cleanup (exit 2) 2026-12-01 03:00 UTC",
        "[CloudTask] DIGEST nightly-cleanup failed 1 more time",
    ]


def test_a_send_cut_short_by_a_crash_is_sent_after_its_claim_runs_out(store, smtp):
    cfg = config(smtp.port)
    task = make_task(store)
    event = run_event(store, task, T0)
    crashed = Notifier(store, cfg, holder="old-leader")
    crashed.planner.plan_event(event, crashed.settings(), ts(T0, 1))
    store.set_event_delivery(event["_id"], "planned")
    (doc,) = crashed.deliveries.due(ts(T0, 1), 10)
    assert crashed.deliveries.claim(doc, ts(T0, 1), "old-leader") is not None  # then it died

    new_leader = Notifier(store, cfg, holder="new-leader")
    assert new_leader.run_once(ts(T0, 10))["sent"] == 0  # claimed: maybe being sent
    assert new_leader.run_once(ts(T0, 400))["sent"] == 1  # the claim ran out: not lost
    assert len(smtp.inbox.messages()) == 1


def test_two_notifiers_at_once_send_each_message_once(store, smtp):
    """Two leaders for a moment (the old one not yet aware it lost): claims keep every
    message single."""
    cfg = config(smtp.port, operators=("ops@example.com", "second@example.com"))
    for i in range(10):
        run_event(store, make_task(store, f"task-{i}"), T0)
    notifiers = [Notifier(store, cfg, holder=f"center-{i}") for i in range(2)]
    barrier = threading.Barrier(2)
    results: list[dict[str, int]] = []

    def one_pass(n: Notifier) -> None:
        barrier.wait()
        results.append(n.run_once(ts(T0, 5)))

    threads = [threading.Thread(target=one_pass, args=(n,)) for n in notifiers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and sum(r["sent"] for r in results) == 20
    subjects = [(tuple(r), m["Subject"]) for r, m in smtp.inbox.messages()]
    assert len(subjects) == 20 and len(set(subjects)) == 20


def test_agent_left_mails_operators_once(store, smtp):
    cfg = config(
        smtp.port,
        operators=("ops@example.com",),
        operators_by_group={"batch": ("batch-team@example.com",)},
    )
    stored = {
        "_id": "a1",
        "group": "batch",
        "status": "online",
        "info": {"host": "web-3", "pid": 4242, "group": "batch"},
        "last_seen": T0,
    }
    event = events.agent_left(stored, T0 + timedelta(seconds=12))
    assert store.record_event(event)
    assert not store.record_event(events.agent_left(stored, T0 + timedelta(seconds=13)))
    Notifier(store, cfg).run_once(ts(T0, 13))
    Notifier(store, cfg).run_once(ts(T0, 14))
    got = smtp.inbox.by_recipient()
    assert sorted(got) == ["batch-team@example.com", "ops@example.com"]
    assert all(len(v) == 1 for v in got.values())
    msg = got["ops@example.com"][0]
    assert msg["Subject"] == "[CloudTask] AGENT OFFLINE a1 (group batch) 2026-12-01 03:00 UTC"
    body = msg.get_content().replace("\r\n", "\n")
    assert "web-3" in body and f"{BASE}/cluster" in body


def test_a_clean_stop_and_the_return_after_it_mail_nobody(store, smtp, receiver):
    """An agent stopped on purpose (a Ctrl-C restart of `cloudtask up`): agent.left "stopped"
    and agent.returned after it are info, mailed to nobody (not the operators, not those who
    asked for the kind or the group); a webhook that asks for everything still gets them."""
    cfg = config(
        smtp.port,
        operators=("ops@example.com",),
        operators_by_kind={"agent.left": ("kind@example.com",)},
        operators_by_group={"batch": ("batch-team@example.com",)},
        webhooks=({"url": receiver.url, "secret": SECRET, "kinds": None},),
    )
    info = {"group": "batch", "host": "web-3", "pid": 4242, "czxid": 7}
    store.record_agents({"a1": info}, now=T0)
    store.record_event(events.agent_stopped("a1", info, 7, T0 + timedelta(seconds=5)))
    store.record_agents({}, now=T0 + timedelta(seconds=6))
    store.record_agents({"a1": {**info, "czxid": 9}}, now=T0 + timedelta(seconds=20))
    kinds = [e["kind"] for e in store.events.find().sort("ts", 1)]
    assert kinds == ["agent.joined", "agent.left", "agent.returned"]
    counts = Notifier(store, cfg).run_once(ts(T0, 30))
    assert counts["events"] == 3 and counts["sent"] == 4  # three webhooks, one mail:
    ((to, joined),) = smtp.inbox.messages()  # the group's team hears of the agent joining
    assert joined["Subject"].startswith("[CloudTask] AGENT JOINED a1") and to == [
        "batch-team@example.com"
    ]
    hooks = [json.loads(r["body"]) for r in receiver.requests]
    assert [(h["kind"], h["severity"]) for h in hooks[1:]] == [
        ("agent.left", "info"),
        ("agent.returned", "info"),
    ]
    assert hooks[1]["details"]["reason"] == "stopped"

    # the same agent killed later: an alert as before, and so is its return
    store.record_agents({}, now=T0 + timedelta(minutes=5))
    store.record_agents({"a1": {**info, "czxid": 11}}, now=T0 + timedelta(minutes=6))
    Notifier(store, cfg).run_once(ts(T0, 400))
    subjects = sorted(m["Subject"] for _, m in smtp.inbox.messages()[1:])
    assert subjects == [
        "[CloudTask] AGENT BACK a1 (group batch) 2026-12-01 03:06 UTC",
        "[CloudTask] AGENT BACK a1 (group batch) 2026-12-01 03:06 UTC",
        "[CloudTask] AGENT OFFLINE a1 (group batch) 2026-12-01 03:05 UTC",
        "[CloudTask] AGENT OFFLINE a1 (group batch) 2026-12-01 03:05 UTC",
        "[CloudTask] AGENT OFFLINE a1 (group batch) 2026-12-01 03:05 UTC",
    ]


# --- missed fires: not failures ----------------------------------------------------------------


def missed_events(store: Store, task: dict[str, Any], at: datetime, n: int) -> list[dict]:
    """``n`` fires of ``task`` from ``at`` on, recorded missed (as an agent does after a
    restart), with their run.missed events."""
    from cloudtask.store import new_run_document as run_doc

    docs = [
        run_doc(
            task_id=task["_id"],
            task_name=task["name"],
            group=task["group"],
            revision=1,
            scheduled_for=at + timedelta(minutes=i),
            slot="one",
            attempt=0,
            trigger="schedule",
            agent="a1",
            status="missed",
            now=at + timedelta(hours=1),
        )
        for i in range(n)
    ]
    assert store.claim_runs(docs) == [True] * n
    return [store.events.find_one({"_id": f"run.missed:{d['_id']}"}) for d in docs]


def test_missed_fires_of_a_restart_are_mailed_throttled_but_are_no_failures(store, smtp):
    """The cluster was down 03:00-04:00: the fires of that hour are recorded missed when it
    is back. Whoever asks for missed fires hears of them (the first at once, the rest in a
    digest of missed fires), but they are no failures: no failing streak, no failure digest,
    and a real failure afterwards is mailed at once."""
    cfg = config(smtp.port, operators=("ops@example.com",))
    task = make_task(store, notify={"emails": ["owner@example.com"]})  # on: missed by default
    notifier = Notifier(store, cfg)
    restart = T0 + timedelta(hours=1)
    missed_events(store, task, T0, 5)
    counts = notifier.run_once(ts(restart, 5))
    assert counts["sent"] == 2 and counts["held"] == 8  # one at once to each, four held each
    assert {m["Subject"].split()[1] for _, m in smtp.inbox.messages()} == {"MISSED"}
    assert store.db["alert_state"].find_one({"_id": task["_id"]}) is None  # not failing
    missed_state = store.db["alert_state"].find_one({"_id": f"{task['_id']}:missed"})
    assert missed_state["kind"] == "missed" and missed_state["failing_since_ts"] is None

    # a real failure just after the restart: mailed at once (nothing held it back)
    failure = run_event(store, task, restart + timedelta(minutes=1))
    counts = notifier.run_once(ts(restart, 65))
    assert counts["sent"] == 2 and counts["held"] == 0
    state = store.db["alert_state"].find_one({"_id": task["_id"]})
    assert state["failing_since_ts"] == failure["ts"]  # after the restart, not its missed fires

    # the interval passes: the missed fires come as a digest of missed fires, the failure
    # state has nothing held (no failure digest)
    counts = notifier.run_once(ts(restart, 905))
    assert counts["digests"] == 2
    digest = smtp.inbox.by_recipient()["owner@example.com"][-1]
    assert digest["Subject"] == "[CloudTask] DIGEST nightly-cleanup missed 4 more fires"
    body = digest.get_content().replace("\r\n", "\n")
    assert "failing since" not in body and "failed" not in body
    assert "2026-12-01 03:04:00 UTC  missed" in body  # listed by when they were due
    assert f"{BASE}/tasks/{task['_id']}" in body

    # it succeeds: the recovery mail says it was failing since the failure, after the restart
    run_event(store, task, restart + timedelta(minutes=20), status="succeeded")
    notifier.run_once(ts(restart, 20 * 60 + 5))
    recovery = smtp.inbox.by_recipient()["owner@example.com"][-1]
    assert recovery["Subject"].startswith("[CloudTask] RECOVERED")
    text = recovery.get_content().replace("\r\n", "\n")
    assert "It had been failing since 2026-12-01 04:01 UTC." in text
    assert "missed" not in text.split("Task:")[0]  # no missed fire listed among failures
    assert store.db["alert_state"].find_one({"_id": task["_id"]}) is None


def test_missed_fires_alone_start_no_failing_streak_that_a_later_recovery_reports(store, smtp):
    """Before, a restart's missed fires opened the task's failing state: a failure days later
    was held behind them, and its recovery said "failing since" the old restart."""
    cfg = config(smtp.port, operators=("ops@example.com",), alert_interval=600.0)
    task = make_task(store)
    notifier = Notifier(store, cfg)
    missed_events(store, task, T0, 3)
    notifier.run_once(ts(T0, 3605))
    notifier.run_once(ts(T0, 3605 + 600))  # the missed digest
    later = T0 + timedelta(days=2)
    run_event(store, task, later)
    assert notifier.run_once(ts(later, 5))["sent"] == 1  # the failure, at once
    run_event(store, task, later + timedelta(minutes=5), status="succeeded")
    notifier.run_once(ts(later, 305))
    subjects = [m["Subject"] for _, m in smtp.inbox.messages()]
    assert [s.split()[1] for s in subjects] == ["MISSED", "DIGEST", "FAILED", "RECOVERED"]
    assert subjects[1] == "[CloudTask] DIGEST nightly-cleanup missed 2 more fires"
    recovery = smtp.inbox.messages()[-1][1].get_content()
    assert "It had been failing since 2026-12-03 03:00 UTC." in recovery


def test_missed_fires_are_mailed_only_to_whoever_asks_for_them(store, smtp):
    cfg = config(smtp.port, operators=())
    asks = make_task(store, "asks", notify={"emails": ["a@example.com"], "on": ["missed"]})
    not_asks = make_task(store, "quiet", notify={"emails": ["q@example.com"], "on": ["failure"]})
    missed_events(store, asks, T0, 1)
    missed_events(store, not_asks, T0, 1)
    Notifier(store, cfg).run_once(ts(T0, 3605))
    assert sorted(smtp.inbox.by_recipient()) == ["a@example.com"]


def test_a_tasks_own_recipients_get_its_lateness_alerts_whatever_notify_on_says(store, smtp):
    """Setting expect_every asks to hear of it: the task's notify.emails get task.overdue and
    its recovery although notify.on names only failures."""
    cfg = config(smtp.port, operators=("ops@example.com",))
    task = make_task(
        store,
        notify={"emails": ["owner@example.com"], "on": ["failure"]},
        expect_every="1h",
    )
    ref = {"task_id": task["_id"], "name": task["name"], "group": task["group"]}
    since = T0 - timedelta(hours=2)
    assert store.record_event(events.overdue_event(ref, 3600.0, since, True, T0))
    Notifier(store, cfg).run_once(ts(T0, 5))
    got = smtp.inbox.by_recipient()
    assert sorted(got) == ["ops@example.com", "owner@example.com"]
    assert got["owner@example.com"][0]["Subject"].startswith("[CloudTask] OVERDUE")
    success = {"_id": "r1", "finished_at": T0 + timedelta(minutes=5), "scheduled_for": T0}
    recovered = events.overdue_recovered_event(ref, since, success, T0 + timedelta(minutes=6))
    assert store.record_event(recovered)
    Notifier(store, cfg).run_once(ts(T0, 400))
    owner = smtp.inbox.by_recipient()["owner@example.com"]
    assert [m["Subject"].split()[1] for m in owner] == ["OVERDUE", "RECOVERED"]
