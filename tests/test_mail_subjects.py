"""A long subject arrives as it was written: on one line when it is ASCII (a folded one came
out of readers that do not unfold with a line break and a leading space in it), and as
encoded words that decode to the same text when it is not. Sent through a real SMTP server."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header

from notifying import T0, config, make_task, run_event, ts

from cloudtask.notify import Notifier

LONG = "nightly-report-for-the-finance-department-eu-west-with-a-long-name"


def test_a_long_subject_arrives_unbroken(store, smtp):
    name = LONG
    cfg = config(smtp.port, operators=("ops@example.com",))
    task = make_task(store, name=name)
    run_event(store, task, T0)
    assert Notifier(store, cfg).run_once(ts(T0, 5))["sent"] == 1
    (envelope,) = smtp.inbox.envelopes
    raw = envelope.original_content
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    subject_line = next(line for line in head.split("\r\n") if line.lower().startswith("subject:"))
    expected = f"[CloudTask] FAILED {name} (exit 2) 2026-12-01 03:00 UTC"
    assert len(expected) > 78  # past the length mail is folded at by default
    assert subject_line == f"Subject: {expected}"  # one line, not folded
    # what readers get: the modern parser, and the old one with decode_header
    modern = email.message_from_bytes(raw, policy=email.policy.default)
    assert modern["Subject"] == expected
    old = email.message_from_bytes(raw)
    assert str(make_header(decode_header(old["Subject"]))) == expected


def test_a_subject_with_other_characters_is_encoded_words_that_decode_the_same():
    from datetime import datetime, timezone

    from cloudtask.notify.mail import build_message
    from cloudtask.notify.settings import load_settings

    subject = "[CloudTask] FAILED report: Prüfung der Überweisungen fehlgeschlagen, " * 2
    msg = build_message(
        settings=load_settings(None, config(25)),
        to="ops@example.com",
        subject=subject.strip(),
        body="x",
        delivery_id="d1",
        kind="run.failed",
        date=datetime(2026, 12, 1, tzinfo=timezone.utc),
    )
    raw = msg.as_bytes()
    head = raw.split(b"\n\n", 1)[0].decode("ascii")  # 7-bit: encoded words
    assert all(len(line) <= 78 for line in head.splitlines())
    old = email.message_from_bytes(raw)
    assert str(make_header(decode_header(old["Subject"]))) == subject.strip()
    assert email.message_from_bytes(raw, policy=email.policy.default)["Subject"] == subject.strip()
