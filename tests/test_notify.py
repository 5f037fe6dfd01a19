"""The notifier against real servers: an aiosmtpd SMTP server and an HTTP webhook receiver on
free ports, the real MongoDB wire server. Time is passed to ``Notifier.run_once`` explicitly
(throttling and retries need no sleeping); only the network is real.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult
from helpers import SmtpServer, wait_for

from cloudtask import events
from cloudtask.config import Config, load_config
from cloudtask.exceptions import CloudTaskError, ConfigError, ValidationError
from cloudtask.localservers import free_port
from cloudtask.notify import (
    Notifier,
    NotifierThread,
    load_settings,
    save_settings,
    send_test_mail,
)
from cloudtask.notify.content import event_subject
from cloudtask.notify.deliveries import Deliveries
from cloudtask.notify.webhook import signature
from cloudtask.runmodel import new_run_document
from cloudtask.store import Store

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
BASE = "https://ct.example.com"
SECRET = "s3cret-shared"


# --- real servers ------------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(free_port()).start()
    yield server
    server.stop()


class Receiver:
    """A webhook receiver: records each request; answers ``status`` after ``delay`` seconds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append({"headers": headers, "body": body})
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port()).start()
    yield r
    r.stop()


# --- configuration, tasks and events -----------------------------------------------------------


def config(port: int | None, **alerts: Any) -> Config:
    cfg = load_config(None, environ={}).with_section("web", base_url=BASE)
    values: dict[str, Any] = dict(
        smtp_host="127.0.0.1" if port else "",
        smtp_port=port or 587,
        smtp_security="none",
        smtp_timeout=5.0,
        mail_from="CloudTask <alerts@example.com>",
        operators=("ops@example.com",),
        alert_interval=900.0,
    )
    values.update(alerts)
    return cfg.with_section("alerts", **values)


def make_task(store: Store, name: str = "nightly-cleanup", **spec: Any) -> dict[str, Any]:
    return store.create_task(
        {
            "name": name,
            "group": "batch",
            "schedule": {"cron": "0 3 * * *"},
            "command": "./cleanup.sh",
            **spec,
        }
    )


def finished_run(
    store: Store,
    task: dict[str, Any],
    at: datetime,
    *,
    status: str = "failed",
    exit_code: int | None = 2,
    output: str = "",
    attempt: int = 0,
) -> dict[str, Any]:
    """A run of ``task`` scheduled at ``at`` that finished with ``status`` (stored)."""
    run = new_run_document(
        task_id=task["_id"],
        task_name=task["name"],
        group=task["group"],
        revision=1,
        scheduled_for=at,
        slot="one",
        attempt=attempt,
        trigger="schedule",
        agent="a1",
        status="running",
        now=at,
    )
    run.update(
        status=status,
        started_at=at,
        finished_at=at + timedelta(seconds=2),
        duration=2.0,
        exit_code=exit_code if status == "failed" else (0 if status == "succeeded" else None),
        output_tail=output,
        error=None if status != "timed_out" else "killed after the timeout of 2s",
    )
    store.runs.insert_one(run)
    return run


def run_event(
    store: Store,
    task: dict[str, Any],
    at: datetime,
    *,
    status: str = "failed",
    exit_code: int | None = 2,
    output: str = "",
    attempt: int = 0,
    record: bool = True,
) -> dict[str, Any]:
    """A finished run of ``task`` scheduled at ``at`` (stored), and its event (recorded)."""
    run = finished_run(
        store, task, at, status=status, exit_code=exit_code, output=output, attempt=attempt
    )
    if status == "succeeded":
        event = events.recovered_event(run, 3, "failed")
    else:
        event = events.run_event(run)
    assert event is not None
    if record:
        assert store.record_event(event)
    return event


def ts(moment: datetime, plus: float = 0) -> float:
    return moment.timestamp() + plus


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


# --- retries -----------------------------------------------------------------------------------


