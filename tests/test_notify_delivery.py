"""The notifier against real servers: an aiosmtpd SMTP server and an HTTP webhook receiver on
free ports, the real MongoDB wire server. Time is passed to ``Notifier.run_once`` explicitly
(throttling and retries need no sleeping); only the network is real.

This file: retries, TLS and login, webhooks, the notifier thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from aiosmtpd.smtp import AuthResult
from helpers import Receiver, SmtpServer, holds, wait_for
from notifying import (
    BASE,
    SECRET,
    T0,
    config,
    make_task,
    run_event,
    ts,
)

from cloudtask import events
from cloudtask.localservers import free_port
from cloudtask.notify import (
    Notifier,
    NotifierThread,
)
from cloudtask.notify.deliveries import Deliveries
from cloudtask.notify.webhook import signature

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
        cfg = config(server.port, smtp_user="alerts", smtp_password_env="CLOUDTASK_SMTP_PASSWORD")
        event = run_event(store, make_task(store), T0)

        unset = Notifier(store, cfg, environ={})
        assert unset.run_once(ts(T0, 1))["retried"] == 1
        (doc,) = Deliveries(store).for_event(event["_id"])
        assert "CLOUDTASK_SMTP_PASSWORD" in doc["last_error"] and "not set" in doc["last_error"]

        wrong = Notifier(store, cfg, environ={"CLOUDTASK_SMTP_PASSWORD": "nope"})
        assert wrong.run_once(ts(T0, 10))["retried"] == 1
        (doc,) = Deliveries(store).for_event(event["_id"])
        assert "refused the login of 'alerts'" in doc["last_error"]

        right = Notifier(store, cfg, environ={"CLOUDTASK_SMTP_PASSWORD": "pa55"})
        assert right.run_once(ts(T0, 30))["sent"] == 1
        assert len(server.inbox.messages()) == 1
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_password_variable_without_the_prefix_is_never_read_nor_sent(store):
    """An admin could name any variable of the center's environment (the database URI) and
    have it sent as the password to an SMTP server of their choosing."""
    tried: list[bytes] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
        tried.append(auth_data.password)
        return AuthResult(success=True, handled=False)

    server = SmtpServer(
        free_port(), authenticator=authenticator, auth_required=True, auth_require_tls=False
    ).start()
    try:
        cfg = config(server.port, smtp_user="alerts", smtp_password_env="CLOUDTASK_MONGO_URI")
        event = run_event(store, make_task(store), T0)
        environ = {"CLOUDTASK_MONGO_URI": "mongodb://admin:db-secret@db/"}
        assert Notifier(store, cfg, environ=environ).run_once(ts(T0, 1))["retried"] == 1
        (doc,) = Deliveries(store).for_event(event["_id"])
        assert doc["last_error"] == (
            "alerts.smtp_password_env may only name an environment variable starting with "
            "CLOUDTASK_SMTP_ (security.smtp_password_env_prefix), got 'CLOUDTASK_MONGO_URI': "
            "put the password in such a variable of the center's environment"
        )
        assert tried == [] and server.inbox.messages() == []
        # another prefix, configured in the file (not on the settings page)
        mine = cfg.with_section("security", smtp_password_env_prefix="MAIL_")
        mine = mine.with_section("alerts", smtp_password_env="MAIL_PASSWORD")
        counts = Notifier(store, mine, environ={"MAIL_PASSWORD": "pw"}).run_once(ts(T0, 10))
        assert counts["sent"] == 1 and tried == [b"pw"]
    finally:
        server.stop()


# --- the deny-list of networks -------------------------------------------------------------------


def test_webhooks_to_a_denied_network_are_not_posted(store, receiver):
    cfg = config(None, webhooks=({"url": receiver.url, "secret": SECRET, "kinds": None},))
    event = run_event(store, make_task(store), T0)
    denied = cfg.with_section("security", egress_filter=True, egress_deny=("127.0.0.0/8",))
    assert Notifier(store, denied).run_once(ts(T0, 1))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["last_error"] == (
        f"not posted to {receiver.url}: connecting to 127.0.0.1 is refused: 127.0.0.0/8 is on "
        "the deny-list of networks (security.egress_filter)"
    )
    assert receiver.requests == []
    # on with only the metadata addresses (or off, the default): loopback is reached
    on = cfg.with_section("security", egress_filter=True)
    assert Notifier(store, on).run_once(ts(T0, 10))["sent"] == 1
    assert len(receiver.requests) == 1


def test_a_webhook_to_the_metadata_address_is_refused_at_once(store):
    hook = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    cfg = config(None, webhooks=({"url": hook, "secret": SECRET, "kinds": None},))
    cfg = cfg.with_section("security", egress_filter=True)
    event = run_event(store, make_task(store), T0)
    started = time.monotonic()
    assert Notifier(store, cfg).run_once(ts(T0, 1))["retried"] == 1
    assert time.monotonic() - started < 2  # refused, not a connection timing out
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert "169.254.169.254/32 is on the deny-list of networks" in doc["last_error"]


@pytest.mark.parametrize("security", ["none", "ssl"])
def test_an_smtp_server_in_a_denied_network_is_not_used(store, smtp, security):
    cfg = config(smtp.port, smtp_security=security)
    cfg = cfg.with_section("security", egress_filter=True, egress_deny=("127.0.0.1",))
    event = run_event(store, make_task(store), T0)
    assert Notifier(store, cfg).run_once(ts(T0, 1))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["last_error"] == (
        f"the SMTP server 127.0.0.1:{smtp.port} is not used: connecting to 127.0.0.1 is "
        "refused: 127.0.0.1/32 is on the deny-list of networks (security.egress_filter)"
    )
    assert smtp.inbox.messages() == []


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
        holds(lambda: len(smtp.inbox.messages()) == 30, seconds=0.3)  # no duplicate comes
    finally:
        for t in threads:
            t.stop()
    subjects = sorted(m["Subject"].split()[3] for _, m in smtp.inbox.messages())
    assert subjects == sorted(f"agent-{i}" for i in range(30))
    assert threads[0].passes > 0 and threads[1].passes > 0
