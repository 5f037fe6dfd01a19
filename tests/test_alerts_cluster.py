"""Alerts in a real cluster: centers and agents as processes, a real SMTP server (aiosmtpd).

A task that fails at every fire mails its first failure once to each recipient; an agent
killed with kill -9 is mailed once as offline; and the leading center is killed with kill -9
in the middle: the new leader sends what was not sent, and no message goes out twice."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import SmtpServer, wait_for
from test_cluster import Cluster, leader

from cloudtask.localservers import free_port


@pytest.fixture
def smtp():
    server = SmtpServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, smtp, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    c.env.update(
        CLOUDTASK_ALERTS_SMTP_HOST="127.0.0.1",
        CLOUDTASK_ALERTS_SMTP_PORT=str(smtp.port),
        CLOUDTASK_ALERTS_SMTP_SECURITY="none",
        CLOUDTASK_ALERTS_MAIL_FROM="cloudtask@example.com",
        CLOUDTASK_ALERTS_OPERATORS="ops@example.com",
        CLOUDTASK_ALERTS_ALERT_INTERVAL="1h",
        CLOUDTASK_WEB_BASE_URL="https://cloudtask.example.com",
    )
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def subjects(smtp, recipient: str) -> list[str]:
    return [str(m["Subject"]) for m in smtp.inbox.by_recipient().get(recipient, [])]


@pytest.mark.timeout(180)
def test_failures_and_a_dead_agent_are_mailed_once_across_a_leader_change(cluster, smtp, store, zk):
    cluster.center("c1")
    wait_for(lambda: leader(zk) == "c1", timeout=30, message="c1 leads")
    cluster.center("c2")
    cluster.agent("a1")
    cluster.agent("a2")
    failing = store.create_task(
        {
            "name": "boom",
            "schedule": {"every": "1s"},
            "command": "echo about to fail; exit 3",
            "shell": True,
            "notify": {"emails": ["owner@example.com"]},
        }
    )
    wait_for(
        lambda: any("FAILED boom" in s for s in subjects(smtp, "owner@example.com")),
        timeout=60,
        message="the first failure was mailed to the task's owner",
    )
    wait_for(lambda: any("FAILED boom" in s for s in subjects(smtp, "ops@example.com")), timeout=30)
    first = smtp.inbox.by_recipient()["owner@example.com"][0]
    body = first.get_body(("plain",)).get_content()
    assert "about to fail" in body  # the last lines of the output
    assert "https://cloudtask.example.com/runs/" in body
    assert str(first["Subject"]).startswith("[CloudTask] FAILED boom (exit 3)"), first["Subject"]

    # the leader dies; then an agent dies; the new leader notices and mails it
    cluster.kill("c1")
    wait_for(lambda: leader(zk) == "c2", timeout=30, message="c2 leads")
    cluster.kill("a2")
    wait_for(
        lambda: any(
            "a2" in s and "OFFLINE" in s.upper() for s in subjects(smtp, "ops@example.com")
        ),
        timeout=60,
        message="the agent killed with kill -9 was mailed as offline",
    )
    store.tasks.delete_one({"_id": failing["_id"]})  # no more failures from here on

    # every event planned for mail was sent, each message once
    wait_for(
        lambda: store.db["deliveries"].count_documents({"status": "pending"}) == 0,
        timeout=30,
        message="every delivery sent",
    )
    messages = smtp.inbox.messages()
    ids = Counter(str(m["Message-ID"]) for _, m in messages)
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    owner = subjects(smtp, "owner@example.com")
    assert sum("FAILED boom" in s for s in owner) == 1  # the others wait for the digest
    ops = subjects(smtp, "ops@example.com")
    assert sum("FAILED boom" in s for s in ops) == 1
    assert sum("a2" in s and "OFFLINE" in s.upper() for s in ops) == 1
    assert store.db["deliveries"].count_documents({"status": "failed"}) == 0
    # what was recorded but not mailed yet is held for the digest, not lost
    held = store.events.count_documents({"kind": "run.failed", "task_id": failing["_id"]})
    assert held > 1