def test_smtp_down_then_up_delivers_after_retry_and_loses_nothing(store):
    port = free_port()  # nothing listens yet
    cfg = config(port, operators=("ops@example.com", "second@example.com"))
    task = make_task(store, notify={"emails": ["owner@example.com"]})
    event = run_event(store, task, T0)
    notifier = Notifier(store, cfg)

    counts = notifier.run_once(ts(T0, 1))
    assert counts["sent"] == 0 and counts["retried"] == 3
    docs = Deliveries(store).for_event(event["_id"])
    assert {d["status"] for d in docs} == {"pending"}
    assert all(d["attempts"] == 1 for d in docs)
    assert all("connection refused" in d["last_error"] for d in docs)
    assert all(d["next_at_ts"] == ts(T0, 6) for d in docs)  # retried after 5 s
    assert notifier.run_once(ts(T0, 3))["retried"] == 0  # not due yet
    assert notifier.run_once(ts(T0, 6))["retried"] == 3
    assert {d["next_at_ts"] for d in Deliveries(store).for_event(event["_id"])} == {ts(T0, 16)}

    server = SmtpServer(port).start()
    try:
        assert notifier.run_once(ts(T0, 16))["sent"] == 3
        assert notifier.run_once(ts(T0, 100))["sent"] == 0
        got = server.inbox.by_recipient()
        assert sorted(got) == ["ops@example.com", "owner@example.com", "second@example.com"]
        assert all(len(v) == 1 for v in got.values())
    finally:
        server.stop()
    docs = Deliveries(store).for_event(event["_id"])
    assert {d["status"] for d in docs} == {"sent"} and {d["attempts"] for d in docs} == {3}


def test_a_delivery_is_given_up_after_a_day_of_attempts_and_logged(store, caplog):
    cfg = config(free_port(), operators=("ops@example.com",))
    event = run_event(store, make_task(store), T0)
    notifier = Notifier(store, cfg)
    caplog.set_level(logging.WARNING, logger="cloudtask.notify")
    for hour in range(24):
        counts = notifier.run_once(ts(T0, 1 + hour * 3600))
        assert counts["failed"] == 0 and counts["retried"] == 1
    counts = notifier.run_once(ts(T0, 1 + 24 * 3600))
    assert counts["failed"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["status"] == "failed" and doc["attempts"] == 25
    assert "connection refused" in doc["last_error"]
    assert any(r.levelno == logging.ERROR and "gave up" in r.getMessage() for r in caplog.records)
    assert notifier.run_once(ts(T0, 2 * 86400))["retried"] == 0  # failed is final


def test_backoff_doubles_from_5_seconds_to_10_minutes():
    from cloudtask.notify.deliveries import backoff

    assert [backoff(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]


# --- TLS and login -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "security, needle",
    [
        ("starttls", "does not offer STARTTLS"),
        ("ssl", "TLS with the SMTP server"),
    ],
)
def test_tls_against_a_plain_server_is_refused_with_a_clear_error(store, smtp, security, needle):
    cfg = config(smtp.port, smtp_security=security)
    event = run_event(store, make_task(store), T0)
    counts = Notifier(store, cfg).run_once(ts(T0, 1))
    assert counts["sent"] == 0 and counts["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["status"] == "pending" and needle in doc["last_error"]
    assert f"127.0.0.1:{smtp.port}" in doc["last_error"]
    assert smtp.inbox.messages() == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_login_with_the_password_from_an_environment_variable(store):
    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
        ok = auth_data.login == b"alerts" and auth_data.password == b"pa55"
        return AuthResult(success=ok, handled=False)

    server = SmtpServer(
        free_port(), authenticator=authenticator, auth_required=True, auth_require_tls=False
    ).start()
    try:
        cfg = config(server.port, smtp_user="alerts", smtp_password_env="CT_SMTP_PASSWORD")
        event = run_event(store, make_task(store), T0)

        unset = Notifier(store, cfg, environ={})
        assert unset.run_once(ts(T0, 1))["retried"] == 1
        (doc,) = Deliveries(store).for_event(event["_id"])
        assert "CT_SMTP_PASSWORD" in doc["last_error"] and "not set" in doc["last_error"]

        wrong = Notifier(store, cfg, environ={"CT_SMTP_PASSWORD": "nope"})
        assert wrong.run_once(ts(T0, 10))["retried"] == 1
        (doc,) = Deliveries(store).for_event(event["_id"])
        assert "refused the login of 'alerts'" in doc["last_error"]

        right = Notifier(store, cfg, environ={"CT_SMTP_PASSWORD": "pa55"})
        assert right.run_once(ts(T0, 30))["sent"] == 1
        assert len(server.inbox.messages()) == 1
    finally:
        server.stop()


# --- webhooks ----------------------------------------------------------------------------------


def test_webhook_payload_and_signature_verify(store, receiver):
    other = Receiver(free_port()).start()
    try:
        cfg = config(
            None,
            webhooks=(
                {"url": receiver.url, "secret": SECRET, "kinds": None},
                {"url": other.url, "secret": "x", "kinds": ("agent.left",)},
            ),
        )
        task = make_task(store)
        event = run_event(store, task, T0, output="oops\n")
        counts = Notifier(store, cfg).run_once(ts(T0, 1))
        assert counts["sent"] == 1
        assert other.requests == []  # it asked for agent.left only
    finally:
        other.stop()
    (req,) = receiver.requests
    body, headers = req["body"], req["headers"]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-cloudtask-signature"], expected)
    assert headers["x-cloudtask-event"] == "run.failed"
    payload = json.loads(body)
    assert payload["id"] == event["_id"] and payload["kind"] == "run.failed"
    assert payload["delivery_id"] == f"{event['_id']}:webhook:0"
    assert headers["x-cloudtask-delivery"] == payload["delivery_id"]
    assert payload["task_name"] == "nightly-cleanup" and payload["run_id"] == event["run_id"]
    assert payload["details"]["exit_code"] == 2 and payload["details"]["output_tail_lines"]
    assert payload["at"].startswith("2026-12-01T03:00:02") and payload["ts"] == event["ts"]
    assert payload["links"]["run"] == f"{BASE}/runs/{event['run_id']}"
    assert "delivery" not in payload
    assert Notifier(store, cfg).run_once(ts(T0, 100))["sent"] == 0


def test_webhook_receiver_down_then_up_gets_the_same_signed_body_after_retry(store):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    cfg = config(None, webhooks=({"url": url, "secret": SECRET, "kinds": None},))
    event = run_event(store, make_task(store), T0)
    notifier = Notifier(store, cfg)
    assert notifier.run_once(ts(T0, 1))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert "connection refused" in doc["last_error"] and doc["next_at_ts"] == ts(T0, 6)

    receiver = Receiver(port).start()
    try:
        receiver.status = 503  # up, but not ready
        assert notifier.run_once(ts(T0, 6))["retried"] == 1
        (doc,) = Deliveries(store).for_event(event["_id"])
        assert "HTTP 503" in doc["last_error"]
        receiver.status = 200
        assert notifier.run_once(ts(T0, 16))["sent"] == 1
        assert notifier.run_once(ts(T0, 1000))["sent"] == 0
    finally:
        receiver.stop()
    first, second = receiver.requests
    assert first["body"] == second["body"]
    assert second["headers"]["x-cloudtask-signature"] == signature(SECRET, second["body"])
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["status"] == "sent" and doc["attempts"] == 3


def test_a_slow_receiver_costs_one_timeout_per_pass_and_mail_still_goes(store, smtp, receiver):
    receiver.delay = 3.0
    cfg = config(
        smtp.port,
        webhook_timeout=0.5,
        webhooks=({"url": receiver.url, "secret": SECRET, "kinds": None},),
    )
    for i in range(5):  # five tasks fail: five first failures, mailed at once
        run_event(store, make_task(store, f"task-{i}"), T0)
    counts = Notifier(store, cfg).run_once(ts(T0, 5))
    assert counts["sent"] == 5 and counts["retried"] == 5
    assert len(receiver.requests) == 1  # the four others were not tried after the timeout
    errors = [d["last_error"] for d in store.db["deliveries"].find({"channel": "webhook"})]
    assert [e for e in errors if not e.startswith("not tried")] == [
        f"{receiver.url} did not answer within 0.5s"
    ]
    assert sum(e.startswith("not tried: ") for e in errors) == 4
    assert len(smtp.inbox.messages()) == 5


def test_without_smtp_host_no_mail_is_planned_but_webhooks_are(store, receiver):
    cfg = config(None, webhooks=({"url": receiver.url, "secret": SECRET, "kinds": None},))
    event = run_event(store, make_task(store, notify={"emails": ["o@example.com"]}), T0)
    counts = Notifier(store, cfg).run_once(ts(T0, 1))
    assert counts["sent"] == 1
    assert [d["channel"] for d in Deliveries(store).for_event(event["_id"])] == ["webhook"]


# --- the thread --------------------------------------------------------------------------------


def test_the_thread_notifies_only_while_leading(store, smtp):
    cfg = config(smtp.port)
    run_event(store, make_task(store), datetime.now(timezone.utc) - timedelta(seconds=5))
    leading = threading.Event()
    thread = NotifierThread(store, cfg, is_leader=leading.is_set, interval=0.05)
    thread.start()
    assert thread.running
    try:
        ticks = thread.ticks
        wait_for(lambda: thread.ticks >= ticks + 3, message="the thread wakes up")
        assert thread.passes == 0 and smtp.inbox.messages() == []
        leading.set()
        wait_for(lambda: len(smtp.inbox.messages()) == 1, message="the mail is sent")
    finally:
        thread.stop()
    assert not thread.running


def test_a_leader_change_in_the_middle_mails_every_event_once(store, smtp):
    """Two notifier threads (two centers); the leadership moves from one to the other while
    events keep coming: every event is mailed, and none twice."""
    cfg = config(smtp.port, operators=("ops@example.com",))
    leader = ["a"]
    threads = [
        NotifierThread(store, cfg, is_leader=lambda name=name: leader[0] == name, interval=0.02)
        for name in ("a", "b")
    ]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            if i == 15:
                leader[0] = "b"
            stored = {"_id": f"agent-{i}", "group": "batch", "info": {}, "last_seen": T0}
            store.record_event(events.agent_left(stored, datetime.now(timezone.utc)))
            time.sleep(0.01)  # events arrive while the notifiers run
        wait_for(lambda: len(smtp.inbox.messages()) >= 30, message="every event is mailed")
        time.sleep(0.2)  # a duplicate would arrive meanwhile
    finally:
        for t in threads:
            t.stop()
    subjects = sorted(m["Subject"].split()[3] for _, m in smtp.inbox.messages())
    assert subjects == sorted(f"agent-{i}" for i in range(30))
    assert threads[0].passes > 0 and threads[1].passes > 0


# --- settings ----------------------------------------------------------------------------------


def test_stored_settings_override_the_file_key_by_key(store, smtp):
    cfg = config(None, operators=("file@example.com",), alert_interval=600.0)
    assert load_settings(store, cfg).mail_enabled is False
    stored = save_settings(
        store,
        {
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "smtp_security": "none",
            "operators": ["db@example.com"],
            "alert_interval": "1h",
        },
        by="admin1",
    )
    assert stored["alert_interval"] == 3600.0
    s = load_settings(store, cfg)
    assert s.smtp_host == "127.0.0.1" and s.operators == ("db@example.com",)
    assert s.alert_interval == 3600.0 and s.mail_from == "CloudTask <alerts@example.com>"
    assert s.from_database == (
        "alert_interval",
        "operators",
        "smtp_host",
        "smtp_port",
        "smtp_security",
    )
    assert s.base_url == BASE
    run_event(store, make_task(store), T0)
    Notifier(store, cfg).run_once(ts(T0, 1))
    assert list(smtp.inbox.by_recipient()) == ["db@example.com"]


def test_settings_validation_names_each_bad_key(store):
    with pytest.raises(ValidationError) as err:
        save_settings(
            store,
            {
                "smtp_port": "many",
                "smtp_security": "tls",
                "operators": ["ops@example.com", "not-an-address"],
                "operators_by_kind": {"run.fail": ["a@example.com"]},
                "webhooks": [{"url": "ftp://x", "secret": "s"}],
                "alert_interval": "soon",
                "bogus": 1,
            },
        )
    problems = {p.path: p.message for p in err.value.problems}
    assert set(problems) == {
        "smtp_port",
        "smtp_security",
        "operators[1]",
        "operators_by_kind.run.fail",
        "webhooks[0].url",
        "alert_interval",
        "bogus",
    }
    assert "expected one of starttls, ssl, none" in problems["smtp_security"]
    assert "not an email address" in problems["operators[1]"]
    assert "unknown key" in problems["bogus"]
    with pytest.raises(ValidationError) as err:
        save_settings(store, {"webhooks": [{"url": "https://x.example.com/h"}]})
    assert [p.path for p in err.value.problems] == ["webhooks[0].secret"]
    with pytest.raises(ValidationError):
        save_settings(store, ["not", "an", "object"])
    assert store.db["settings"].find_one({"_id": "alerts"}) is None  # nothing stored


def test_a_bad_stored_setting_is_ignored_and_the_file_value_kept(store, caplog):
    store.db["settings"].insert_one({"_id": "alerts", "smtp_port": "x", "smtp_host": "m.example"})
    s = load_settings(store, config(None))
    assert s.smtp_port == 587 and s.smtp_host == "m.example"
    assert "smtp_port" in caplog.text


def test_send_test_mail(smtp):
    cfg = config(smtp.port)
    send_test_mail(load_settings(None, cfg), "admin@example.com")
    ((rcpts, msg),) = smtp.inbox.messages()
    assert rcpts == ["admin@example.com"] and msg["Subject"].startswith("[CloudTask] TEST")
    with pytest.raises(CloudTaskError, match="connection refused"):
        send_test_mail(load_settings(None, config(free_port())), "admin@example.com")
    with pytest.raises(CloudTaskError, match="mail is off"):
        send_test_mail(load_settings(None, config(None)), "admin@example.com")
    with pytest.raises(CloudTaskError, match="not an email address"):
        send_test_mail(load_settings(None, cfg), "admin")
    with pytest.raises(CloudTaskError, match="does not offer STARTTLS"):
        send_test_mail(load_settings(None, config(smtp.port, smtp_security="starttls")), "a@b.c")


# --- the config file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alerts, needle",
    [
        ({"smtp_port": "many"}, "alerts.smtp_port: expected a whole number"),
        ({"smtp_port": 70000}, "alerts.smtp_port"),
        ({"smtp_security": "tls"}, "alerts.smtp_security: expected one of starttls"),
        ({"smtp_host": 3}, "alerts.smtp_host: expected a string"),
        ({"smtp_password_env": "MY PASS"}, "alerts.smtp_password_env"),
        ({"mail_from": "nobody"}, "alerts.mail_from"),
        ({"operators": 3}, "alerts.operators: expected a list"),
        ({"operators": ["x"]}, "alerts.operators[0]: 'x' is not an email address"),
        ({"operators_by_kind": []}, "alerts.operators_by_kind: expected an object"),
        ({"operators_by_kind": {"run.oops": []}}, "alerts.operators_by_kind.run.oops"),
        ({"operators_by_group": {"batch": ["nobody"]}}, "alerts.operators_by_group.batch[0]"),
        ({"operators_by_group": {"batch": 5}}, "alerts.operators_by_group.batch: expected a list"),
        ({"alert_interval": "soon"}, "alerts.alert_interval"),
        ({"webhooks": {"url": "x"}}, "alerts.webhooks: expected a list"),
        (
            {"webhooks": [{"url": "http://h/x", "secret": "s", "kinds": ["x"]}]},
            "alerts.webhooks[0].kinds[0]",
        ),
        (
            {"webhooks": [{"url": "http://h/x", "secret": "s", "when": 1}]},
            "alerts.webhooks[0].when: unknown key",
        ),
        ({"webhook_timeout": "0s"}, "alerts.webhook_timeout"),
        ({"smpt_host": "x"}, "alerts.smpt_host: unknown key"),
    ],
)
def test_config_file_alerts_are_checked(tmp_path, alerts, needle):
    path = tmp_path / "cloudtask.json"
    path.write_text(json.dumps({"alerts": alerts}))
    with pytest.raises(ConfigError) as err:
        load_config(str(path), environ={})
    assert needle in str(err.value)


def test_config_file_and_environment_alerts(tmp_path):
    path = tmp_path / "cloudtask.json"
    path.write_text(
        json.dumps(
            {
                "alerts": {
                    "smtp_host": "mail.example.com",
                    "smtp_security": "ssl",
                    "smtp_port": 465,
                    "alert_interval": "5m",
                    "operators_by_kind": {"agent.left": ["infra@example.com"]},
                    "webhooks": [{"url": "https://h.example.com/x", "secret": "s"}],
                }
            }
        )
    )
    env = {
        "CLOUDTASK_ALERTS_OPERATORS": "a@example.com, b@example.com",
        "CLOUDTASK_ALERTS_OPERATORS_BY_GROUP": '{"batch": ["c@example.com"]}',
        "CLOUDTASK_ALERTS_SMTP_PASSWORD_ENV": "SMTP_PASS",
    }
    cfg = load_config(str(path), environ=env)
    a = cfg.alerts
    assert (a.smtp_host, a.smtp_port, a.smtp_security) == ("mail.example.com", 465, "ssl")
    assert a.alert_interval == 300.0
    assert a.operators == ("a@example.com", "b@example.com")
    assert a.operators_by_group == {"batch": ("c@example.com",)}
    assert a.operators_by_kind == {"agent.left": ("infra@example.com",)}
    assert a.webhooks == ({"url": "https://h.example.com/x", "secret": "s", "kinds": None},)
    s = load_settings(None, cfg, environ={"SMTP_PASS": "from-env"})
    assert s.smtp_password == "from-env"
    with pytest.raises(ConfigError, match="CLOUDTASK_ALERTS_WEBHOOKS at \\[0\\].url"):
        load_config(None, environ={"CLOUDTASK_ALERTS_WEBHOOKS": '[{"url": "x", "secret": "s"}]'})


def test_example_config_documents_every_alerts_key():
    with open("conf/cloudtask.json", encoding="utf-8") as f:
        raw = json.load(f)
    from cloudtask.config import config_keys

    assert set(raw["alerts"]) - {"$comment"} == set(config_keys()["alerts"])
    assert "$comment" in raw["alerts"]


# --- subjects ----------------------------------------------------------------------------------


def test_subjects_sort_by_kind_then_name_then_time():
    base = {"task_name": "sync", "task_id": "t1", "run_id": "r1", "agent": "a2"}
    d = {"scheduled_for": "2026-12-01T05:30:00+00:00"}
    assert (
        event_subject({**base, "kind": "run.failed", "details": {**d, "http_status": 500}})
        == "[CloudTask] FAILED sync (HTTP 500) 2026-12-01 05:30 UTC"
    )
    assert (
        event_subject({**base, "kind": "run.lost", "details": d})
        == "[CloudTask] LOST sync 2026-12-01 05:30 UTC"
    )
    assert (
        event_subject({**base, "kind": "run.missed", "details": d})
        == "[CloudTask] MISSED sync 2026-12-01 05:30 UTC"
    )
    leader = {"kind": "center.leader", "at": T0, "details": {"center_id": "c2"}}
    assert event_subject(leader) == "[CloudTask] LEADER c2 2026-12-01 03:00 UTC"
    newline = {"kind": "task.changed", "task_name": "x", "at": T0, "details": {"actor": "a\nb"}}
    assert "\n" not in event_subject(newline)
